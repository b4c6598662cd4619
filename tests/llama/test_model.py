"""Our model, loaded through `llama.loader`, against HF transformers' LlamaForCausalLM.

Each case builds a tiny random HF model, saves it in HF format (safetensors) and, with the
tests' own converter (tests/utils.py, written from docs/formats.md, not from our loader), in Meta
format (`params.json` + `consolidated.00.pth`). Both folders are loaded with our loader and their
logits compared to HF's. The KV-cache tests compare incremental decoding to a full forward.
"""
import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from llama.formats import detect_format, read_model_args  # noqa: E402
from llama.loader import load_model  # noqa: E402
from llama.model import rope_frequencies  # noqa: E402
from tests.utils import (  # noqa: E402
    CASES, DIM, N_HEADS, N_LAYERS, NORM_EPS, SEQ, TOL_CACHE, VOCAB, build_hf_model, load_ours, max_diff,
    random_tokens, write_meta_checkpoint,
)

TOL_HF = 1e-4  # ours vs HF, float32


# --- HF's logits (the cases, the HF model builder and the Meta writer are in tests/utils.py) ------


def hf_logits(hf_model, tokens, attention_mask=None, position_ids=None) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids).logits.float()


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
    assert detect_format(d).name == fmt
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
