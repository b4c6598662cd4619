"""LoRA: base(x) + B(A(dropout(x))) * scaling around any linear layer of the model.

One wrapper serves plain nn.Linear, fairscale's column/row-parallel layers and quantized linears
(anything with a `tensor_parallel` attribute of None, "column" or "row"). Under tensor
parallelism the adapter is split the way its base is, so each rank's share of the delta weight
B @ A lines up with its share of the base weight:

    column-parallel (weight [out/n, in]):  A [r, in] replicated, B [out/n, r] split
    row-parallel    (weight [out, in/n]):  A [r, in/n] split,    B [out, r] replicated

The adapter's parameters stay float32 whatever the base dtype (autocast picks the matmul dtype).
"""
import math

import torch
from torch import nn
from torch.nn.utils import skip_init

from llama.errors import LlamaInputError
from llama.parallel import model_parallel_rank, model_parallel_size, tensor_parallel_kind

# our module names and the HF names users know them by (PEFT's target_modules)
TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_FROM_HF = {hf: ours for ours, hf in TARGETS.items()}


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r < 1:
            raise LlamaInputError(f"lora_r must be at least 1, got {r}")
        self.base = base
        self.kind = tensor_parallel_kind(base)
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        out_local, in_local = base.weight.shape if hasattr(base, "weight") else (base.out_features, base.in_features)
        device = next(iter([*base.parameters(), *base.buffers()]), torch.empty(0)).device
        if device.type == "meta":
            device = torch.device("cpu")
        # skip nn.Linear's own init: its random draws depend on the local (split) shape and would
        # put tensor-parallel ranks' RNG out of step with one process
        self.lora_A = skip_init(nn.Linear, in_local, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = skip_init(nn.Linear, r, out_local, bias=False, device=device, dtype=torch.float32)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PEFT's init: A Kaiming-uniform on the full (unsplit) input width, B zeros, so a new
        adapter changes nothing. Every rank draws the full A from the same seed and keeps its
        slice, so a split run starts from the same adapter as one process."""
        full_in = self.lora_A.in_features * (model_parallel_size() if self.kind == "row" else 1)
        full_a = torch.empty(self.r, full_in, device=self.lora_A.weight.device)
        nn.init.kaiming_uniform_(full_a, a=math.sqrt(5))
        if self.kind == "row":
            full_a = full_a.chunk(model_parallel_size(), dim=1)[model_parallel_rank()]
        with torch.no_grad():
            self.lora_A.weight.copy_(full_a)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in (or in/n for a row-parallel base)] -> [..., out (or out/n for column)]."""
        y = self.base(x)
        if self.merged:
            return y
        a = self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))
        if self.kind == "column":
            # replicated A output feeds a split B: sum its gradient over the ranks in backward
            from fairscale.nn.model_parallel.mappings import copy_to_model_parallel_region

            a = copy_to_model_parallel_region(a)
        elif self.kind == "row":
            # each rank's A saw only its slice of the input: sum the partial products
            from fairscale.nn.model_parallel.mappings import reduce_from_model_parallel_region

            a = reduce_from_model_parallel_region(a)
        return y + (self.lora_B(a) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling, shaped like this rank's base weight [out_local, in_local] (float32)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into a float base weight (quantized bases export instead)."""
        if not hasattr(self.base, "weight") or not self.base.weight.is_floating_point():
            raise LlamaInputError("a LoRA on a quantized base can't be merged in place; export it (merge = true) instead")
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def resolve_targets(targets) -> list[str]:
    """'all-linear', or names in ours (wq) or HF's (q_proj) spelling -> our module names."""
    if targets == "all-linear" or targets == ["all-linear"]:
        return list(TARGETS)
    names = [targets] if isinstance(targets, str) else list(targets)
    out = []
    for name in names:
        ours = _FROM_HF.get(name, name)
        if ours not in TARGETS:
            known = ", ".join(f"{o}/{h}" for o, h in TARGETS.items())
            raise LlamaInputError(f"unknown LoRA target {name!r}; use all-linear or some of {known}")
        out.append(ours)
    return out


def apply_lora(model: nn.Module, targets, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> list[str]:
    """Wrap the target linears of every transformer block in LoRALinear, in place.
    Returns the wrapped module paths (e.g. layers.0.attention.wq)."""
    wanted = set(resolve_targets(targets))
    wrapped = []
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in wanted and not isinstance(child, LoRALinear) and ".layers." in f".{path}.":
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout, rslora))
                wrapped.append(f"{path}.{child_name}")
    if not wrapped:
        raise LlamaInputError(f"no module of the model matches LoRA targets {targets!r}")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_merged(model: nn.Module, merged: bool) -> None:
    for layer in lora_layers(model).values():
        layer.merge() if merged else layer.unmerge()
