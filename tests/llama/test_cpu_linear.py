"""llama.cpu_linear: each path forced by LLAMA_CPU_LINEAR gives F.linear's product; the automatic
choice is calibrated once per shape, keeps the split only when it is clearly faster, and is cached;
a bad LLAMA_CPU_LINEAR is one clear error. References: float64 torch and float32 F.linear."""
import pytest
import torch
import torch.nn.functional as F

import llama.cpu_linear as cpu_linear
from llama.cpu_linear import Linear, linear
from llama.errors import LlamaInputError
from llama.tp import column_linear, row_linear
from tests.utils import CountCalls, num_threads, ref_linear, rel_err

TOL_LINEAR = 1e-6  # relative error of the float32 product against float64


@pytest.fixture
def path(monkeypatch):
    """Set LLAMA_CPU_LINEAR for one test, with an empty cache of choices."""
    monkeypatch.setattr(cpu_linear, "_choices", {})

    def set_path(value: str):
        monkeypatch.setenv(cpu_linear.ENV, value)
    return set_path


def product(x_shape, out_features, threads, seed=0, in_features=40):
    """linear(x, w) under CountCalls with `threads` threads: (y, x, w, calls)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(*x_shape, in_features, generator=g)
    with num_threads(threads), CountCalls() as calls:
        y = linear(x, w)
    return y, x, w, calls


# --- each forced path equals F.linear ----------------------------------------------------------------


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("out_features", [12, 14, 13])  # 14: divisible by 2, not by 3; 13 by neither
@pytest.mark.parametrize("x_shape", [(), (1,), (1, 1), (2,), (1, 3), (3, 1), (5,), (8,), (2, 4)])
def test_forced_split_matches_f_linear(path, threads, out_features, x_shape):
    """LLAMA_CPU_LINEAR=split: 1 to 8 float32 rows go through one bmm over `threads` row blocks when
    out % threads == 0 (F.linear otherwise); either way x @ W.T as float64 and F.linear give it,
    with x's leading shape kept and a contiguous result."""
    path("split")
    y, x, w, calls = product(x_shape, out_features, threads, seed=out_features * 10 + threads)
    divisible = out_features % threads == 0
    assert (calls.count("bmm"), calls.count("linear")) == ((1, 0) if divisible else (0, 1))
    assert y.shape == (*x_shape, out_features) and y.dtype == torch.float32 and y.is_contiguous()
    assert rel_err(y, ref_linear(x, w)) <= TOL_LINEAR
    # two float32 sums of 40 products in different orders: on an AMD EPYC (MKL's GEMV against its
    # batched GEMM) one output of ~0.04 differed by 1.7e-6, so not 1e-6 but a few float32 roundings
    # of the terms (|x_i w_i| up to ~10) apart
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape", [(1,), (8,), (2, 4)])
def test_forced_plain_is_f_linear(path, x_shape):
    path("plain")
    y, x, w, calls = product(x_shape, 16, 2)
    assert calls.count("bmm") == 0 and calls.count("linear") == 1
    assert torch.equal(y, F.linear(x, w))


@pytest.mark.parametrize("x_shape", [(9,), (3, 3), (64,)])
def test_split_is_never_taken_past_gemv_max_rows(path, x_shape):
    path("split")
    y, x, w, calls = product(x_shape, 16, 2)
    assert calls.count("bmm") == 0 and calls.count("linear") == 1
    assert torch.equal(y, F.linear(x, w))


def test_split_is_never_taken_with_one_thread_float64_or_a_strided_weight(path):
    path("split")
    torch.manual_seed(3)
    w, x = torch.randn(16, 40), torch.randn(1, 40)
    for a, b, threads in ((x, w, 1), (x.double(), w.double(), 2), (x, torch.randn(40, 16).T, 2)):
        with num_threads(threads), CountCalls() as calls:
            y = linear(a, b)
        assert calls.count("bmm") == 0 and y.dtype == a.dtype
        assert rel_err(y, ref_linear(a, b)) <= (1e-12 if a.dtype == torch.float64 else TOL_LINEAR)


def test_forced_split_takes_a_strided_row(path):
    path("split")
    torch.manual_seed(1)
    w, x = torch.randn(16, 40), torch.randn(80)[::2]
    assert not x.is_contiguous()
    with num_threads(2), CountCalls() as calls:
        y = linear(x, w)
    assert calls.count("bmm") == 1
    assert rel_err(y, ref_linear(x, w)) <= TOL_LINEAR


@pytest.mark.parametrize("x_shape", [(40,), (1, 1, 40)])
def test_forced_split_gradients_match_f_linear(path, x_shape):
    path("split")
    g = torch.Generator().manual_seed(7)
    w0, x0 = torch.randn(24, 40, generator=g), torch.randn(x_shape, generator=g)
    up = torch.randn(*x_shape[:-1], 24, generator=g)  # upstream gradient
    w, x = w0.clone().requires_grad_(), x0.clone().requires_grad_()
    with num_threads(2), CountCalls() as calls:
        (linear(x, w) * up).sum().backward()
    assert calls.count("bmm") == 1
    w32, x32 = w0.clone().requires_grad_(), x0.clone().requires_grad_()
    (F.linear(x32, w32) * up).sum().backward()
    torch.testing.assert_close(x.grad, x32.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, w32.grad, rtol=1e-6, atol=1e-6)


