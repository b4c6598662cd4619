"""Dequant-matmul for int4 linears: y = x @ W.T with W in the GPTQ layout (see pack.py).

One entry point, `int4_matmul`, picks a path by device, activation dtype and rows M:

    reference  dequantize (pack.dequantize), matmul            any device; tests measure the rest against it
    dequant    dequantize into a shared scratch buffer, matmul  large M: the dequant is paid once per M rows
    cpu_int4   PyTorch's `_weight_int4pack_mm_for_cpu`          CPU, bf16 activations, small M (decode);
                                                                 float32 ones at M <= 4 (its slow loop)
    triton     fused unpack + matmul (triton_int4.py)            CUDA, small M

The weight is frozen; the backward pass gives the input gradient only (what LoRA and prompt
tuning need below a quantized layer), through the same dequantized weight.
"""
from typing import Optional

import torch

from quant.pack import PER_WORD, Int4Weight, dequantize, unpack_cols, unpack_rows

# Rows at or below which the fused kernel / PyTorch's CPU int4 op beat dequantize-then-matmul.
# GPU: decode batches, by design. CPU: where bench/int4_matmul.py put the crossover (its figures
# are in docs/benchmarks.md, "Int4 paths"): bf16 activations take the op up to a few hundred
# rows; float32 ones take its generic loop, which beats dequantizing only for a few rows.
SMALL_M = 16
CPU_OP_MAX_M = 256
CPU_OP_FLOAT32_MAX_M = 4
CPU_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu takes

