"""Quantized linears that stand in for the model's nn.Linear / fairscale layers: Int4Linear
(GPTQ layout, our kernels) and NF4Linear (bitsandbytes Linear4bit, QLoRA's double-quantized NF4).

Both keep the LoRA interface of finetune/lora.py: `in_features` / `out_features` (this rank's
share), `tensor_parallel` (None, "column" or "row") and `dequantized_weight()` for merging. Their
weights are frozen (Int4Linear's are buffers, NF4's a bitsandbytes Params4bit without grad);
gradients flow to the input only.
"""
from typing import Optional

import torch
from torch import nn

from llama.errors import LlamaInputError
from llama.parallel import tensor_parallel_kind
from quant.kernels import int4_matmul
from quant.pack import PER_WORD, Int4Weight, dequantize

LAYER_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def parallel_forward(layer: nn.Module, x: torch.Tensor, local) -> torch.Tensor:
    """fairscale's collectives around a local matmul: a column-parallel layer takes the whole
    input (its gradient summed over ranks), a row-parallel one sums its partial outputs."""
    if layer.tensor_parallel == "column":
        from fairscale.nn.model_parallel.mappings import copy_to_model_parallel_region

        return local(copy_to_model_parallel_region(x))
    if layer.tensor_parallel == "row":
        from fairscale.nn.model_parallel.mappings import reduce_from_model_parallel_region

        return reduce_from_model_parallel_region(local(x))
    return local(x)


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

        y = parallel_forward(self, x, local)  # the bias once, after row-parallel partial sums
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

        return parallel_forward(self, x, local)


# --- swapping a loaded model's linears ---------------------------------------------------------


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if isinstance(m, (Int4Linear, NF4Linear))}


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """A transformer block's linears by their LAYER_LINEARS name (attention.wq ...)."""
    return {name: getattr(getattr(block, name.split(".")[0]), name.split(".")[1]) for name in LAYER_LINEARS}


def swap_linears(model: nn.Module, make, device=None) -> list[str]:
    """Replace each transformer block's linears by make(path, linear) (the output layer stays),
    one at a time so the float weights are freed as we go. Returns the replaced paths."""
    done = []
    for i, block in enumerate(model.layers):
        for name in LAYER_LINEARS:
            parent_name, child = name.split(".")
            parent = getattr(block, parent_name)
            path = f"layers.{i}.{name}"
            new = make(path, getattr(parent, child))
            setattr(parent, child, new.to(device) if device is not None else new)
            done.append(path)
    return done


def quantized_layer(path: str, linear: nn.Module, quant: str, group_size: int = 128, device=None) -> nn.Module:
    """The int4 (round-to-nearest; GPTQ needs calibration data: `python -m quant`) or NF4
    (bitsandbytes) replacement of a float linear, on device, split the way it is."""
    from quant.gptq import rtn

    kind = tensor_parallel_kind(linear)
    if quant == "int4":
        check_group_size(path, linear.weight.shape[1], group_size)
        return Int4Linear.from_int4(rtn(linear.weight.detach().float(), group_size), group_size, kind).to(device)
    if quant == "nf4":
        return NF4Linear(linear.weight, kind, compute_dtype=linear.weight.dtype, device=device)
    raise LlamaInputError(f"unknown quant {quant!r}: use none, int4 or nf4")


def quantize_model_(model: nn.Module, quant: str, group_size: int = 128, device=None) -> nn.Module:
    """Quantize every block linear of a float model in place (the output layer stays float)."""
    swap_linears(model, lambda path, linear: quantized_layer(path, linear, quant, group_size, device), device)
    return model


def check_group_size(path: str, in_features: int, group_size: int) -> None:
    if group_size != -1 and (group_size < 1 or in_features % group_size):
        raise LlamaInputError(f"{path}: group size {group_size} does not divide its {in_features} input features "
                              f"(use a divisor such as 32, or -1 for one group per output channel)")