def test_linear_module_in_one_process(path):
    """column_linear / row_linear give our Linear (no bias) in one process; its forward is `linear`."""
    path("split")
    torch.manual_seed(6)
    col, row = column_linear(40, 24), row_linear(40, 24)
    for layer in (col, row):
        assert isinstance(layer, Linear) and isinstance(layer, torch.nn.Linear)
        assert layer.bias is None and layer.weight.shape == (24, 40)
    x = torch.randn(1, 40)
    with num_threads(2), CountCalls() as calls, torch.no_grad():
        y = col(x)
    assert calls.count("bmm") == 1
    assert rel_err(y, ref_linear(x, col.weight)) <= TOL_LINEAR


# --- auto: calibrated once per shape ------------------------------------------------------------------


def test_auto_calibrates_each_shape_once_and_caches(path, monkeypatch):
    """The first product of a shape times both candidates; later products of it, and of other
    leading shapes with the same rows, reuse the choice. Whichever path it took, the product is
    F.linear's."""
    path("auto")
    seen = []
    real = cpu_linear.calibrate
    monkeypatch.setattr(cpu_linear, "calibrate", lambda *key: seen.append(key) or real(*key))
    for x_shape in [(1,), (1, 1), (1,), (2,), (1, 2)]:
        y, x, w, _ = product(x_shape, 16, 2)
        torch.testing.assert_close(y, F.linear(x, w), rtol=1e-6, atol=1e-6)
    assert seen == [(1, 16, 40, 2), (2, 16, 40, 2)]
    choices = cpu_linear.choices()
    assert set(choices) == {(1, 16, 40, 2), (2, 16, 40, 2)}
    for choice in choices.values():
        assert choice.path in ("split", "plain") and choice.split_us > 0 and choice.plain_us > 0


@pytest.mark.parametrize("split_us, plain_us, expected", [
    (50.0, 100.0, "split"), (90.0, 100.0, "split"),  # 10% faster or more: split
    (95.0, 100.0, "plain"), (100.0, 100.0, "plain"), (200.0, 100.0, "plain"),  # a near tie or slower: F.linear
])
def test_calibration_keeps_the_split_only_when_clearly_faster(monkeypatch, split_us, plain_us, expected):
    """calibrate's rule on given timings (its _call_times replaced: each candidate's calls take the
    given time, but for one split call per round 100x slower, as a descheduled thread's: the
    fastest call ignores it where a mean would not), and the path then taken."""
    per_call = {"plain": plain_us * 1e-6, "split": split_us * 1e-6}

    def call_times(fn, x, w):
        if fn is F.linear:
            return [per_call["plain"]] * 4
        return [per_call["split"]] * 4 + [100 * per_call["split"]]
    monkeypatch.setattr(cpu_linear, "_call_times", call_times)
    choice = cpu_linear.calibrate(1, 16, 40, 2)
    assert (choice.path, choice.split_us, choice.plain_us) == (expected, split_us, plain_us)

    monkeypatch.setattr(cpu_linear, "_choices", {(1, 16, 40, 2): choice})
    monkeypatch.setenv(cpu_linear.ENV, "auto")
    y, x, w, calls = product((1,), 16, 2)
    assert calls.count("bmm") == (expected == "split")
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-6, atol=1e-6)


def test_calibration_times_on_distinct_weight_copies(monkeypatch):
    """Small weights are timed over copies adding up to CALIBRATION_BYTES, so that the timing
    reads memory as a model larger than the caches does; one copy of a weight larger than that."""
    sizes = []
    monkeypatch.setattr(cpu_linear, "_call_times", lambda fn, x, w: sizes.append(tuple(w.shape)) or [1e-6])
    monkeypatch.setattr(cpu_linear, "CALIBRATION_BYTES", 4 * 16 * 40 * 5)
    cpu_linear.calibrate(1, 16, 40, 2)
    assert set(sizes) == {(5, 16, 40)}
    sizes.clear()
    cpu_linear.calibrate(1, 64, 40, 2)  # 4x the budget
    assert set(sizes) == {(1, 64, 40)}


# --- LLAMA_CPU_LINEAR ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [(None, "auto"), ("", "auto"), ("AUTO", "auto"), ("plain", "plain"),
                                             (" split ", "split")])
def test_mode_reads_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(cpu_linear.ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_linear.ENV, value)
    assert cpu_linear.mode() == expected


def test_bad_mode_is_one_clear_error_when_the_model_is_built(monkeypatch):
    monkeypatch.setenv(cpu_linear.ENV, "fast")
    with pytest.raises(LlamaInputError) as e:
        Linear(40, 16)
    assert str(e.value) == "LLAMA_CPU_LINEAR='fast': expected one of auto, plain, split"


def test_auto_compiles_to_one_graph_with_the_choice_as_a_constant(path):
    """Under torch.compile (dynamic, as Llama(compile=True) runs the decode step) the choice is
    calibrated while tracing and taken as a constant: no graph break, F.linear's product, for
    one row and for a symbolic batch of rows (which reuses the one-row choice)."""
    path("auto")
    torch._dynamo.reset()
    torch.manual_seed(9)
    layer = Linear(64, 32)
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)  # fullgraph: a break is an error
    try:
        with num_threads(2), torch.no_grad():
            for x in (torch.randn(1, 1, 64), torch.randn(3, 1, 64), torch.randn(5, 1, 64)):
                torch.testing.assert_close(compiled(x), F.linear(x, layer.weight), rtol=1e-6, atol=1e-6)
    finally:
        torch._dynamo.reset()
    assert set(cpu_linear.choices()) == {(1, 32, 64, 2)}
