"""Tensor-parallel resharding: round trips are bitwise, shards are exactly torch.chunk of the
original along fairscale's dims, Meta .pth sources with any shard count, .pth output, HF sources,
and a manifest whose hashes match the files."""
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import llama.formats.base as formats_base
from llama.formats import read_model_args
from llama.loader import load_model
from llama.tiny import random_model
from tests.utils import assert_same_state, chunk_state, load_dir, random_ours, run_split, tiny_args, write_meta

ST = "consolidated.00.safetensors"


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Tiny row blocks so every tensor is read in several, cut at odd rows, across parts."""
    monkeypatch.setattr(formats_base, "BLOCK_BYTES", 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_1_4_2_1_is_bitwise(tmp_path, dtype):
    src = random_ours(tmp_path, dtype=dtype, n_kv_heads=4)
    original = load_file(str(src / ST))
    assert run_split("--n", 4, "--ckpt_dir", src) == 0
    assert run_split("--n", 2, "--ckpt_dir", tmp_path / "src_fs4") == 0
    assert run_split("--n", 1, "--ckpt_dir", tmp_path / "src_fs4_fs2") == 0
    for d, n in ((tmp_path / "src_fs4", 4), (tmp_path / "src_fs4_fs2", 2)):
        for got, want in zip(load_dir(d), chunk_state(original, n), strict=True):
            assert_same_state(got, want)
    (merged,) = load_dir(tmp_path / "src_fs4_fs2_fs1")
    assert_same_state(merged, original)
    assert (tmp_path / "src_fs4_fs2_fs1" / ST).read_bytes() != b""


def test_shards_are_torch_chunk_of_the_original_gqa(tmp_path):
    src = random_ours(tmp_path, n_kv_heads=2)
    original = load_file(str(src / ST))
    assert run_split("--n", 2, "--ckpt_dir", src, "--out", tmp_path / "two") == 0
    shards = load_dir(tmp_path / "two")
    assert len(shards) == 2 and shards[0]["layers.0.attention.wk.weight"].shape == (16, 64)
    for got, want in zip(shards, chunk_state(original, 2)):
        assert_same_state(got, want)
    with safe_open(str(tmp_path / "two" / "consolidated.01.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    # the split folder loads (merged) in one process to the same model
    args = read_model_args(tmp_path / "two")
    assert args == read_model_args(src)
    a, b = load_model(src, args), load_model(tmp_path / "two", args)
    tokens = torch.randint(0, args.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


def test_manifest_records_every_file(tmp_path, tokenizer_path):
    src = random_ours(tmp_path)
    (src / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    assert run_split("--n", 2, "--ckpt_dir", src) == 0
    out = tmp_path / "src_fs2"
    manifest = json.loads((out / "split.json").read_text())
    assert manifest["source"] == str(src.resolve()) and manifest["source_format"] == "ours"
    assert (manifest["mode"], manifest["n"], manifest["format"]) == ("tp", 2, "safetensors")
    names = sorted(r["name"] for r in manifest["files"])
    assert names == sorted(["consolidated.00.safetensors", "consolidated.01.safetensors", "params.json", "tokenizer.model"])
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["split.json"])
    for r in manifest["files"]:
        data = (out / r["name"]).read_bytes()
        assert r["bytes"] == len(data) and r["sha256"] == hashlib.sha256(data).hexdigest()
    assert (out / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()


@pytest.mark.parametrize("m,n", [(4, 2), (2, 4), (4, 1)])
def test_meta_pth_sources_with_any_shard_count(tmp_path, m, n):
    args = tiny_args()
    state = random_model(args, seed=1).state_dict()
    write_meta(state, args, tmp_path / "meta", m)
    assert run_split("--n", n, "--ckpt_dir", tmp_path / "meta", "--out", tmp_path / "out") == 0
    for got, want in zip(load_dir(tmp_path / "out"), chunk_state(state, n), strict=True):
        assert_same_state(got, want)


def test_pth_output_loads_with_plain_torch_load(tmp_path):
    src = random_ours(tmp_path, n_kv_heads=2)
    original = load_file(str(src / ST))
    assert run_split("--n", 2, "--ckpt_dir", src, "--format", "pth") == 0
    out = tmp_path / "src_fs2"
    assert sorted(p.name for p in out.glob("consolidated.*")) == ["consolidated.00.pth", "consolidated.01.pth"]
    shards = [torch.load(out / f"consolidated.{r:02d}.pth", weights_only=True) for r in range(2)]
    assert set(shards[0]) == set(original)  # Meta key names
    assert "layers.1.feed_forward.w2.weight" in shards[0] and "tok_embeddings.weight" in shards[0]
    for got, want in zip(shards, chunk_state(original, 2)):
        assert_same_state(got, want)
        for t in got.values():  # each shard saved its own storage, not the whole tensor's
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    # and back to one safetensors file
    assert run_split("--n", 1, "--ckpt_dir", out, "--out", tmp_path / "back") == 0
    assert_same_state(load_file(str(tmp_path / "back" / ST)), original)


# --- HF sources -------------------------------------------------------------------------------


def hf_folder(path, tie: bool, safe: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=384, rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=tie,
    )
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.1)
    model.save_pretrained(path, safe_serialization=safe)
    return path


@pytest.mark.parametrize("tie,safe", [(False, True), (True, False)], ids=["safetensors", "tied-bin"])
def test_hf_source_split_then_merged_gives_the_same_logits(tmp_path, tie, safe):
    hf = hf_folder(tmp_path / "hf", tie, safe)
    assert run_split("--n", 2, "--ckpt_dir", hf) == 0
    assert run_split("--n", 1, "--ckpt_dir", tmp_path / "hf_fs2", "--out", tmp_path / "merged") == 0
    args = read_model_args(hf)
    assert read_model_args(tmp_path / "merged") == args
    want_model, got_model = load_model(hf, args), load_model(tmp_path / "merged", args)
    tokens = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = want_model(tokens), got_model(tokens)
    assert torch.equal(got, want)
    shards = load_dir(tmp_path / "hf_fs2")
    assert "layers.0.attention.wq.weight" in shards[0]  # Meta names
    if tie:  # the output is written out, split like any column-parallel weight
        emb = want_model.tok_embeddings.weight
        assert torch.equal(shards[1]["output.weight"], emb.chunk(2, 0)[1])


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2, "hidden_dim": 200}, {"dim": 96, "n_heads": 6, "n_kv_heads": 2, "ffn_dim_multiplier": 1.3}])
def test_expected_shapes_are_the_models(overrides):
    """split/ checks sources against Meta shapes computed from the config; they must be exactly
    the keys and shapes of the model the core builds."""
    from llama.model import Transformer
    from llama.layers import expected_shapes

    args = tiny_args(**overrides)
    with torch.device("meta"):
        model = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    assert list(expected_shapes(args).items()) == list(model.items())


def test_llama1_params_without_vocab_size(tmp_path):
    """vocab_size -1 (LLaMA-1): the split takes it from the embedding and keeps -1 in params.json."""
    args = tiny_args()
    state = random_model(args, seed=4).state_dict()
    meta = write_meta(state, args, tmp_path / "meta", 1)
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    assert run_split("--n", 2, "--ckpt_dir", meta) == 0
    assert json.loads((tmp_path / "meta_fs2" / "params.json").read_text())["vocab_size"] == -1
    for got, want in zip(load_dir(tmp_path / "meta_fs2"), chunk_state(state, 2), strict=True):
        assert_same_state(got, want)
