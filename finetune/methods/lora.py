"""LoRA: base(x) + B(A(dropout(x))) * scaling around any linear layer of the model.

One wrapper serves plain nn.Linear, fairscale's column/row-parallel layers and quantized linears
(anything with a `tensor_parallel` attribute of None, "column" or "row"). Under tensor
parallelism the adapter is split the way its base is, so each rank's share of the delta weight
B @ A lines up with its share of the base weight:

    column-parallel (weight [out/n, in]):  A [r, in] replicated, B [out/n, r] split
    row-parallel    (weight [out, in/n]):  A [r, in/n] split,    B [out, r] replicated

The adapter's parameters stay float32 whatever the base dtype (autocast picks the matmul dtype).
Saved in PEFT's format: A and B under HF's names, B's q/k rows in HF's RoPE order.
"""
import contextlib
import math

import torch
from torch import nn
from torch.nn.utils import skip_init

from llama.distributed import model_parallel_rank, model_parallel_size
from llama.errors import LlamaInputError
from llama.layers import LINEAR_NAMES, meta_to_hf_key, split_dim, to_hf_rows
from llama.peft import PEFT_PREFIX, parse_peft_lora
from llama.tp import gather_split, local_slice, parallel_forward, tensor_parallel_kind
from finetune.methods.base import Method, register_method

_FROM_HF = {hf: ours for ours, hf in LINEAR_NAMES.items()}


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
        self.disabled = False  # the base alone (DPO's reference): see LoRA.reference
        out_local, in_local = base.weight.shape if hasattr(base, "weight") else (base.out_features, base.in_features)
        device = next(iter([*base.parameters(), *base.buffers()]), torch.empty(0)).device
        if device.type == "meta":
            device = torch.device("cpu")
        # skip nn.Linear's own init: its random draws depend on the local (split) shape and would
        # put tensor-parallel ranks' RNG out of step with one process
        self.lora_A = skip_init(nn.Linear, in_local, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = skip_init(nn.Linear, r, out_local, bias=False, device=device, dtype=torch.float32)
        # under tensor parallelism, the dim each is split on (for the gradient norm and gathering on save)
        if self.kind == "column":
            self.lora_B.weight.tp_split_dim = 0
        elif self.kind == "row":
            self.lora_A.weight.tp_split_dim = 1
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
        if self.merged or self.disabled:
            return y
        a = self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))
        # column: the replicated A output feeds a split B, so its gradient is summed over the ranks;
        # row: each rank's A saw only its slice of the input, so the partial products are summed
        a = parallel_forward(self.kind, a)
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
        return list(LINEAR_NAMES)
    names = [targets] if isinstance(targets, str) else list(targets)
    out = []
    for name in names:
        ours = _FROM_HF.get(name, name)
        if ours not in LINEAR_NAMES:
            known = ", ".join(f"{o}/{h}" for o, h in LINEAR_NAMES.items())
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


def load_peft_lora(model: nn.Module, config: dict, tensors: dict, where) -> nn.Module:
    """Put a PEFT LoRA adapter (adapter_config.json as a dict, its tensors) on our model in place,
    so that it computes what PEFT's PeftModel.from_pretrained computes on HF's LlamaForCausalLM
    (which modules, ranks, alphas and whole weights: llama.peft.parse_peft_lora). Under tensor
    parallelism each rank keeps its share. Everything is checked before the model changes."""
    if lora_layers(model):
        raise LlamaInputError(f"{where}: the model already has LoRA layers; load one LoRA adapter onto a plain model")
    args = model.args
    lora = parse_peft_lora(config, tensors, args, where)
    params = dict(model.named_parameters(remove_duplicate=False))
    for meta in lora.whole:
        if meta not in params:
            raise LlamaInputError(f"{where}: modules_to_save replaces {meta_to_hf_key(meta)}, which is quantized in "
                                  "this model; load a float model")
        tied = [n for n, p in params.items() if p is params[meta] and n != meta]
        if tied:
            raise LlamaInputError(f"{where}: modules_to_save replaces {meta_to_hf_key(meta)}, which this model ties "
                                  f"to {tied[0]}; replacing a tied weight is not supported")

    # all checked: change the model
    with torch.no_grad():
        for meta, t in lora.whole.items():
            params[meta].copy_(local_slice(t, split_dim(meta, args)).to(params[meta].dtype))
    for key, pair in lora.pairs.items():
        parent_path, child = key.removesuffix(".weight").rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        layer = LoRALinear(getattr(parent, child), pair.r, pair.alpha, 0.0, pair.rslora)
        setattr(parent, child, layer)
        for weight, t in ((layer.lora_A.weight, pair.a), (layer.lora_B.weight, pair.b)):
            with torch.no_grad():
                weight.copy_(local_slice(t, getattr(weight, "tp_split_dim", None)))
    return model


