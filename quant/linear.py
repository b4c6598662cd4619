"""Quantized linears that stand in for the model's nn.Linear / fairscale layers: Int4Linear
(GPTQ layout, our kernels) and NF4Linear (bitsandbytes Linear4bit, QLoRA's double-quantized NF4).

Both keep the LoRA interface of finetune/methods/lora.py: `in_features` / `out_features` (this rank's
share), `tensor_parallel` (None, "column" or "row") and `dequantized_weight()` for merging. Their
weights are frozen (Int4Linear's are buffers, NF4's a bitsandbytes Params4bit without grad);
gradients flow to the input only.
"""
from typing import Optional

import torch
from torch import nn

from llama.errors import LlamaInputError
from llama.loader import block_linears, quantizer, register_quantizer, replace_module
from llama.tp import parallel_forward, tensor_parallel_kind
from quant.kernels import int4_matmul
from quant.pack import PER_WORD, Int4Weight, dequantize
from quant.rtn import rtn


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, run in its dtype as nn.Linear would."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x


class Int4Linear(nn.Module):
    """y = x @ W.T (+ bias) with W held in the GPTQ int4 layout (see quant/pack.py)."""

    def __init__(self, in_features: int, out_features: int, groups: int, group_size: int = 128,
                 bias: bool = False, tensor_parallel: Optional[str] = None, device=None):
        super().__init__()
        if in_features % PER_WORD or out_features % PER_WORD:
            raise LlamaInputError(f"int4 layers need in/out features divisible by {PER_WORD}, got {in_features}x{out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.tensor_parallel = group_size, tensor_parallel
        self.register_buffer("qweight", torch.zeros(in_features // PER_WORD, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // PER_WORD, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._cache: dict = {}

    @classmethod
    def from_int4(cls, w: Int4Weight, group_size: int, tensor_parallel=None, bias=None) -> "Int4Linear":
        layer = cls(w.in_features, w.out_features, w.scales.shape[0], group_size, bias is not None,
                    tensor_parallel, device=w.qweight.device)
        for name, t in w.tensors().items():
            getattr(layer, name).copy_(t)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def int4(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.qzeros, self.scales, self.g_idx, cache=self._cache)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """[out, in] (this rank's share)."""
        return dequantize(self.int4(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        def local(x):
            x = autocast_input(x)
            with torch.autocast(x.device.type, enabled=False):
                return int4_matmul(x, self.int4())

        y = parallel_forward(self.tensor_parallel, x, local)  # the bias once, after row-parallel partial sums
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        """Moves and casts (model.to(device, bf16)) leave the GPTQ tensors' dtypes alone, and
        kernel caches built for the old tensors are dropped. Scales pass through as an int16 view
        of their fp16 bits, which casts skip: never cast there and back (that churn of freed
        copies stayed in the allocator, 0.2 GB on a 7B), while moves, share_memory and to_empty
        still apply."""
        self._buffers["scales"] = self._buffers["scales"].view(torch.int16)
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["scales"] = self._buffers["scales"].view(torch.float16)
        self._cache.clear()
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"tensor_parallel={self.tensor_parallel}")


class NF4Linear(nn.Module):
    """bitsandbytes' Linear4bit (NF4, double quant, blocks of 64) behind our interface."""

    def __init__(self, weight: torch.Tensor, tensor_parallel: Optional[str] = None, compute_dtype=torch.float32,
                 device=None):
        super().__init__()
        import bitsandbytes as bnb

        out_features, in_features = weight.shape
        self.in_features, self.out_features, self.tensor_parallel = in_features, out_features, tensor_parallel
        self.inner = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                                       compress_statistics=True, quant_type="nf4", device="meta")
        # On a CPU with AVX512-BF16, bitsandbytes repacks the weight in place for its bf16 kernel on
        # the first no-grad forward and keeps it so: training after an evaluation then runs on the
        # repacked weight (different numerics; a tensor-parallel step fails in its all-reduce) and
        # dequantized_weight would read the repacked bytes. One layout, the one we quantized to.
        self.inner.support_avx512bf16_for_cpu = False
        self.inner.weight = bnb.nn.Params4bit(weight.detach().to("cpu", torch.float32), requires_grad=False,
                                              quant_type="nf4", compress_statistics=True)
        self.inner.to(device or weight.device)  # quantizes on the move

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        import bitsandbytes as bnb

        w = self.inner.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def local(x):
            x = autocast_input(x)
            self.inner.compute_dtype = x.dtype
            with torch.autocast(x.device.type, enabled=False):
                return self.inner(x)

        return parallel_forward(self.tensor_parallel, x, local)


# --- quantizing a float model's linears ---------------------------------------------------------


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if isinstance(m, (Int4Linear, NF4Linear))}


def int4_linear(path: str, linear: nn.Module, group_size: int = 128, device=None) -> Int4Linear:
    """The round-to-nearest int4 replacement of a float linear, on device, split the way it is
    (GPTQ needs calibration data: `python -m quant`)."""
    check_group_size(path, linear.weight.shape[1], group_size)
    return Int4Linear.from_int4(rtn(linear.weight.detach().float(), group_size), group_size,
                                tensor_parallel_kind(linear)).to(device)


def nf4_linear(path: str, linear: nn.Module, group_size: int = 128, device=None) -> NF4Linear:
    """The bitsandbytes NF4 replacement of a float linear (its own blocks of 64: group_size unused)."""
    return NF4Linear(linear.weight, tensor_parallel_kind(linear), compute_dtype=linear.weight.dtype, device=device)


register_quantizer("int4", int4_linear)
register_quantizer("nf4", nf4_linear)


def quantize_model_(model: nn.Module, quant: str, group_size: int = 128, device=None) -> nn.Module:
    """Quantize every block linear of a float model in place, one at a time so the float weights
    are freed as we go (the output layer stays float)."""
    make = quantizer(quant)
    for i, block in enumerate(model.layers):
        for name, linear in block_linears(block).items():
            replace_module(block, name, make(f"layers.{i}.{name}", linear, group_size, device))
    return model


def check_group_size(path: str, in_features: int, group_size: int) -> None:
    if group_size != -1 and (group_size < 1 or in_features % group_size):
        raise LlamaInputError(f"{path}: group size {group_size} does not divide its {in_features} input features "
                              f"(use a divisor such as 32, or -1 for one group per output channel)")
