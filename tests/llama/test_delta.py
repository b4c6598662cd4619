"""python -m llama.export.delta (FastChat's apply_delta / make_delta): the result equals a plain
float32 sum (or difference) of the two models' weights, a delta with added vocabulary rows extends
the base with zeros, base + (target - base) gives the target back, and a delta of another base is
one line with nothing written."""
import subprocess
import sys

import pytest
import torch

from llama.errors import LlamaInputError
from llama.export.delta import apply_delta, make_delta
from llama.formats import read_model_args, save_checkpoint
from llama.loader import load_model
from llama.tiny import random_model
from tests.utils import ROOT, tiny_args


def weights(d) -> dict:
    """Every weight of the checkpoint at d (any format), as our loader gives them."""
    return {k: v.float() for k, v in load_model(d, read_model_args(d)).state_dict().items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("delta")
    for name, seed, overrides in (("base", 1, {}), ("delta", 2, {}), ("big_vocab", 3, {"vocab_size": 400}),
                                  ("deeper", 4, {"n_layers": 3}), ("wider", 5, {"dim": 128})):
        save_checkpoint(random_model(tiny_args(**overrides), seed=seed), root / name)
    return root


def test_apply_is_the_plain_sum(models, tmp_path):
    out = apply_delta(models / "base", models / "delta", tmp_path / "sum", progress=False)
    assert (out / "config.json").is_file()  # an HF folder, read back by our HF reader
    base, delta, got = weights(models / "base"), weights(models / "delta"), weights(out)
    assert got.keys() == base.keys()
    for key in base:
        torch.testing.assert_close(got[key], base[key] + delta[key], atol=0, rtol=0)


def test_a_larger_delta_vocabulary_extends_the_base_with_zero_rows(models, tmp_path):
    out = apply_delta(models / "base", models / "big_vocab", tmp_path / "sum", fmt="pth", progress=False)
    base, delta, got = weights(models / "base"), weights(models / "big_vocab"), weights(out)
    assert read_model_args(out).vocab_size == 400
    for key in ("tok_embeddings.weight", "output.weight"):
        n = base[key].shape[0]
        torch.testing.assert_close(got[key][:n], base[key] + delta[key][:n], atol=0, rtol=0)
        torch.testing.assert_close(got[key][n:], delta[key][n:], atol=0, rtol=0)


def test_make_then_apply_gives_the_target_back(models, tmp_path):
    delta = make_delta(models / "base", models / "big_vocab", tmp_path / "d", progress=False)
    base, target, d = weights(models / "base"), weights(models / "big_vocab"), weights(delta)
    torch.testing.assert_close(d["layers.0.attention.wq.weight"],
                               target["layers.0.attention.wq.weight"] - base["layers.0.attention.wq.weight"],
                               atol=0, rtol=0)
    back = weights(apply_delta(models / "base", delta, tmp_path / "t", progress=False))
    for key in target:
        torch.testing.assert_close(back[key], target[key], atol=1e-7, rtol=0)


@pytest.mark.parametrize("other, message", [
    ("deeper", "has layers.2.attention.wk.weight, which the base"),
    ("wider", "tok_embeddings.weight is (384, 128) in the delta but (384, 64) in the base"),
])
def test_a_delta_of_another_base_is_refused_with_nothing_written(models, tmp_path, other, message):
    with pytest.raises(LlamaInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_delta(models / "base", models / other, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_command_line(models, tmp_path):
    run = [sys.executable, "-m", "llama.export.delta"]
    ok = subprocess.run(run + ["apply", "--base", models / "base", "--delta", models / "delta", "--out", tmp_path / "o",
                               "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()
    bad = subprocess.run(run + ["make", "--base", models / "base", "--target", models / "wider", "--out", tmp_path / "x"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "another base model" in bad.stderr
    assert not (tmp_path / "x").exists()
