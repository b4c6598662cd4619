"""The HF transformers layout: config.json (model_type llama, rope_scaling, bos/eos,
max_position_embeddings), generation_config.json, safetensors under HF's names with q/k rows in
HF's RoPE order (the layer table's row rule), sharded with an index above `max_shard_bytes`, and
the tokenizer files (llama/export/tokenizer_files.py). transformers loads it with
`AutoModelForCausalLM.from_pretrained` and no code of ours."""
import json
import math
from pathlib import Path

from tqdm import tqdm

from llama.errors import LlamaInputError
from llama.export import register_exporter
from llama.export.source import ExportSource
from llama.export.tokenizer_files import write_hf_tokenizer
from llama.files import atomic_folder, atomic_write_bytes
from llama.formats.tensorfiles import SafetensorsStreamWriter
from llama.layers import meta_to_hf_key, to_hf_rows

MAX_SHARD_BYTES = 5 << 30  # transformers' own default shard size ("5GB")
HF_DTYPE_NAMES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def write_hf(source: ExportSource, out: Path, outtype: str = "auto", progress: bool = True,
             max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the folder at `out`: under a temporary name beside it, renamed when complete."""
    dtype = source.out_dtype(outtype)
    args = source.args
    names = [(key, meta_to_hf_key(key)) for key in source.keys() if not source.tied(key)]
    shards = _plan_shards([(hf, dtype, source.shape(key)) for key, hf in names], max_shard_bytes)
    with atomic_folder(out) as tmp:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))] \
            if len(shards) > 1 else ["model.safetensors"]
        meta_of = dict((hf, key) for key, hf in names)
        with tqdm(total=len(names), unit="tensor", disable=not progress, desc=f"hf {out.name}") as bar:
            for name, entries in zip(files, shards):
                writer = SafetensorsStreamWriter(tmp / name, entries)
                for hf, _, _ in entries:
                    key = meta_of[hf]
                    writer.append(hf, to_hf_rows(source.read(key, dtype), key, args).contiguous())
                    bar.update()
                writer.close()
        if len(files) > 1:
            weight_map = {hf: f for f, entries in zip(files, shards) for hf, _, _ in entries}
            total = sum(d.itemsize * math.prod(s) for entries in shards for _, d, s in entries)
            _write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
        tok = source.tokenizer
        stops = sorted(tok.stop_ids) if tok is not None else None
        eos = None if tok is None else (stops if len(stops) > 1 else tok.eos_id)
        dtype_name = HF_DTYPE_NAMES[str(dtype)]
        _write_json(tmp / "config.json", args.to_hf_config(dtype_name, tok and tok.bos_id, eos))
        generation = {"bos_token_id": tok.bos_id, "eos_token_id": eos} if tok is not None else {}
        _write_json(tmp / "generation_config.json", generation)
        if tok is not None:
            write_hf_tokenizer(tok, tmp)
        else:
            print(f"warning: {out}: no tokenizer found; the folder holds the model only (pass --tokenizer_path)")
    return out


def _plan_shards(entries: list, max_bytes: int) -> list[list]:
    """Consecutive groups of (name, dtype, shape) of at most max_bytes each (a larger tensor
    alone), in order."""
    if max_bytes < 1:
        raise LlamaInputError(f"max_shard_bytes must be positive, got {max_bytes}")
    shards, size = [[]], 0
    for name, dtype, shape in entries:
        nbytes = dtype.itemsize * math.prod(shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, shape))
        size += nbytes
    return shards


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2).encode() + b"\n")


register_exporter("hf", write_hf, ("auto", "f32", "f16", "bf16"))