_scratch: dict[tuple, torch.Tensor] = {}


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer shared by every int4 layer on this device and dtype, grown to the largest layer:
    the dequantized weight of one layer at a time, never of all of them."""
    key = (torch.device(device), dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        _scratch.pop(key, None)
        with torch.inference_mode(False):  # a normal tensor: written to in and out of inference mode
            buf = _scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def cached(w: Int4Weight, name: str, tensors: tuple, build):
    """build(), kept in the layer's cache while `tensors` are the same, unchanged tensors (forms
    derived from the weight are rebuilt only when it is reloaded or moved)."""
    # inference tensors (a layer built under inference_mode) have no version counter
    version = tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors)
    hit = w.cache.get(name)
    if hit is None or hit[0] != version:
        hit = w.cache[name] = (version, build())
    return hit[1]


def contiguous_groups(w: Int4Weight) -> Optional[int]:
    """The group size when g_idx is plain i // group_size with whole groups (no act-order), else
    None. Checked once per layer, not per call (the comparison syncs a GPU)."""
    def check():
        k, groups = w.in_features, w.scales.shape[0]
        if k % groups:
            return None
        size = k // groups
        expected = torch.arange(k, device=w.g_idx.device, dtype=w.g_idx.dtype) // size
        return size if torch.equal(w.g_idx, expected) else None

    return cached(w, "contiguous_groups", (w.g_idx, w.scales), check)


def dequantize_into(w: Int4Weight, dtype: torch.dtype, out: Optional[torch.Tensor] = None,
                    transposed: bool = False) -> torch.Tensor:
    """The float weight W [out, in] (or W.T [in, out] with transposed), into `out` if given.
    Unpacks bytes rather than int32 words (a quarter of the memory traffic) and broadcasts scales
    over whole groups when it can. The layout matters: CPU bf16 matmuls are ~100x slower when the
    second operand is not a transposed row-major matrix, so the forward pass wants W and the
    backward pass W.T."""
    k, n = w.in_features, w.out_features
    b = w.qweight.contiguous().view(torch.uint8).view(k // PER_WORD, n, 4)  # little-endian bytes
    q = torch.stack((b & 0xF, b >> 4), dim=-1)  # [k/8, n, byte, nibble]: feature 8w + 2*byte + nibble
    q = q.permute(0, 2, 3, 1).reshape(k, n) if transposed else q.permute(1, 0, 2, 3).reshape(n, k)
    out = q.to(dtype) if out is None else out.view(q.shape).copy_(q)
    zeros = unpack_cols(w.qzeros).to(dtype) + 1  # [groups, out]
    scales = w.scales.to(dtype)
    size = contiguous_groups(w)
    if size is not None and transposed:
        out.view(k // size, size, n).sub_(zeros.unsqueeze(1)).mul_(scales.unsqueeze(1))
    elif size is not None:
        out.view(n, k // size, size).sub_(zeros.t().unsqueeze(-1)).mul_(scales.t().unsqueeze(-1))
    else:  # act-order: a group per feature, gathered
        g = w.g_idx.long()
        zeros, scales = zeros[g], scales[g]  # [in, out]
        out.sub_(zeros if transposed else zeros.t()).mul_(scales if transposed else scales.t())
    return out


def _reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    return x @ dequantize(w, x.dtype).t()


def _dequant(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    buf = scratch(w.in_features * w.out_features, x.dtype, x.device)
    return x @ dequantize_into(w, x.dtype, out=buf).t()


# --- CPU: PyTorch's int4 op, which dequantizes as (q - 8) * scale + zero with float zeros --------

def cpu_int4_supported(w: Int4Weight) -> bool:
    size = contiguous_groups(w)
    if size is None or w.out_features % 16:  # the op packs output features in pairs of 8
        return False
    return size in CPU_GROUP_SIZES or (w.scales.shape[0] == 1 and w.in_features % 128 == 0)


def cpu_int4_packed(w: Int4Weight) -> torch.Tensor:
    """The op's packed weight [out, in/2] (uint8, a CPU-specific nibble order), built once per
    layer and kept while its tensors are unchanged."""
    def build():
        q = unpack_rows(w.qweight).t().to(torch.int32).contiguous()  # [out, in]
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)

    return cached(w, "cpu_int4_packed", (w.qweight,), build)


def cpu_int4_scales_and_zeros(w: Int4Weight, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """The op's scales_and_zeros [in/group, out, 2] in the activations' dtype (the op takes
    both in one dtype), and its group size. GPTQ's s * (q - z) is the op's (q - 8) * s + zf with
    zf = s * (8 - z); one per-channel group becomes groups of 128."""
    def build():
        size = contiguous_groups(w)
        zeros, scales = unpack_cols(w.qzeros).float() + 1, w.scales.float()
        if size not in CPU_GROUP_SIZES:  # per-channel: repeat the one group's scale over groups of 128
            repeat, size = w.in_features // 128, 128
            zeros, scales = zeros.repeat(repeat, 1), scales.repeat(repeat, 1)
        return torch.stack((scales, scales * (8 - zeros)), dim=-1).to(dtype).contiguous(), size

    return cached(w, f"cpu_int4_scales_and_zeros_{dtype}", (w.qzeros, w.scales, w.g_idx), build)


def _cpu_int4(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """bf16 activations are the fast case; float32 ones take the op's generic loop (3-5x the
    float32 dense time at M=1) with the same packed weight, exact to float32 rounding."""
    if not cpu_int4_supported(w):
        raise ValueError("cpu_int4 needs whole groups of 32-256 in order (no act-order) and out_features % 16 == 0")
    scales_and_zeros, size = cpu_int4_scales_and_zeros(w, x.dtype)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), cpu_int4_packed(w), size, scales_and_zeros)


def _triton(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    from quant.triton_int4 import int4_matmul_triton

    return int4_matmul_triton(x, w)


PATHS = {"reference": _reference, "dequant": _dequant, "cpu_int4": _cpu_int4, "triton": _triton}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_paths(device_type: str) -> list[str]:
    """The paths int4_matmul can take on a device type ("cpu" or "cuda"), the reference first:
    what a check of every path on that device runs (bench/gpu_check.py)."""
    if device_type == "cuda":
        return ["reference", "dequant"] + (["triton"] if triton_available() else [])
    return ["reference", "dequant", "cpu_int4"]


def choose_path(x: torch.Tensor, w: Int4Weight) -> str:
    """x [M, in]: the path int4_matmul takes by default."""
    m = x.shape[0]
    if x.is_cuda:
        return "triton" if m <= SMALL_M and triton_available() else "dequant"
    max_m = {torch.bfloat16: CPU_OP_MAX_M, torch.float32: CPU_OP_FLOAT32_MAX_M}.get(x.dtype, 0)
    if x.device.type == "cpu" and m <= max_m and cpu_int4_supported(w):
        return "cpu_int4"
    return "dequant"


class _Int4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w: Int4Weight, path: str):
        ctx.w = w
        return PATHS[path](x, w)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.w
        buf = scratch(w.in_features * w.out_features, grad.dtype, grad.device)
        return grad @ dequantize_into(w, grad.dtype, out=buf, transposed=True).t(), None, None


def int4_matmul(x: torch.Tensor, w: Int4Weight, path: Optional[str] = None) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype; differentiable in x (the weight is frozen)."""
    x2 = x.reshape(-1, x.shape[-1])
    path = path or choose_path(x2, w)
    y = _Int4Matmul.apply(x2, w, path) if x.requires_grad else PATHS[path](x2, w)
    return y.view(*x.shape[:-1], w.out_features)
