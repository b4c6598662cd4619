"""quant.gptq: round-to-nearest and GPTQ, checked through the test's own unpacker/dequantizer
(tests/utils.py, written from docs/formats.md) and float64 arithmetic:

- rtn: every weight dequantizes to the nearest point of its group's 16-point grid, within half
  a step of the float weight wherever the grid reaches (clamping only at the grid's ends); zero
  points are 1..15 (GPTQ stores zero-1 in 4 bits), 8 in sym mode; min-max scales.
- GPTQ on one linear with correlated inputs (x = z @ M, z with a decaying spectrum, M a random
  mixing, so H = 2 X^T X / n is far from diagonal): lower output error ||X W^T - X Wq^T|| than
  RTN at the same group size, with and without act-order, groups 32 and per-channel; with
  H = I it is RTN exactly (no error to spread); act-order g_idx follows descending diag(H).
- "GPTQ beats RTN on a small model": held-out perplexity of a tiny LLaMA pretrained here.
"""
import math

import pytest
import torch

from llama.formats import save_checkpoint
from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.tiny import random_model
from llama.tokenizers import Tokenizer
from quant.gptq import GPTQ, calibration_tokens, quantize_checkpoint, rtn
from quant.linear import Int4Linear
from quant.pack import dequantize
from tests.utils import TOKENIZER_VOCAB, dequant64, unpack_all

# --- round to nearest -------------------------------------------------------------------------------


