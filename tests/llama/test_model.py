"""Our model, loaded through `llama.checkpoint`, against HF transformers' LlamaForCausalLM.

Each case builds a tiny random HF model, saves it in HF format (safetensors) and, with this
file's own converter (written from REFERENCE.md, not from our loader), in Meta format
(`params.json` + `consolidated.00.pth`). Both folders are loaded with our loader and their
logits compared to HF's. The KV-cache tests compare incremental decoding to a full forward.
"""
import json
import math
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from llama.checkpoint import detect_format, load_model, read_model_args  # noqa: E402
from llama.model import rope_frequencies  # noqa: E402
from tests.conftest import HF_LAYER_NAMES, hf_to_meta_rows  # noqa: E402

DIM, N_LAYERS, N_HEADS, VOCAB, SEQ = 64, 2, 4, 384, 40
NORM_EPS = 1e-5
TOL_HF = 1e-4  # ours vs HF, float32
TOL_CACHE = 1e-5  # incremental decoding vs full forward, float32


@dataclass
class Case:
    name: str
    n_kv_heads: int
    intermediate_size: int
    # Meta params.json values that make Meta's FFN rule give intermediate_size
    multiple_of: int
    ffn_dim_multiplier: Optional[float] = None
    rope_theta: float = 10000.0
    hf_rope_scaling: Optional[dict] = None
    meta_rope: dict = field(default_factory=dict)  # extra params.json keys for the rope
    max_position_embeddings: int = 128


LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# What Meta's Llama-3.1 params.json means by `"use_scaled_rope": true`.
LLAMA31_SCALING = {**LLAMA3_SCALING, "original_max_position_embeddings": 8192}

