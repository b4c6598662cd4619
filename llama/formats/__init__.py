"""Checkpoint formats, one reader each behind one interface (`base.Checkpoint`), detected from a
folder's content. Meta's `.pth` shards, ours (the same layout in safetensors) and HF's are built
in; other packages add theirs with `register_format` (quant/ adds GPTQ int4 folders)."""
from llama.formats.base import (
    Checkpoint, Format, Part, TensorEntry, check_shard_count, detect_format, n_shards, open_checkpoint,
    read_model_args, register_format,
)
from llama.formats.hf import HF, hf_weight_files, iter_hf_names, quantization_config
from llama.formats.meta import META
from llama.formats.ours import OURS, save_checkpoint, save_gathered_checkpoint

for _fmt in (HF, OURS, META):
    register_format(_fmt)

__all__ = [
    "Checkpoint", "Format", "Part", "TensorEntry", "check_shard_count", "detect_format", "n_shards",
    "open_checkpoint", "read_model_args", "register_format", "hf_weight_files", "iter_hf_names",
    "quantization_config", "save_checkpoint", "save_gathered_checkpoint", "HF", "META", "OURS",
]
