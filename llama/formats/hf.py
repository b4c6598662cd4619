"""HF transformers' layout: `config.json` + `model.safetensors`, `model-0000X-of-0000N.safetensors`
with an index, or `pytorch_model*.bin`; HF key names, q/k rows permuted for half-rotation RoPE.
Read as Meta names and layout (the layer table's renames and RoPE row rule)."""
import json
from pathlib import Path
from typing import Iterator, Optional

from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.formats.base import Checkpoint, Format, single_part, tokenizer_beside
from llama.formats.tensorfiles import open_tensor_file
from llama.layers import IGNORED_KEYS, hf_to_meta_key, rope_heads


def quantization_config(ckpt_dir) -> Optional[dict]:
    """The GPTQ settings of a quantized HF folder (quantize_config.json, or config.json's
    quantization_config), or None for float weights."""
    d = Path(ckpt_dir)
    for path, pick in ((d / "quantize_config.json", lambda c: c), (d / "config.json", lambda c: c.get("quantization_config"))):
        if path.is_file():
            try:
                found = pick(json.loads(path.read_text()))
            except (json.JSONDecodeError, AttributeError):
                raise LlamaInputError(f"{path}: not valid JSON") from None
            if found:
                return found
    return None


def hf_weight_files(ckpt_dir) -> list[Path]:
    """The weight files of an HF folder (those its index lists, when it has one)."""
    d = Path(ckpt_dir)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise LlamaInputError(f"{index}: not a valid weight index") from None
            files = [d / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise LlamaInputError(f"{f}: listed in {index.name} but missing")
            return files
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "pytorch_model*.bin"):
        files = sorted(d.glob(pattern))
        if files:
            return files
    raise LlamaInputError(f"{d}: config.json found but no *.safetensors or pytorch_model*.bin weights")


def iter_hf_names(ckpt_dir, key_of=hf_to_meta_key) -> Iterator[tuple[Path, object, str, str]]:
    """(weight file, opened file, HF name, Meta key) for every tensor of an HF folder. key_of maps
    an HF name to its key (None for a name to skip or refuse). A name stored twice is refused."""
    seen = {}
    for path in hf_weight_files(ckpt_dir):
        f = open_tensor_file(path)
        for name in f.keys():
            key = key_of(name)
            if key is None:
                if IGNORED_KEYS.search(name):
                    continue
                raise LlamaInputError(f"{path}: unexpected tensor {name}")
            if key in seen:
                raise LlamaInputError(f"{path}: tensor {name} also appears in {seen[key].name}")
            seen[key] = path
            yield path, f, name, key


class HFLayout(Format):
    name = "hf"
    config_file = "config.json"

    def detect(self, d: Path) -> bool:
        return (d / "config.json").is_file()

    def read_args(self, d: Path) -> ModelArgs:
        return ModelArgs.from_hf_config(d / "config.json")

    def open(self, d: Path, parts: int = 1, rank: int = 0) -> Checkpoint:
        if quantization_config(d):
            raise LlamaInputError(f"{d}: holds quantized (GPTQ) weights; load it with quant = int4 "
                                  f"(ft_main.py) or --quant int4 (example.py)")
        args = self.read_args(d)
        tensors = {key: single_part(f, name, key, rope_heads(key, args)) for _, f, name, key in iter_hf_names(d)}
        return Checkpoint(d, self.name, args, tensors, [d / "config.json"] + hf_weight_files(d),
                          tokenizer_beside(d))


HF = HFLayout()