@register_method
class LoRA(Method):
    name = "lora"
    peft_type = "LORA"
    can_merge = True

    def attach(self, model, cfg, tokenizer):
        apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora)
        return model

    def adapter_tensors(self, model):
        """lora_A / lora_B of every adapted linear under PEFT's HF names, whole; B's q/k rows
        permuted to HF's rotary layout so the adapter fits HF weights."""
        args = model.args
        out = {}
        for path, layer in lora_layers(model).items():
            key = f"{path}.weight"
            hf = meta_to_hf_key(key).removesuffix(".weight")
            a = gather_split(layer.lora_A.weight.detach(), getattr(layer.lora_A.weight, "tp_split_dim", None))
            b = gather_split(layer.lora_B.weight.detach(), getattr(layer.lora_B.weight, "tp_split_dim", None))
            out[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = a
            out[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = to_hf_rows(b, key, args)
        return out

    def peft_config(self, cfg, model):
        return {"peft_type": "LORA", "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
                "lora_dropout": cfg.lora_dropout, "use_rslora": cfg.use_rslora, "bias": "none", "fan_in_fan_out": False,
                "target_modules": [LINEAR_NAMES[t] for t in resolve_targets(cfg.lora_targets)]}

    has_reference = True

    @contextlib.contextmanager
    def reference(self, model):
        """Every LoRA layer passes its base's output through alone (an unmerged adapter only)."""
        layers = list(lora_layers(model).values())
        if any(layer.merged for layer in layers):
            raise RuntimeError("a merged LoRA can't be switched off")
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def load(self, model, config, tensors, where):
        """A PEFT LoRA adapter (ours or PEFT's own) onto `model`, as PEFT would put it on HF's model:
        see load_peft_lora. Refuses, naming the option, what it can't reproduce exactly."""
        return load_peft_lora(model, config, tensors, where)

    def merged_state_dict(self, model, quantized_dtype=torch.bfloat16):
        """A LoRA'd model's weights with each adapter folded into its base weight, under the plain
        model's names (layers.0.attention.wq.weight), in the base dtype. Quantized (int4/NF4) bases
        are dequantized to `quantized_dtype`, so the result is a plain float checkpoint (re-quantize
        it with `python -m quant` if wanted)."""
        quantized = {path: m for path, m in model.named_modules() if hasattr(m, "dequantized_weight")}
        state = {}
        for name, t in model.state_dict().items():
            if ".lora_A." in name or ".lora_B." in name or any(name.startswith(f"{p}.") for p in quantized):
                continue
            state[name.replace(".base.", ".")] = t
        for path, layer in quantized.items():  # one layer at a time onto the host: the GPU never holds a float copy
            state[f"{path.removesuffix('.base')}.weight"] = layer.dequantized_weight(quantized_dtype).cpu()
        for path, layer in lora_layers(model).items():
            key = f"{path}.weight"
            delta = layer.delta_weight().detach().to(state[key].device)
            state[key] = (state[key].float() + delta).to(state[key].dtype)
        return state
