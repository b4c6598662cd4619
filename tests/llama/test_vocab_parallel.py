"""Meta's Llama-3 shards: the embedding is split along the vocabulary (VocabParallelEmbedding,
dim 0), not along dim as in Llama-1/2. Shards written here by the test's own chunking (docs/formats.md)
from an HF LlamaForCausalLM with Llama-3.1 rope scaling load in one process with HF's logits,
reshard both ways with split_model.py, and run tensor-parallel under torchrun as one process does."""
import json
import shutil
import sys

import pytest
import torch

pytest.importorskip("transformers")

from llama.errors import LlamaInputError  # noqa: E402
from llama.formats import read_model_args  # noqa: E402
from llama.loader import load_model  # noqa: E402
from tests.utils import (  # noqa: E402
    CASES, DIM, N_HEADS, N_LAYERS, VOCAB, build_hf_model, hf_state_to_meta, load_dir, prompt_flags, random_tokens,
    run, run_split,
)

CASE = next(c for c in CASES if c.name == "llama31_use_scaled_rope")  # Meta's Llama-3.1 params.json keys
COLUMN_OR_VOCAB = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")  # split on dim 0
ROW = ("wo", "w2")  # split on dim 1


def llama3_split_dim(key: str):
    """Meta's Llama-3 code: column-parallel weights and the vocab-parallel embedding on dim 0,
    row-parallel ones on dim 1, norms replicated."""
    name = key.split(".")[-2]
    return 0 if name in COLUMN_OR_VOCAB else 1 if name in ROW else None


def llama3_params() -> dict:
    """A Llama-3.1 params.json (use_scaled_rope) for CASE's shapes."""
    return {"dim": DIM, "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_kv_heads": CASE.n_kv_heads,
            "vocab_size": VOCAB, "multiple_of": CASE.multiple_of, "norm_eps": 1e-5, "rope_theta": CASE.rope_theta,
            **CASE.meta_rope}


def write_llama3_shards(state: dict, out, n: int, tokenizer_path=None):
    out.mkdir(parents=True)
    for rank in range(n):
        shard = {k: t if llama3_split_dim(k) is None else t.chunk(n, llama3_split_dim(k))[rank].clone()
                 for k, t in state.items()}
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
    (out / "params.json").write_text(json.dumps(llama3_params()))
    if tokenizer_path is not None:
        shutil.copy(tokenizer_path, out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model(CASE, seed=5)


@pytest.fixture(scope="module")
def meta_state(hf_model):
    return hf_state_to_meta(hf_model.state_dict(), N_LAYERS, N_HEADS, CASE.n_kv_heads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, meta_state, tokenizer_path):
    base = tmp_path_factory.mktemp("llama3")
    return {n: write_llama3_shards(meta_state, base / f"fs{n}", n, tokenizer_path) for n in (1, 2, 4)}


@pytest.mark.parametrize("n", [2, 4])
def test_vocab_split_shards_are_recognised_and_load_with_hf_logits(shards, hf_model, n):
    args = read_model_args(shards[n])
    assert args.vocab_parallel is True and args.embedding_split_dim == 0
    tokens = random_tokens(1)
    with torch.no_grad():
        want = hf_model(tokens).logits
        got = load_model(shards[n], args)(tokens)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_dim_split_shards_are_still_llama2_layout(tmp_path, meta_state):
    """The same weights with the embedding split on dim 1 (Llama-2's layout) read the same."""
    out = tmp_path / "dim_split"
    out.mkdir()
    for rank in range(2):
        shard = {}
        for k, t in meta_state.items():
            dim = 1 if k == "tok_embeddings.weight" else llama3_split_dim(k)
            shard[k] = t if dim is None else t.chunk(2, dim)[rank].clone()
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
    (out / "params.json").write_text(json.dumps(llama3_params()))
    args = read_model_args(out)
    assert args.vocab_parallel is False and args.embedding_split_dim == 1
    model = load_model(out, args)
    torch.testing.assert_close(model.tok_embeddings.weight, meta_state["tok_embeddings.weight"], atol=0, rtol=0)


def test_reshard_keeps_the_vocab_split_both_ways(shards, meta_state, tmp_path):
    """4 -> 2 -> 1: each step's shards are the test's own vocab-split chunks of the weights."""
    two, one = tmp_path / "two", tmp_path / "one"
    assert run_split("--n", 2, "--ckpt_dir", shards[4], "--out", two) == 0
    for rank, shard in enumerate(load_dir(two)):
        for key, t in shard.items():
            dim = llama3_split_dim(key)
            want = meta_state[key] if dim is None else meta_state[key].chunk(2, dim)[rank]
            assert torch.equal(t, want), key
    assert json.loads((two / "split.json").read_text())["split_dims"]["tok_embeddings.weight"] == 0
    assert run_split("--n", 1, "--ckpt_dir", two, "--out", one) == 0
    (whole,) = load_dir(one)
    assert set(whole) == set(meta_state)
    for key, t in whole.items():
        assert torch.equal(t, meta_state[key]), key


def test_a_shard_fitting_neither_split_is_refused(tmp_path, meta_state):
    out = write_llama3_shards(meta_state, tmp_path / "odd", 2)
    shard = torch.load(out / "consolidated.00.pth", weights_only=True)
    shard["tok_embeddings.weight"] = torch.zeros(100, DIM)
    torch.save(shard, out / "consolidated.00.pth")
    with pytest.raises(LlamaInputError, match=r"consolidated\.00\.pth: tok_embeddings\.weight has shape \(100, 64\), "
                                              r"neither a vocabulary split \(192, 64\) nor a dim split \(384, 32\)"):
        read_model_args(out)
    assert run_split("--n", 1, "--ckpt_dir", out, "--out", tmp_path / "merged") != 0
    assert not (tmp_path / "merged").exists()


def test_torchrun_on_vocab_split_shards_prints_what_one_process_prints(shards):
    """Greedy text through a VocabParallelEmbedding on 2 ranks (gloo) equals one process on the
    whole checkpoint."""
    single = run([sys.executable, "example.py", "--ckpt_dir", shards[1]] + prompt_flags(), timeout=240)
    assert single.returncode == 0, single.stderr
    got = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "example.py", "--ckpt_dir", shards[2]] + prompt_flags(), timeout=240)
    assert got.returncode == 0, got.stderr
    lines = [ln for ln in got.stdout.splitlines() if not ln.startswith("> initializing")]
    assert lines == single.stdout.splitlines()
    assert sum(ln.startswith("> ") for ln in lines) == 3


def test_a_missing_last_vocab_split_shard_is_named(tmp_path, meta_state):
    out = write_llama3_shards(meta_state, tmp_path / "three_of_four", 4)
    (out / "consolidated.03.pth").unlink()
    with pytest.raises(LlamaInputError, match=r"consolidated\.03\.pth is missing: tok_embeddings\.weight in "
                                              r"consolidated\.00\.pth has shape \(96, 64\), 1/4 of the \(384, 64\) "
                                              r"params\.json implies, so this looks like a 4-shard checkpoint"):
        read_model_args(out)
