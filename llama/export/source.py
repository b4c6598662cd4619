"""What an exporter writes: any checkpoint we read (Meta in any shards, ours, HF, a GPTQ folder
dequantized), with a LoRA adapter folded in, as Meta-named, Meta-laid-out tensors read one at a
time, the model's hyperparameters and its tokenizer."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.formats import Checkpoint, detect_format
from llama.peft import PeftLoRA, read_peft_lora
from llama.tokenizers import Tokenizer, check_vocab

# the dtype each --outtype writes float tensors in ("auto": as stored)
OUTTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ExportSource:
    ckpt: Checkpoint  # whole, checked, in the model's order
    tokenizer: Optional[Tokenizer]
    lora: Optional[PeftLoRA]  # an adapter to fold in

    @property
    def args(self) -> ModelArgs:
        return self.ckpt.args

    def keys(self) -> list[str]:
        """Meta's keys in the model's order (an output tied to the embedding is listed, marked
        by `tied`)."""
        return list(self.ckpt.tensors)

    def shape(self, key: str) -> tuple:
        return self.ckpt.tensors[key].shape

    def tied(self, key: str) -> bool:
        return self.ckpt.tensors[key].tied_to is not None

    def stored_dtype(self) -> torch.dtype:
        """The dtype most of the weights are stored in ("auto" writes that)."""
        counts: dict = {}
        for t in self.ckpt.tensors.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.nbytes
        return max(counts, key=counts.get)

    def out_dtype(self, outtype: str) -> torch.dtype:
        return self.stored_dtype() if outtype == "auto" else OUTTYPES[outtype]

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor in Meta's layout, its LoRA delta added in float32, cast to dtype."""
        if self.lora is None:
            return self.ckpt.read(key).to(dtype)
        if key in self.lora.whole:
            return self.lora.whole[key].to(dtype)
        t = self.ckpt.read(key)
        pair = self.lora.pairs.get(key)
        if pair is not None:
            t = t.float() + pair.delta_weight()
        return t.to(dtype)

    def close(self) -> None:
        self.ckpt.close()


def open_export_source(ckpt_dir, adapter=None, tokenizer_path=None, need_tokenizer: bool = False) -> ExportSource:
    """Open and check everything an export reads before anything is written."""
    d = Path(ckpt_dir)
    ckpt = open_checked(d)
    tokenizer = open_tokenizer(ckpt, tokenizer_path, need_tokenizer)
    lora = read_peft_lora(adapter, ckpt.args) if adapter else None
    if lora is not None:
        _check_adapter(adapter, lora, ckpt)
    return ExportSource(ckpt, tokenizer, lora)


def open_checked(d: Path) -> Checkpoint:
    """Any checkpoint folder we read, as float tensors, checked against its config."""
    return detect_format(d).open_float(d).check()


def open_tokenizer(ckpt: Checkpoint, tokenizer_path=None, need: bool = False) -> Optional[Tokenizer]:
    """The given tokenizer, else the one beside the weights or in the parent folder, checked
    against the model's vocabulary; None when there is none and none is needed."""
    path = Path(tokenizer_path) if tokenizer_path else ckpt.tokenizer or _parent_tokenizer(ckpt.dir)
    if path is None:
        if need:
            raise LlamaInputError(f"{ckpt.dir}: no tokenizer.model or tokenizer.json here or in the parent folder; "
                                  f"pass --tokenizer_path")
        return None
    tokenizer = Tokenizer(path)
    check_vocab(ckpt.args, tokenizer)
    return tokenizer


def _parent_tokenizer(d: Path) -> Optional[Path]:
    for name in ("tokenizer.model", "tokenizer.json"):
        if (d.parent / name).is_file():
            return d.parent / name
    return None


def _check_adapter(adapter, lora: PeftLoRA, ckpt: Checkpoint) -> None:
    """What a merge can't write: a task head, or a replaced weight another is tied to."""
    if lora.heads:
        raise LlamaInputError(f"{adapter}: holds a task head ({', '.join(lora.heads)}): a classifier, not a language "
                              "model; export its base and keep the adapter")
    for key in lora.whole:
        tied = [k for k, t in ckpt.tensors.items() if key in (k, t.tied_to) and t.tied_to is not None]
        if tied:
            raise LlamaInputError(f"{adapter}: modules_to_save replaces {key}, which this model ties to another "
                                  "weight; replacing a tied weight is not supported")