CASES = [
    Case("mha", n_kv_heads=4, intermediate_size=192, multiple_of=32),
    Case("gqa", n_kv_heads=2, intermediate_size=176, multiple_of=16),
    Case(
        "llama3_scaling", n_kv_heads=2, intermediate_size=160, multiple_of=32, ffn_dim_multiplier=0.9,
        rope_theta=500000.0, hf_rope_scaling=LLAMA3_SCALING, meta_rope={"rope_scaling": LLAMA3_SCALING},
    ),
    Case(
        "linear_scaling", n_kv_heads=4, intermediate_size=192, multiple_of=32,
        hf_rope_scaling={"rope_type": "linear", "factor": 4.0},
        meta_rope={"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    ),
    Case(
        "llama31_use_scaled_rope", n_kv_heads=2, intermediate_size=192, multiple_of=64,
        rope_theta=500000.0, hf_rope_scaling=LLAMA31_SCALING, meta_rope={"use_scaled_rope": True},
        max_position_embeddings=131072,
    ),
]


# --- the test's own reference helpers -----------------------------------------------------------


def meta_ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's FFN width rule, as stated in REFERENCE.md."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def build_hf_model(case: Case, seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    """A float32 HF Llama with every weight random (RMSNorm weights too), scaled so that the
    logits are O(1) and differences are visible."""
    cfg = LlamaConfig(
        hidden_size=DIM, intermediate_size=case.intermediate_size, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=case.n_kv_heads, vocab_size=VOCAB,
        max_position_embeddings=case.max_position_embeddings, rms_norm_eps=NORM_EPS, rope_theta=case.rope_theta,
        rope_scaling=dict(case.hf_rope_scaling) if case.hf_rope_scaling else None,
        tie_word_embeddings=tie, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model.eval()




def hf_state_to_meta(sd: dict, n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    embed = sd["model.embed_tokens.weight"]
    out = {
        "tok_embeddings.weight": embed,
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd.get("lm_head.weight", embed),
    }
    rope_heads = {"attention.wq": n_heads, "attention.wk": n_kv_heads}
    for i in range(n_layers):
        for meta, hf in HF_LAYER_NAMES.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            out[f"layers.{i}.{meta}.weight"] = hf_to_meta_rows(w, rope_heads[meta]) if meta in rope_heads else w
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def write_meta_checkpoint(hf_model: LlamaForCausalLM, case: Case, out_dir) -> None:
    assert meta_ffn_hidden(DIM, case.multiple_of, case.ffn_dim_multiplier) == case.intermediate_size
    params = {
        "dim": DIM, "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_kv_heads": case.n_kv_heads,
        "vocab_size": VOCAB, "multiple_of": case.multiple_of, "norm_eps": NORM_EPS,
        "rope_theta": case.rope_theta, **case.meta_rope,
    }
    if case.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = case.ffn_dim_multiplier
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params))
    state = hf_state_to_meta(hf_model.state_dict(), N_LAYERS, N_HEADS, case.n_kv_heads)
    torch.save(state, out_dir / "consolidated.00.pth")


def hf_logits(hf_model, tokens, attention_mask=None, position_ids=None) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids).logits.float()


def load_ours(ckpt_dir):
    return load_model(ckpt_dir, read_model_args(ckpt_dir))


def random_tokens(seed: int, shape=(2, SEQ)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=g)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case_dirs(request, tmp_path_factory):
    """(case, hf_model, hf_dir, meta_dir) for one case."""
    case = request.param
    hf_model = build_hf_model(case, seed=CASES.index(case))
    root = tmp_path_factory.mktemp(case.name)
    hf_model.save_pretrained(root / "hf")
    write_meta_checkpoint(hf_model, case, root / "meta")
    return case, hf_model, root / "hf", root / "meta"


# --- ours vs HF -----------------------------------------------------------------------------------


def test_scaled_cases_really_change_the_rope(case_dirs):
    """Sanity of the test itself: where a case scales the rope, HF's frequencies differ from the
    unscaled ones, so matching HF checks our scaling."""
    case, hf_model, _, _ = case_dirs
    hd = DIM // N_HEADS
    plain = 1.0 / case.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    hf_inv = hf_model.model.rotary_emb.inv_freq.float()
    if case.hf_rope_scaling is None:
        torch.testing.assert_close(hf_inv, plain)
    else:
        assert ((hf_inv - plain).abs() / plain).max() > 0.5  # some frequency moves by > 50%


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_args_and_rope_frequencies_match_hf(case_dirs, fmt):
    case, hf_model, hf_dir, meta_dir = case_dirs
    d = hf_dir if fmt == "hf" else meta_dir
    assert detect_format(d) == fmt
    args = read_model_args(d)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size) == (
        DIM, N_LAYERS, N_HEADS, case.n_kv_heads, VOCAB)
    assert args.ffn_hidden_dim == case.intermediate_size
    assert args.norm_eps == pytest.approx(NORM_EPS)
    assert args.rope_theta == pytest.approx(case.rope_theta)
    ours = rope_frequencies(args)
    torch.testing.assert_close(ours, hf_model.model.rotary_emb.inv_freq.float(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_logits_match_hf(case_dirs, fmt):
    case, hf_model, hf_dir, meta_dir = case_dirs
    model = load_ours(hf_dir if fmt == "hf" else meta_dir)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tokens = random_tokens(seed=1)
    expected = hf_logits(hf_model, tokens)
    assert expected.abs().max() > 1.0  # logits are not degenerate
    with torch.no_grad():
        got = model(tokens)
    assert got.dtype == torch.float32
    assert max_diff(got, expected) <= TOL_HF


def test_left_padding_matches_hf(case_dirs):
    """Row 0 left-padded by 7 junk tokens, row 1 by 2, row 2 not at all: our pad_lens path vs HF
    with attention_mask + position_ids, and vs each row run alone (unpadded) through HF."""
    case, hf_model, _, meta_dir = case_dirs
    model = load_ours(meta_dir)
    pad = torch.tensor([7, 2, 0])
    tokens = random_tokens(seed=2, shape=(3, SEQ))  # pad slots hold junk: the mask must hide it
    mask = (torch.arange(SEQ)[None, :] >= pad[:, None]).long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = hf_logits(hf_model, tokens, attention_mask=mask, position_ids=position_ids)
    with torch.no_grad():
        got = model(tokens, pad_lens=pad)
    for b, p in enumerate(pad.tolist()):
        assert max_diff(got[b, p:], expected[b, p:]) <= TOL_HF
        alone = hf_logits(hf_model, tokens[b : b + 1, p:])[0]
        assert max_diff(got[b, p:], alone) <= TOL_HF
    assert torch.isfinite(got).all()  # padding slots too: they must not produce NaN


def test_tied_embeddings_hf_format(tmp_path):
    case = CASES[1]
    hf_model = build_hf_model(case, seed=11, tie=True)
    assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    hf_model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert "lm_head.weight" not in saved and "model.embed_tokens.weight" in saved
    args = read_model_args(tmp_path)
    assert args.tie_word_embeddings
    model = load_model(tmp_path, args)
    torch.testing.assert_close(model.output.weight, model.tok_embeddings.weight, rtol=0, atol=0)
    tokens = random_tokens(seed=3)
    with torch.no_grad():
        got = model(tokens)
    assert max_diff(got, hf_logits(hf_model, tokens)) <= TOL_HF


# --- KV cache -------------------------------------------------------------------------------------


def _decode_incrementally(model, tokens, pad_lens=None, prefix=12, chunk=3, max_batch=4, max_seq=64):
    """Prefix, then a chunk of several tokens, then one token at a time, all through the cache."""
    model.setup_caches(max_batch, max_seq)
    try:
        outs = [model(tokens[:, :prefix], 0, pad_lens)]
        outs.append(model(tokens[:, prefix : prefix + chunk], prefix, pad_lens))
        for t in range(prefix + chunk, tokens.shape[1]):
            outs.append(model(tokens[:, t : t + 1], t, pad_lens))
    finally:
        model.clear_caches()
    return torch.cat(outs, dim=1)


@pytest.fixture(scope="module", params=["gqa", "llama3_scaling"])
def cache_model(request, tmp_path_factory):
    case = next(c for c in CASES if c.name == request.param)
    d = tmp_path_factory.mktemp(f"cache_{case.name}") / "meta"
    write_meta_checkpoint(build_hf_model(case, seed=21), case, d)
    return load_ours(d)


def test_kv_cache_matches_full_forward(cache_model):
    model = cache_model
    tokens = random_tokens(seed=4)
    with torch.no_grad():
        full = model(tokens)
        inc = _decode_incrementally(model, tokens)
        again = model(tokens)  # caches cleared: a plain forward is unaffected
    assert all(layer.attention.cache_k is None for layer in model.layers)
    assert max_diff(inc, full) <= TOL_CACHE
    assert max_diff(again, full) == 0.0


def test_kv_cache_with_left_padding(cache_model):
    model = cache_model
    pad = torch.tensor([5, 0])
    tokens = random_tokens(seed=5)
    with torch.no_grad():
        full = model(tokens, pad_lens=pad)
        inc = _decode_incrementally(model, tokens, pad_lens=pad)
        alone = [model(tokens[b : b + 1, p:])[0] for b, p in enumerate(pad.tolist())]
    for b, p in enumerate(pad.tolist()):
        assert max_diff(inc[b, p:], full[b, p:]) <= TOL_CACHE
        # and the padded, cached run equals the row on its own (independent of pad_lens)
        assert max_diff(inc[b, p:], alone[b]) <= TOL_HF
