"""--mode layers: stage files hold every tensor exactly once, whole, in contiguous layer ranges
balanced by bytes (the placement planner's plan), with the ranges in split.json; a stage folder
reads back as a source."""
import json
import re

import pytest
from safetensors.torch import load_file

from llama.formats import save_checkpoint
from llama.placement import plan_stages
from llama.tiny import random_model
from tests.utils import assert_same_state, chunk_state, load_dir, run_split, tiny_args

N_LAYERS = 5


@pytest.fixture
def src(tmp_path):
    save_checkpoint(random_model(tiny_args(n_layers=N_LAYERS, n_kv_heads=2), seed=2), tmp_path / "src")
    return tmp_path / "src"


def unit(key: str) -> int:
    m = re.match(r"layers\.(\d+)\.", key)
    return int(m.group(1)) + 1 if m else 0 if key.startswith("tok_embeddings") else N_LAYERS + 1


@pytest.mark.parametrize("n", [1, 3, 4, N_LAYERS + 2])
def test_stages_cover_every_tensor_once_contiguous_and_balanced(src, tmp_path, n):
    original = load_file(str(src / "consolidated.00.safetensors"))
    assert run_split("--n", n, "--ckpt_dir", src, "--mode", "layers") == 0
    out = tmp_path / f"src_stages{n}"
    stages = [load_file(str(out / f"stage.{j:02d}.safetensors")) for j in range(n)]
    assert not list(out.glob("consolidated.*")) and len(list(out.glob("stage.*"))) == n
    seen = [k for s in stages for k in s]
    assert sorted(seen) == sorted(original)  # every tensor, exactly once
    for s in stages:
        assert_same_state(s, {k: original[k] for k in s})  # whole, unchanged

    unit_bytes = [0] * (N_LAYERS + 2)
    for k, t in original.items():
        unit_bytes[unit(k)] += t.numel() * t.element_size()
    want = plan_stages(unit_bytes, [1] * n)
    got = [next(j for j, s in enumerate(stages) if any(unit(k) == u for k in s)) for u in range(N_LAYERS + 2)]
    assert got == want and got == sorted(got) and set(got) == set(range(n))  # contiguous, none empty
    per_stage = [sum(b for b, s in zip(unit_bytes, got) if s == j) for j in range(n)]
    assert max(per_stage) <= sum(unit_bytes) / n + max(unit_bytes)  # balanced

    manifest = json.loads((out / "split.json").read_text())
    assert manifest["mode"] == "layers" and manifest["n"] == n
    ranges = [(s["layer_start"], s["layer_stop"]) for s in manifest["stages"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == N_LAYERS
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous
    for j, s in enumerate(manifest["stages"]):
        layers = {int(m.group(1)) for k in stages[j] if (m := re.match(r"layers\.(\d+)\.", k))}
        assert layers == set(range(*ranges[j]))
        assert s["embedding"] == ("tok_embeddings.weight" in stages[j])
        assert s["norm_output"] == ("output.weight" in stages[j]) == ("norm.weight" in stages[j])
    assert manifest["stages"][0]["embedding"] and manifest["stages"][-1]["norm_output"]


def test_stage_folder_reads_back_merged_or_resharded(src, tmp_path):
    original = load_file(str(src / "consolidated.00.safetensors"))
    assert run_split("--n", 3, "--ckpt_dir", src, "--mode", "layers") == 0
    stages = tmp_path / "src_stages3"
    assert run_split("--n", 1, "--ckpt_dir", stages, "--out", tmp_path / "merged") == 0
    assert_same_state(load_dir(tmp_path / "merged")[0], original)
    assert run_split("--n", 2, "--ckpt_dir", stages, "--out", tmp_path / "two") == 0
    for got, want in zip(load_dir(tmp_path / "two"), chunk_state(original, 2), strict=True):
        assert_same_state(got, want)
    assert json.loads((tmp_path / "two" / "split.json").read_text())["source_format"] == "stages"


def test_stage_errors(src, tmp_path, capsys):
    assert run_split("--n", N_LAYERS + 3, "--ckpt_dir", src, "--mode", "layers") == 2
    assert "only 7 units" in capsys.readouterr().err
    assert run_split("--n", 2, "--ckpt_dir", src, "--mode", "layers", "--format", "pth") == 2
    assert "--format pth" in capsys.readouterr().err
    assert not (tmp_path / f"src_stages{N_LAYERS + 3}").exists() and not (tmp_path / "src_stages2").exists()
    # a stage folder whose last stage file is gone
    assert run_split("--n", 3, "--ckpt_dir", src, "--mode", "layers") == 0
    (tmp_path / "src_stages3" / "stage.02.safetensors").unlink()
    assert run_split("--n", 1, "--ckpt_dir", tmp_path / "src_stages3", "--out", tmp_path / "m") == 2
    err = capsys.readouterr().err
    assert "stage.02.safetensors: missing" in err and "split.json" in err
    assert not (tmp_path / "m").exists()
