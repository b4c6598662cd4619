"""quant.kernels.int4_matmul (every path) and quant.linear.Int4Linear against float64 references
built from the tests' own GPTQ-layout packer (tests/utils.py):

    reference     y_ref = x.double() @ W64.T, W64 the float64 dequantized weight
    float32 paths (reference, dequant, cpu_int4, triton under TRITON_INTERPRET=1):
                  ||y - y_ref|| / ||y_ref|| <= 1e-5
    cpu_int4      also with bf16 activations, its fast case: judged against the error of a bf16
                  dense matmul on the same inputs (err_int4 <= 1.5 * err_bf16_dense + 5e-4)
    backward      input gradient = autograd through x @ W.T with the float weight (<= 1e-5 in float32)

The Triton kernel runs in a subprocess with TRITON_INTERPRET=1 set before triton is imported
(another test module may already have imported triton in this pytest process)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant import kernels
from quant.kernels import choose_path, cpu_int4_supported, int4_matmul
from quant.linear import Int4Linear
from tests.utils import ROOT, random_layer

# (in, out, group_size, act_order)
CASES = {
    "g64": (128, 64, 64, False),
    "g128": (256, 96, 128, False),
    "ragged_K200_g64": (200, 48, 64, False),  # K not a multiple of the group size
    "act_order_g32": (256, 64, 32, True),
    "per_channel": (128, 48, -1, False),
}
CPU_INT4_CASES = ("g64", "g128", "per_channel")  # contiguous groups the CPU op takes
MS = (1, 7, 64)
FLOAT32_TOL = 1e-5  # the issue asks 1e-3; float32 rounding gives ~3e-7, and a stray bf16 cast ~1e-3
GRAD_TOL = 1e-5
BF16_SLACK = 5e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def layer(name: str, seed: int = 0):
    k, n, gs, act = CASES[name]
    _, _, w, w64 = random_layer(k, n, gs, act, seed=seed)
    return w, w64


def inputs(m: int, k: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- forward ----------------------------------------------------------------------------------


FLOAT32_PATHS = [(name, path) for name in CASES for path in ("reference", "dequant")] + \
    [(name, "cpu_int4") for name in CPU_INT4_CASES]  # float32 through the CPU op: its slow loop, never chosen


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("name,path", FLOAT32_PATHS)
def test_float32_paths_match_float64_reference(name, path, m):
    w, w64 = layer(name)
    x = inputs(m, w.in_features, seed=m)
    y = int4_matmul(x, w, path=path)
    assert y.dtype == torch.float32 and y.shape == (m, w.out_features)
    err = rel(y, x.double() @ w64.t())
    print(f"ERR forward {path} {name} M={m}: {err:.3e}")
    assert err <= FLOAT32_TOL


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("name", CPU_INT4_CASES)
def test_cpu_int4_bf16_within_bf16_dense_error(name, m):
    w, w64 = layer(name)
    assert cpu_int4_supported(w)
    x = inputs(m, w.in_features, seed=10 + m, dtype=torch.bfloat16)
    ref = x.double() @ w64.t()
    y = int4_matmul(x, w, path="cpu_int4")
    assert y.dtype == torch.bfloat16 and y.shape == (m, w.out_features)
    err = rel(y, ref)
    err_dense = rel(x @ w64.to(torch.bfloat16).t(), ref)
    print(f"ERR forward cpu_int4 {name} M={m}: {err:.3e} (bf16 dense {err_dense:.3e})")
    assert err <= 1.5 * err_dense + BF16_SLACK
    # the weights it builds once are reused (a second call hits the cache, same result)
    assert torch.equal(int4_matmul(x, w, path="cpu_int4"), y)


@pytest.mark.parametrize("name", ["act_order_g32", "ragged_K200_g64"])
def test_cpu_int4_not_offered_without_contiguous_groups(name):
    w, _ = layer(name)
    assert not cpu_int4_supported(w)
    assert choose_path(inputs(1, w.in_features, dtype=torch.bfloat16), w) == "dequant"


def test_choose_path():
    w, w64 = layer("g64")
    k = w.in_features
    assert choose_path(inputs(1, k, dtype=torch.bfloat16), w) == "cpu_int4"
    assert choose_path(inputs(256, k, dtype=torch.bfloat16), w) == "cpu_int4"
    assert choose_path(inputs(257, k, dtype=torch.bfloat16), w) == "dequant"
    # float32 activations: the op's generic loop beats dequantizing only for a few rows
    assert choose_path(inputs(1, k), w) == "cpu_int4"
    assert choose_path(inputs(4, k), w) == "cpu_int4"
    assert choose_path(inputs(5, k), w) == "dequant"
    assert choose_path(inputs(1, k, dtype=torch.float16), w) == "dequant"
    wc, _ = layer("per_channel")
    assert choose_path(inputs(1, wc.in_features, dtype=torch.bfloat16), wc) == "cpu_int4"
    # the default path is the chosen one
    x = inputs(3, k, dtype=torch.bfloat16)
    assert torch.equal(int4_matmul(x, w), int4_matmul(x, w, path="cpu_int4"))
    x = inputs(5, k)
    assert torch.equal(int4_matmul(x, w), int4_matmul(x, w, path="dequant"))


def test_cpu_int4_one_layer_in_float32_and_bf16():
    """The op's packed weight is shared by both dtypes, its scales cached per dtype: alternating
    dtypes on one layer gives each its own right answer."""
    w, w64 = layer("g128")
    x = inputs(1, w.in_features, seed=5)
    ref = x.double() @ w64.t()
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        y = int4_matmul(x.to(dtype), w, path="cpu_int4")
        assert y.dtype == dtype
        assert rel(y, ref) <= (FLOAT32_TOL if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leading_dims(dtype):
    """x [..., in] -> [..., out], row by row the same as the 2-D call."""
    w, w64 = layer("g64")
    x = torch.randn(2, 3, w.in_features, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = int4_matmul(x, w)
    assert y.shape == (2, 3, w.out_features) and y.dtype == dtype
    assert torch.equal(y.reshape(6, -1), int4_matmul(x.reshape(6, -1), w))
    err = rel(y, x.double() @ w64.t())
    assert err <= (FLOAT32_TOL if dtype == torch.float32 else 1e-2)


def test_bf16_decode_with_out_features_not_multiple_of_16():
    """Int4Linear accepts out_features divisible by 8 (e.g. 40); bf16 decode must still work."""
    _, _, w, w64 = random_layer(128, 40, 64, seed=6)
    x = inputs(1, 128, dtype=torch.bfloat16)
    ref = x.double() @ w64.t()
    y = int4_matmul(x, w)
    assert rel(y, ref) <= 1.5 * rel(x @ w64.to(torch.bfloat16).t(), ref) + BF16_SLACK


# --- backward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("m", (1, 64))
@pytest.mark.parametrize("path", ["reference", "dequant"])  # every path's backward is the same
@pytest.mark.parametrize("name", CASES)
def test_input_gradient_float32(name, path, m):
    w, w64 = layer(name)
    x = inputs(m, w.in_features, seed=20 + m).requires_grad_()
    gy = torch.randn(m, w.out_features, generator=torch.Generator().manual_seed(21))
    y = int4_matmul(x, w, path=path)
    y.backward(gy)
    x_ref = x.detach().clone().requires_grad_()
    (x_ref @ w64.float().t()).backward(gy)  # W64 in float32 is exact (|q - z| * fp16 scale)
    err = rel(x.grad, x_ref.grad)
    print(f"ERR grad {path} {name} M={m}: {err:.3e}")
    assert err <= GRAD_TOL
    assert rel(x.grad, gy.double() @ w64) <= GRAD_TOL
    assert rel(y, x.detach().double() @ w64.t()) <= FLOAT32_TOL


@pytest.mark.parametrize("m", (1, 7))
@pytest.mark.parametrize("name", CPU_INT4_CASES)
def test_input_gradient_cpu_int4_bf16(name, m):
    """bf16 activations through cpu_int4: the backward runs in bf16 too; judged against the float64
    gradient with the error of bf16 dense autograd as the yardstick."""
    w, w64 = layer(name)
    x = inputs(m, w.in_features, seed=30 + m, dtype=torch.bfloat16).requires_grad_()
    gy = torch.randn(m, w.out_features, generator=torch.Generator().manual_seed(31)).to(torch.bfloat16)
    assert choose_path(x.detach(), w) == "cpu_int4"
    int4_matmul(x, w).backward(gy)
    assert x.grad.dtype == torch.bfloat16
    x_ref = x.detach().clone().requires_grad_()
    (x_ref @ w64.to(torch.bfloat16).t()).backward(gy)
    exact = gy.double() @ w64
    err, err_dense = rel(x.grad, exact), rel(x_ref.grad, exact)
    print(f"ERR grad cpu_int4 {name} M={m}: {err:.3e} (bf16 dense {err_dense:.3e})")
    assert err <= 1.5 * err_dense + BF16_SLACK


def test_backward_through_two_layers_sharing_the_scratch_buffer():
    """The dequant path and the backward pass reuse one scratch buffer per dtype; two chained layers
    of different sizes (the buffer regrows in between) still give exact forward and input gradient."""
    _, _, w1, w1_64 = random_layer(64, 128, 32, seed=40)
    _, _, w2, w2_64 = random_layer(128, 256, 64, act_order=True, seed=41)
    x = inputs(64, 64, seed=42).requires_grad_()
    gy = torch.randn(64, 256, generator=torch.Generator().manual_seed(43))
    y = int4_matmul(torch.tanh(int4_matmul(x, w1)), w2)
    y.backward(gy)
    x_ref = x.detach().double().requires_grad_()
    y_ref = torch.tanh(x_ref @ w1_64.t()) @ w2_64.t()
    y_ref.backward(gy.double())
    assert rel(y, y_ref) <= FLOAT32_TOL
    err = rel(x.grad, x_ref.grad)
    print(f"ERR grad two layers: {err:.3e}")
    assert err <= 1e-5


# --- Triton, under the interpreter in a subprocess ---------------------------------------------

TRITON_SCRIPT = textwrap.dedent("""
    import os, json, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from quant.kernels import int4_matmul
    from tests.utils import random_layer

    def rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm()).item()

    cases = {  # (in, out, group_size, act_order); out 40 is not a multiple of the kernel's BLOCK_N
        "g64": (128, 64, 64, False),
        "ragged_K200_g64": (200, 40, 64, False),
        "act_order_g32": (128, 32, 32, True),
        "per_channel": (96, 16, -1, False),
    }
    out = {}
    for name, (k, n, gs, act) in cases.items():
        _, _, w, w64 = random_layer(k, n, gs, act, seed=7)
        for m in (1, 7, 17):  # 17 rows: two BLOCK_M tiles
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).requires_grad_()
            y = int4_matmul(x, w, path="triton")
            assert y.dtype == torch.float32 and y.shape == (m, n)
            gy = torch.randn(m, n, generator=torch.Generator().manual_seed(100 + m))
            y.backward(gy)
            out[f"{name} M={m}"] = {"forward": rel(y, x.detach().double() @ w64.t()),
                                    "grad": rel(x.grad, gy.double() @ w64)}
    print("RESULT " + json.dumps(out))
