"""Fused int4 dequant-matmul in Triton for small batches (decode): each program unpacks a
[BLOCK_K, BLOCK_N] tile of the GPTQ-layout weight in registers and multiplies it straight away,
so the weight crosses memory once, at half a byte per value. Reads g_idx per input feature,
so act-order checkpoints and K not a multiple of the group size work unchanged.

Imported only when used (triton is not a dependency of the package); runs on CPU under
TRITON_INTERPRET=1, which is how the tests check it without a GPU."""
import torch
import triton
import triton.language as tl

from quant.pack import Int4Weight


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    zero_shift = (rn % 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        tile_ok = k_ok[:, None] & n_ok[None, :]
        words = tl.load(qweight_ptr + (rk[:, None] // 8) * N + rn[None, :], mask=tile_ok, other=0)
        q = (words >> ((rk[:, None] % 8) * 4)) & 0xF
        g = tl.load(g_idx_ptr + rk, mask=k_ok, other=0)
        scale = tl.load(scales_ptr + g[:, None] * N + rn[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        zero_words = tl.load(qzeros_ptr + g[:, None] * (N // 8) + rn[None, :] // 8, mask=tile_ok, other=0)
        zero = ((zero_words >> zero_shift[None, :]) & 0xF) + 1
        w = ((q - zero).to(tl.float32) * scale).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    y_ok = (rm[:, None] < M) & n_ok[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_ok)


def int4_matmul_triton(x: torch.Tensor, w: Int4Weight, block_n: int = 32, block_k: int = 64) -> torch.Tensor:
    """x [M, K] (float32, fp16 or bf16) -> [M, N] in x's dtype, accumulated in float32."""
    x = x.contiguous()
    m, k = x.shape
    n = w.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16  # tl.dot's smallest tile; decode rows beyond M are masked out
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_matmul_kernel[grid](
        x, w.qweight, w.qzeros, w.scales, w.g_idx, y, m, n, k, x.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
    )
    return y