def rtn_weight(out_features=24, in_features=128, seed=0) -> torch.Tensor:
    """Gaussian rows of varied scale, plus the awkward groups (for group size 32):
    row 0 group 0 all positive (zero point 0 can't be stored: it becomes 1), row 1 group 1 all
    negative, row 2 all zero (a flat group), row 3 one large outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * (0.01 + 0.1 * torch.rand(out_features, 1, generator=g))
    w[0, :32] = w[0, :32].abs() + 0.01
    w[1, 32:64] = -w[1, 32:64].abs() - 0.01
    w[2] = 0
    w[3, 5] = 1.5
    return w


def check_rtn(w: torch.Tensor, packed, group_size: int, sym: bool) -> dict:
    """Everything docs/formats.md's layout and round-to-nearest imply; returns measurements."""
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    q, zeros, scales, g = unpack_all(packed)
    assert torch.equal(g, torch.arange(in_features) // size)
    assert tuple(zeros.shape) == tuple(scales.shape) == (in_features // size, out_features)
    if sym:
        assert bool((zeros == 8).all())
    else:
        assert int(zeros.min()) >= 1 and int(zeros.max()) <= 15
    W = w.double()
    deq = dequant64(packed)
    s, z = scales[g].t(), zeros[g].t().double()  # per element [out, in]
    # min-max scales: the grid spans the group's range (with 0 inside), to fp16 rounding
    grouped = W.view(out_features, -1, size)
    lo, hi = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    span = torch.maximum(-lo, hi) * 2 if sym else hi - lo
    flat = span == 0
    expect = torch.where(flat, torch.full_like(span, 2 / 15), span / 15).t()  # [G, out]
    assert torch.allclose(scales, expect, rtol=2 ** -10, atol=0)
    # the dequantized weight is the nearest of the group's 16 grid points
    grid = s.unsqueeze(-1) * (torch.arange(16, dtype=torch.float64) - z.unsqueeze(-1))  # [out, in, 16]
    nearest = (W.unsqueeze(-1) - grid).abs().amin(-1)
    err = (W - deq).abs()
    assert bool((err <= nearest + 1e-12).all())
    # within half a step wherever rounding lands inside 0..15 (clamping only at the grid's ends)
    raw = torch.round(W / s) + z
    inside = (raw >= 0) & (raw <= 15)
    assert bool((err[inside] <= s[inside] / 2 * (1 + 1e-9) + 1e-12).all())
    clamped = ~inside
    assert bool((err[clamped] <= s[clamped] * (1 + 1e-3)).all())  # never more than one step past the end
    qt = q.t()
    assert bool(((qt[clamped] == 0) | (qt[clamped] == 15)).all())
    return {"err": err, "step": s, "clamped": clamped, "zeros": zeros}


@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_nearest_grid_point_within_half_step(group_size, sym):
    w = rtn_weight()
    found = check_rtn(w, rtn(w, group_size, sym), group_size, sym)
    # clamping is the exception (the all-positive group's top, sym's positive end), not the rule
    assert found["clamped"].float().mean() < 0.02
    assert torch.equal(dequant64(rtn(w, group_size, sym))[2], torch.zeros(w.shape[1], dtype=torch.float64))
    if not sym and group_size == 32:
        assert int(found["zeros"][0, 0]) == 1  # all positive: zero 0 is not storable, 1 is used
        assert int(found["zeros"][1, 1]) == 15  # all negative: the top of the grid is 0


def test_rtn_matches_the_package_dequantizer():
    w = rtn_weight(seed=1)
    packed = rtn(w, 32)
    assert torch.equal(dequantize(packed, torch.float64), dequant64(packed))


# --- GPTQ on a single linear --------------------------------------------------------------------------

K, N = 128, 64


def correlated_inputs(n: int, seed: int) -> torch.Tensor:
    """x = z @ M: z with a decaying spectrum, M a random mixing (the same M for every seed)."""
    m = torch.randn(K, K, generator=torch.Generator().manual_seed(100)) / K ** 0.5
    spectrum = torch.exp(-torch.arange(K, dtype=torch.float32) / 32)
    return (torch.randn(n, K, generator=torch.Generator().manual_seed(seed)) * spectrum) @ m


@pytest.fixture(scope="module")
def layer():
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(7)) * 0.05
    x = correlated_inputs(1024, seed=1)
    gptq = GPTQ(K)
    gptq.add_batch(x[:400].reshape(8, 50, K))  # 3-d batches, accumulated
    gptq.add_batch(x[400:])
    return w, x, gptq


def out_error(w: torch.Tensor, deq: torch.Tensor, x: torch.Tensor) -> float:
    x, w = x.double(), w.double()
    return float((x @ (w - deq).t()).norm() / (x @ w.t()).norm())


def test_hessian_accumulates_2_xtx_over_n(layer):
    _, x, gptq = layer
    h = 2 * x.double().t() @ x.double() / x.shape[0]
    assert torch.allclose(gptq.H.double(), h, rtol=1e-4, atol=1e-5 * float(h.abs().max()))
    d = h.diagonal().sqrt()
    corr = h / d[:, None] / d[None, :]
    assert float((corr - torch.eye(K, dtype=torch.float64)).abs().mean()) > 0.1  # far from diagonal


@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lower_output_error_than_rtn(layer, group_size, act_order):
    w, x, gptq = layer
    held_out = correlated_inputs(1024, seed=2)
    deq_rtn = dequant64(rtn(w, group_size))
    packed = gptq.quantize(w, group_size, act_order=act_order)
    deq = dequant64(packed)
    q, zeros, scales, g = unpack_all(packed)
    assert int(zeros.min()) >= 1 and int(zeros.max()) <= 15
    assert scales.shape[0] == (1 if group_size == -1 else K // group_size)
    for inputs in (x, held_out):
        e_rtn, e_gptq = out_error(w, deq_rtn, inputs), out_error(w, deq, inputs)
        # measured: rtn 0.078 (g32) / 0.098 (per-channel); gptq 0.032-0.045
        assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)
    # GPTQ trades weight error for output error: its weights are further from W than RTN's
    assert float((deq - w.double()).norm()) > float((deq_rtn - w.double()).norm())


def test_gptq_sym_has_zero_8_and_beats_rtn_sym(layer):
    w, x, gptq = layer
    packed = gptq.quantize(w, 32, sym=True)
    _, zeros, _, _ = unpack_all(packed)
    assert bool((zeros == 8).all())
    assert out_error(w, dequant64(packed), x) < 0.7 * out_error(w, dequant64(rtn(w, 32, sym=True)), x)


@pytest.mark.parametrize("group_size", [32, -1])
def test_gptq_with_identity_hessian_is_rtn(group_size):
    """Uncorrelated unit inputs: H = I, Hinv diagonal, no error to spread: GPTQ is RTN."""
    w = rtn_weight(out_features=16, in_features=K, seed=3)
    gptq = GPTQ(K)
    gptq.add_batch(torch.eye(K) * math.sqrt(K / 2))  # 2 X^T X / n = I
    assert torch.equal(gptq.H, torch.eye(K))
    ours, theirs = gptq.quantize(w, group_size), rtn(w, group_size)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def test_act_order_g_idx_follows_descending_hessian_diagonal(layer):
    w, x, gptq = layer
    packed = gptq.quantize(w, 32, act_order=True)
    g = packed.g_idx.long()
    assert bool((g[1:] < g[:-1]).any())  # not monotonic
    assert torch.equal(torch.bincount(g, minlength=K // 32), torch.full((K // 32,), 32))
    order = torch.argsort(gptq.H.diagonal(), descending=True)
    assert torch.equal(g[order], torch.arange(K) // 32)
    # the act-order layer dequantizes consistently: the test's float64 reading, the package's
    # dequantizer, and an Int4Linear's forward all agree
    deq = dequant64(packed)
    assert torch.equal(dequantize(packed, torch.float64), deq)
    lin = Int4Linear.from_int4(packed, 32)
    assert torch.equal(lin.dequantized_weight(torch.float64), deq)
    xs = x[:40]
    with torch.no_grad():
        y = lin(xs).double()
    ref = xs.double() @ deq.t()
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    # and it is a different quantization from the ordered one (same group sizes, other members)
    ordered = gptq.quantize(w, 32, act_order=False)
    assert not torch.equal(ordered.g_idx, packed.g_idx)


def test_dead_input_columns_quantize_to_zero():
    w = torch.randn(16, K, generator=torch.Generator().manual_seed(4)) * 0.05
    x = correlated_inputs(512, seed=5)
    x[:, [3, 77]] = 0  # inputs never seen: H[i, i] = 0
    gptq = GPTQ(K)
    gptq.add_batch(x)
    for act_order in (False, True):
        deq = dequant64(gptq.quantize(w, 32, act_order=act_order))
        assert bool(torch.isfinite(deq).all())
        assert bool((deq[:, [3, 77]] == 0).all())


def test_calibration_tokens_are_windows_of_the_text(tmp_path, tokenizer_path):
    from llama.tiny import corpus

    tok = Tokenizer(str(tokenizer_path))
    text = "\n".join(corpus(60, seed=3))
    path = tmp_path / "calib.txt"
    path.write_text(text)
    ids = tok.encode(text, bos=True, eos=False)
    calib = calibration_tokens(path, tok, 4, 16)
    assert tuple(calib.shape) == (4, 16)
    starts = []
    for row in calib.tolist():
        found = [i for i in range(len(ids) - 15) if ids[i:i + 16] == row]
        assert found, row
        starts.append(found[0])
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] >= (len(ids) - 16) // 2
    with pytest.raises(LlamaInputError) as e:
        calibration_tokens(path, tok, 4, len(ids))
    assert f"{4 * len(ids):,}" in str(e.value) or str(4 * len(ids)) in str(e.value)


# --- GPTQ beats RTN on a small model: held-out perplexity ------------------------------------------
#
# A dim-64, 2-layer LLaMA pretrained here for 200 steps (about 8 s on one core) on the demo's
# prose (finetune.demo.pretrain_rows, seed 10); calibration text and held-out text are other
# draws of the same generator (seeds 1 and 2), never seen in training or calibration.
#
# Quantization must actually hurt for the comparison to mean anything. A tiny, well-conditioned
# model barely notices 4 bits (measured: per-channel RTN +0.1% perplexity, below the noise of
# which way a small weight perturbation moves a 5k-token perplexity), so the model gets the
# outlier features of real LLMs (LLM.int8, SmoothQuant): 4 residual channels whose RMSNorm gain
# is multiplied by 10 and the matching input columns of wq/wk/wv/w1/w3 divided by 10. The float
# function is unchanged (checked); the quantizers see 10x larger activations in those channels.
#
# Measured (3 model seeds; float ppl 1.78-1.83):
#   per-channel: RTN +1.8..2.0%   GPTQ +0.7..1.4%   GPTQ act-order +0.3..0.6%
#   group 32:    RTN +1.1..1.5%   GPTQ +0.7..1.0%   GPTQ act-order +0.1..0.3%
# Asserted: RTN hurts (> +0.5%) but stays within +5% of float; GPTQ within +2.5%; GPTQ below RTN
# in perplexity per-channel (both orders) and with act-order at group 32, and below RTN in
# KL(float || quantized) everywhere (group 32 without act-order: 0.006 vs 0.009, but its
# perplexity gap, 0.1-0.8%, is too close to the noise to assert).

OUTLIER_GAIN, N_OUTLIERS = 10.0, 4
SEQ = 64


def demo_text(seed: int, n: int) -> str:
    from finetune.demo import pretrain_rows

    return " ".join(r["text"] for r in pretrain_rows(seed=seed, n=n))


def pretrain_tiny(tok: Tokenizer, steps: int = 200, batch: int = 8, seed: int = 0):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=TOKENIZER_VOCAB, multiple_of=32)
    ids = torch.tensor(tok.encode(demo_text(10, 3000), bos=True, eos=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and faster than 2 threads on a busy machine
    try:
        model = random_model(args, seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        for step in range(steps):
            lr = 3e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr
            starts = torch.randint(0, len(ids) - SEQ - 1, (batch,), generator=g)
            x = torch.stack([ids[s:s + SEQ + 1] for s in starts.tolist()])
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def add_outlier_features(model, seed: int = 1) -> None:
    chans = torch.randperm(model.args.dim, generator=torch.Generator().manual_seed(seed))[:N_OUTLIERS]
    with torch.no_grad():
        for block in model.layers:
            block.attention_norm.weight[chans] *= OUTLIER_GAIN
            block.ffn_norm.weight[chans] *= OUTLIER_GAIN
            for lin in (block.attention.wq, block.attention.wk, block.attention.wv,
                        block.feed_forward.w1, block.feed_forward.w3):
                lin.weight[:, chans] /= OUTLIER_GAIN


def nll_and_logprobs(model, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        logp = torch.log_softmax(model(windows[:, :-1]).double(), dim=-1)
    return float(-logp.gather(-1, windows[:, 1:, None]).mean()), logp


def test_gptq_beats_rtn_on_a_small_model(tmp_path, tokenizer_path):
    tok = Tokenizer(str(tokenizer_path))
    model = pretrain_tiny(tok)
    held = torch.tensor(tok.encode(demo_text(2, 400), bos=True, eos=False))
    n = min(len(held) // SEQ, 64)
    windows = held[:n * SEQ].view(n, SEQ)
    nll_plain, _ = nll_and_logprobs(model, windows)
    add_outlier_features(model)
    nll_float, ref = nll_and_logprobs(model, windows)
    assert abs(nll_float - nll_plain) < 1e-4  # the rescaling keeps the float function
    ckpt = tmp_path / "tiny"
    save_checkpoint(model, ckpt)
    (tmp_path / "calib.txt").write_text(demo_text(1, 400))
    calib = calibration_tokens(tmp_path / "calib.txt", tok, 16, SEQ)

    ppl, kl = {"float": math.exp(nll_float)}, {}
    for group_size in (-1, 32):
        for method, act_order in (("rtn", False), ("gptq", False), ("gptq", True)):
            name = f"{method}{'_act' if act_order else ''}_{group_size}"
            q, stats = quantize_checkpoint(ckpt, method, group_size, act_order,
                                           calib=calib if method == "gptq" else None, progress=False)
            assert len([m for m in q.modules() if isinstance(m, Int4Linear)]) == 14
            if method == "gptq":
                assert len(stats) == 14 and all(0 < v < 0.05 for v in stats.values()), stats
            nll, logp = nll_and_logprobs(q, windows)
            ppl[name] = math.exp(nll)
            kl[name] = float((ref.exp() * (ref - logp)).sum(-1).mean())
    print("held-out perplexity:", {k: round(v, 4) for k, v in ppl.items()})
    print("KL(float || quantized):", {k: round(v, 5) for k, v in kl.items()})
    f = ppl["float"]
    for g in (-1, 32):
        assert 1.005 * f < ppl[f"rtn_{g}"] < 1.05 * f, ppl  # quantization hurts, within 5%
        for name in (f"gptq_{g}", f"gptq_act_{g}"):
            assert ppl[name] < 1.025 * f, ppl
            assert kl[name] < kl[f"rtn_{g}"], kl
    assert ppl["gptq_-1"] < ppl["rtn_-1"], ppl
    assert ppl["gptq_act_-1"] < ppl["rtn_-1"], ppl
    assert ppl["gptq_act_32"] < ppl["rtn_32"], ppl
