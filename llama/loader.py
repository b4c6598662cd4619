"""Any checkpoint -> a Transformer on a device: built on torch's meta device (shapes, no storage),
then each tensor read from the checkpoint, checked against the config and assigned in place, so
loading never holds two copies of the weights. Under tensor parallelism each rank reads its own
shard. The block linears may be quantized on load by a registered quantizer (quant/ registers
int4 and NF4); a folder of quantized weights is loaded by its own format."""
from typing import Callable

import torch
from torch import nn

from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.formats import Checkpoint, detect_format, open_checkpoint
from llama.layers import BLOCK_LINEARS, split_dim
from llama.model import Transformer
from llama.plugins import load_plugins

# quant name -> make(path, float linear, group_size, device) -> its quantized replacement
LINEAR_QUANTIZERS: dict[str, Callable] = {}


def register_quantizer(name: str, make: Callable) -> None:
    LINEAR_QUANTIZERS[name] = make


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skips random initialisers while the model is built on `meta` (the checkpoint replaces every
    weight anyway). `normal_` on a meta tensor (nn.Embedding's init) would otherwise pull in
    torch's Python meta kernels and sympy on first use: ~70 MB of RSS and ~2 s per process."""

    _INITIALISERS = {
        torch.Tensor.normal_, torch.Tensor.uniform_, torch.nn.init.normal_, torch.nn.init.uniform_,
        torch.nn.init.trunc_normal_, torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_,
        torch.nn.init.xavier_uniform_, torch.nn.init.xavier_normal_,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._INITIALISERS:
            tensor = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def model_skeleton(args: ModelArgs) -> Transformer:
    """A Transformer on torch's meta device: every parameter with its shape and no storage, for
    the loader to fill."""
    with torch.device("meta"), _SkipInit():
        return Transformer(args)


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """A transformer block's linears by their module path (attention.wq ...)."""
    return {name: block.get_submodule(name) for name in BLOCK_LINEARS}


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def fill(module: nn.Module, ckpt: Checkpoint, prefix: str, dtype=None, device="cpu", share=(0, 1)) -> None:
    """Give each parameter of `module` (built on meta) the checkpoint tensor `prefix + name`, in
    dtype (None: as stored) on device. share (rank, parts): the checkpoint holds whole tensors
    and this rank takes its part along each one's split dim (already-checked checkpoints only)."""
    rank, parts = share
    state = {}
    for name, p in module.named_parameters():
        key = prefix + name
        if key not in ckpt.tensors:
            raise LlamaInputError(f"{ckpt.dir}: checkpoint lacks tensor {key}")
        t = ckpt.read(key)
        dim = split_dim(key, ckpt.args)
        if parts > 1 and dim is not None:
            t = t.chunk(parts, dim=dim)[rank]
        if tuple(t.shape) != tuple(p.shape):
            raise LlamaInputError(f"{ckpt.tensors[key].path}: tensor {key} has shape {tuple(t.shape)} but the config "
                                  f"implies {tuple(p.shape)}")
        state[name] = t.to(device=device, dtype=dtype or t.dtype)
    module.load_state_dict(state, strict=False, assign=True)


def load_outside_blocks(ckpt: Checkpoint, args: ModelArgs, dtype, device, share=(0, 1)) -> Transformer:
    """A model skeleton with everything outside the blocks (embeddings, final norm, output) read
    from the checkpoint; the blocks stay on meta for the caller to fill one at a time."""
    model = model_skeleton(args)
    fill(model.tok_embeddings, ckpt, "tok_embeddings.", dtype, device, share)
    fill(model.norm, ckpt, "norm.", dtype, device, share)
    output = ckpt.tensors.get("output.weight")
    if output is not None and output.tied_to == "tok_embeddings.weight":
        model.output.weight = model.tok_embeddings.weight
    else:
        fill(model.output, ckpt, "output.", dtype, device, share)
    return model


def load_model(ckpt_dir, args: ModelArgs, dtype=torch.float32, device="cpu", mp_rank: int = 0, mp_size: int = 1,
               quant: str = "none", group_size: int = 128) -> Transformer:
    """The model of any checkpoint we read (Meta, ours, HF; the format is detected), this
    tensor-parallel rank's share of it. quant "int4" (round to nearest, `group_size`) or "nf4"
    quantizes each block's linears as it loads, one block at a time: host memory holds one float
    block, never the float model. A folder of quantized weights (its quantization_config says
    so) loads as it is, with quant "none" or its own kind."""
    fmt = detect_format(ckpt_dir)
    if fmt.quant is not None:
        if quant not in ("none", fmt.quant):  # "none": load it as it is, its own config says what it holds
            raise LlamaInputError(f"{ckpt_dir}: holds GPTQ {fmt.quant} weights, which load as they are "
                                  f"(leave quant out, or say {fmt.quant}), not {quant!r}")
        return fmt.load_model(ckpt_dir, args, dtype, device, mp_rank, mp_size)
    quantize = quantizer(quant)
    ckpt = open_checkpoint(ckpt_dir, mp_size, mp_rank).check(args, mp_size)
    model = load_outside_blocks(ckpt, args, dtype, device)
    for i, block in enumerate(model.layers):
        fill(block, ckpt, f"layers.{i}.", dtype, device if quantize is None else "cpu")
        if quantize is not None:
            for name, linear in block_linears(block).items():
                replace_module(block, name, quantize(f"layers.{i}.{name}", linear, group_size, device))
            block.to(device)
    return model.eval()


def quantizer(quant: str):
    """The registered quantizer for `quant`, or None for "none"."""
    if quant == "none":
        return None
    load_plugins()
    if quant not in LINEAR_QUANTIZERS:
        if not LINEAR_QUANTIZERS:
            raise LlamaInputError(f"quant = {quant!r} needs the quant package (pip install -e . registers it)")
        raise LlamaInputError(f"unknown quant {quant!r}: use none, {', '.join(LINEAR_QUANTIZERS)}")
    return LINEAR_QUANTIZERS[quant]