""")


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT "):])
    assert len(results) == 12
    for case, errs in results.items():
        print(f"ERR triton {case}: forward {errs['forward']:.3e} grad {errs['grad']:.3e}")
    bad = {c: e for c, e in results.items() if not (e["forward"] <= FLOAT32_TOL and e["grad"] <= GRAD_TOL)}
    assert not bad, bad


# --- Int4Linear -------------------------------------------------------------------------------


def int4_linear(name: str, bias: bool = True, seed: int = 0):
    k, n, gs, act = CASES[name]
    _, _, w, w64 = random_layer(k, n, gs, act, seed=seed)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed)) if bias else None
    return Int4Linear.from_int4(w, gs, bias=b), w64, b


@pytest.mark.parametrize("m", (1, 64))
@pytest.mark.parametrize("name", ["g64", "act_order_g32", "per_channel"])
def test_int4_linear_forward_equals_f_linear(name, m):
    lin, w64, b = int4_linear(name)
    assert torch.equal(lin.dequantized_weight(torch.float64), w64)
    assert torch.equal(lin.dequantized_weight(), w64.float())
    x = inputs(m, lin.in_features, seed=50 + m)
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (m, lin.out_features)
    err = rel(y, F.linear(x, lin.dequantized_weight(), b))
    assert err <= 1e-6
    assert rel(y, x.double() @ w64.t() + b.double()) <= FLOAT32_TOL
    assert not any(p.requires_grad for p in lin.parameters())


@pytest.mark.parametrize("m", (1, 64))  # 1: cpu_int4, 64: dequant in bf16
def test_int4_linear_under_autocast_is_bf16_like_nn_linear(m):
    lin, w64, b = int4_linear("g64")
    dense = nn.Linear(lin.in_features, lin.out_features)
    with torch.no_grad():
        dense.weight.copy_(w64.float())
        dense.bias.copy_(b)
    x = inputs(m, lin.in_features, seed=60 + m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_dense = lin(x), dense(x)
    assert y_dense.dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16 and y.shape == (m, lin.out_features)
    ref = x.double() @ w64.t() + b.double()
    err, err_dense = rel(y, ref), rel(y_dense, ref)
    print(f"ERR Int4Linear autocast bf16 M={m}: {err:.3e} (nn.Linear bf16 {err_dense:.3e})")
    assert err <= 1.5 * err_dense + BF16_SLACK


@pytest.mark.parametrize("dtype,m", [(torch.float32, 64), (torch.float32, 1), (torch.bfloat16, 1)])
def test_int4_linear_inference_mode_then_training(monkeypatch, dtype, m):
    """Regression: a forward under torch.inference_mode() first (the shared scratch buffer and the
    cpu_int4 weights are created there), then a grad-enabled forward/backward on the same layer."""
    monkeypatch.setattr(kernels, "_scratch", {})  # the buffer must be born inside inference mode
    lin, w64, b = int4_linear("g64", bias=False)
    x = inputs(m, lin.in_features, seed=70 + m, dtype=dtype)
    with torch.inference_mode():
        y0 = lin(x)
    ref = x.double() @ w64.t()
    tol = FLOAT32_TOL if dtype == torch.float32 else 1.5 * rel(x @ w64.to(dtype).t(), ref) + BF16_SLACK
    assert rel(y0, ref) <= tol
    xg = x.clone().requires_grad_()
    gy = torch.randn(m, lin.out_features, generator=torch.Generator().manual_seed(71)).to(dtype)
    y = lin(xg)
    y.backward(gy)
    assert rel(y, ref) <= tol
    exact = gy.double() @ w64
    if dtype == torch.float32:
        assert rel(xg.grad, exact) <= GRAD_TOL
    else:
        assert rel(xg.grad, exact) <= 1.5 * rel(gy @ w64.to(dtype), exact) + BF16_SLACK
    with torch.inference_mode():  # and back again
        assert torch.equal(lin(x), y0)


def test_int4_linear_built_under_inference_mode_bf16_decode():
    with torch.inference_mode():
        lin, w64, _ = int4_linear("g64", bias=False)
        x = inputs(1, lin.in_features, dtype=torch.bfloat16)
        y = lin(x)
    ref = x.double() @ w64.t()
    assert rel(y, ref) <= 1.5 * rel(x @ w64.to(torch.bfloat16).t(), ref) + BF16_SLACK


def test_int4_linear_casts_and_moves_keep_the_gptq_tensors():
    """model.to(bf16) / .half() / .float() leave qweight, qzeros, g_idx and the fp16 scales
    bit-exact (casting the scales to bf16 and back, as the layer once did, rounds them to bf16's
    8 bits); share_memory and to_empty reach the scales too; the product stays the same."""
    layer, _, _ = int4_linear("g64", bias=False)  # a float bias is cast like any buffer
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = inputs(3, layer.in_features, seed=9)
    y = layer(x)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(layer)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(layer, name), before[name]) and getattr(layer, name).dtype == before[name].dtype
    assert list(layer.state_dict()) == list(before)
    assert torch.equal(layer(x), y)
    layer.share_memory()
    assert layer.scales.is_shared() and layer.qweight.is_shared()
    with torch.device("meta"):
        empty = Int4Linear(layer.in_features, layer.out_features, layer.scales.shape[0], 64)
    empty.to_empty(device="cpu")
    assert empty.scales.device.type == "cpu" and empty.scales.dtype == torch.float16


def test_available_paths_per_device():
    """What bench/gpu_check.py runs on each device: every path choose_path can take there, and
    the reference. Triton is offered on CUDA only, where it is installed."""
    from quant.kernels import available_paths, triton_available

    assert kernels.available_paths("cpu") == ["reference", "dequant", "cpu_int4"]
    assert available_paths("cuda") == ["reference", "dequant"] + (["triton"] if triton_available() else [])
    w, _ = layer("g64")
    for m, dtype in ((1, torch.bfloat16), (300, torch.bfloat16), (5, torch.float32)):
        assert choose_path(inputs(m, w.in_features, dtype=dtype), w) in available_paths("cpu")
