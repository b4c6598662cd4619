"""The fine-tuning method protocol and the registry of methods by name.

A method says what it adds to the frozen model (attach), which tensors it trains and saves (in
PEFT's format with HF names, or as a full checkpoint), the PEFT config that describes them, how a
saved one is loaded back onto a model, whether it merges into the base, and the folder its final
output goes to. A new method is one subclass in this package, registered with `register_method`.
"""
from typing import Optional

import torch
from torch import nn

from llama.errors import LlamaInputError
from llama.model import Transformer


class Method:
    name: str = ""
    peft_type: Optional[str] = None  # PEFT's name for the adapter it saves; None: saves the model itself
    trains_base: bool = False  # trains the base's own weights (so the base can't be quantized)
    packs: bool = True  # trains on rows packed with several samples
    can_merge: bool = False  # merged_state_dict folds it into the base weights
    output_dir: str = "adapter"  # the folder of the final output in out_dir
    has_reference: bool = False  # reference() gives the model without the method (DPO's reference for free)

    def attach(self, model: Transformer, cfg, tokenizer) -> nn.Module:
        """Add the trainable part to a frozen model (in place); returns the model to train (the
        same one, or a wrapper around it with `.model`). Trainable parameters are float32."""
        raise NotImplementedError

    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What it trained, whole (gathered from tensor-parallel ranks), under PEFT's names."""
        raise NotImplementedError

    def peft_config(self, cfg, model: nn.Module) -> dict:
        """The method's part of adapter_config.json."""
        raise NotImplementedError

    def load(self, model: Transformer, config: dict, tensors: dict, where) -> nn.Module:
        """Put a saved adapter (its adapter_config.json and tensors) on a loaded model; returns the
        model to run (this rank's share under tensor parallelism)."""
        raise NotImplementedError

    def reference(self, model: nn.Module):
        """A context manager under which `model` (what attach returned) computes what the base
        did before the method was attached: DPO's reference model, with no second copy."""
        raise NotImplementedError

    def merged_state_dict(self, model: nn.Module, quantized_dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
        """The base weights with the method folded in, under the plain model's names."""
        raise NotImplementedError


METHODS: dict[str, Method] = {}


def register_method(cls: type) -> type:
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LlamaInputError(f"method = {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]


def method_for_peft_type(peft_type, where) -> Method:
    """The method that loads a PEFT adapter of this type."""
    for method in METHODS.values():
        if method.peft_type is not None and method.peft_type == peft_type:
            return method
    known = ", ".join(m.peft_type for m in METHODS.values() if m.peft_type)
    raise LlamaInputError(f"{where}: adapter type {peft_type!r} is not supported ({known})")


def base_transformer(model: nn.Module) -> Transformer:
    """The Transformer inside a method's wrapper (or the model itself)."""
    while not isinstance(model, Transformer):
        model = model.model
    return model
