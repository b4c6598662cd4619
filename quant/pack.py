"""The GPTQ int4 layout (GPTQ-for-LLaMa / AutoGPTQ), and its reference pack/unpack/dequant.

For a linear layer y = x @ W.T with W [out, in] (nn.Linear orientation):

    qweight  int32 [in/8, out]        eight 4-bit values packed along the input dim,
                                      element j of a word at bits 4j..4j+3 (low nibble first)
    qzeros   int32 [n_groups, out/8]  zero points packed along the output dim, stored as zero-1
    scales   fp16  [n_groups, out]
    g_idx    int32 [in]               group of each input feature (i // group_size, or any
                                      order with act-order)

    W[n, k] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1))
"""
from dataclasses import dataclass, field

import torch

from llama.errors import LlamaInputError

BITS = 4
PER_WORD = 32 // BITS  # values in one int32 word
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """q [K, N] ints in 0..15 -> int32 [K/8, N], packed along dim 0, low nibble first."""
    k, n = q.shape
    if k % PER_WORD:
        raise LlamaInputError(f"cannot pack {k} rows into int32 words of {PER_WORD}")
    q = q.to(torch.int32).view(k // PER_WORD, PER_WORD, n)
    # int32 arithmetic wraps, so the top nibble lands in the sign bit as it does in GPTQ files
    return (q << _SHIFTS.to(q.device).view(1, -1, 1)).sum(dim=1, dtype=torch.int32)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [K/8, N] -> uint8 [K, N] (the inverse of pack_rows)."""
    words, n = packed.shape
    q = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device).view(1, -1, 1)) & 0xF
    return q.to(torch.uint8).reshape(words * PER_WORD, n)


def pack_cols(q: torch.Tensor) -> torch.Tensor:
    """q [G, N] ints in 0..15 -> int32 [G, N/8], packed along dim 1."""
    return pack_rows(q.t()).t().contiguous()


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [G, N/8] -> uint8 [G, N]."""
    return unpack_rows(packed.t()).t()


@dataclass
class Int4Weight:
    """One layer's int4 tensors in the GPTQ layout (shapes in the module docstring)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    # derived forms a kernel builds once and keeps (the owning module passes its own dict)
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * PER_WORD

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """g_idx without act-order: feature i belongs to group i // group_size (-1: one group)."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // size


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def pack(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> Int4Weight:
    """Quantized values q [out, in] (0..15), integer zero points zeros [n_groups, out] (1..15:
    zero 0 cannot be stored as zero-1 in 4 bits), scales [n_groups, out], g_idx [in]."""
    if int(zeros.min()) < 1 or int(zeros.max()) > 15:
        raise ValueError("GPTQ stores zero-1 in 4 bits: zero points must be in 1..15")
    return Int4Weight(
        qweight=pack_rows(q.t()),
        qzeros=pack_cols(zeros.to(torch.int32) - 1),
        scales=scales.to(torch.float16),
        g_idx=g_idx.to(torch.int32),
    )


def dequantize(w: Int4Weight, dtype=torch.float32) -> torch.Tensor:
    """The float weight [out, in] (nn.Linear orientation) of an int4 layer."""
    q = unpack_rows(w.qweight).to(dtype)  # [in, out]
    g = w.g_idx.long()
    zeros = (unpack_cols(w.qzeros).to(dtype) + 1)[g]  # [in, out]
    return ((q - zeros) * w.scales.to(dtype)[g]).t()


def check_int4(w: Int4Weight, where: str) -> None:
    """Shapes and dtypes of a layer read from a file, checked against each other."""
    k8, n = w.qweight.shape
    k = k8 * PER_WORD
    expect = {
        "qweight": (torch.int32, None), "qzeros": (torch.int32, (w.scales.shape[0], n // PER_WORD)),
        "scales": (None, (w.scales.shape[0], n)), "g_idx": (None, (k,)),
    }
    for name, (dtype, shape) in expect.items():
        t = getattr(w, name)
        if dtype is not None and t.dtype != dtype:
            raise LlamaInputError(f"{where}.{name}: dtype {t.dtype}, expected {dtype} (GPTQ int4 layout)")
        if shape is not None and tuple(t.shape) != shape:
            raise LlamaInputError(f"{where}.{name}: shape {tuple(t.shape)}, expected {shape} for qweight {(k8, n)}")
    if w.g_idx.numel() and (int(w.g_idx.min()) < 0 or int(w.g_idx.max()) >= w.scales.shape[0]):
        raise LlamaInputError(f"{where}.g_idx: group numbers outside 0..{w.scales.shape[0] - 1}")
