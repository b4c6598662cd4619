"""The checkpoint to split: any folder the loader reads (through llama.formats, the same readers)
or a stage folder, seen as full, merged, Meta-named and Meta-laid-out tensors read in row blocks,
so no tensor is ever held whole.

Opening reads only headers (safetensors) or mmaps (`.pth`, `.bin`), and checks everything
before a byte is written: every shard holds the same tensors, shard shapes add up along the
split dims to what `params.json`/`config.json` implies (a missing last shard shows up here), and
a `split.json` manifest, where there is one, still matches the files.
"""
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Optional

from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.formats import META, OURS, Checkpoint, detect_format, open_checkpoint
from llama.formats.base import single_part, tokenizer_beside
from llama.formats.tensorfiles import SafetensorsFile
from llama.tokenizers import Tokenizer, check_vocab

MANIFEST = "split.json"
STAGE_RE = re.compile(r"stage\.(\d+)\.safetensors")


def file_records(src: Checkpoint) -> list[dict]:
    """Name, size and mtime of each source file: how a re-run recognises the same source."""
    return [{"name": f.name, "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in src.files]


def read_manifest(d: Path) -> Optional[dict]:
    path = d / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LlamaInputError(f"{path}: not valid JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise LlamaInputError(f"{path}: not a split_model.py manifest (no 'files' list)")
    return manifest


def _check_manifest_files(d: Path, manifest: dict, pattern: re.Pattern) -> list[Path]:
    """The weight files the manifest lists must all be there with their recorded sizes: the one
    way to notice that the LAST shard or stage of a set is gone."""
    listed = []
    for rec in manifest["files"]:
        name = rec.get("name", "") if isinstance(rec, dict) else ""
        if not pattern.fullmatch(name):
            continue
        f = d / name
        if not f.is_file():
            raise LlamaInputError(f"{f}: missing, but {d / MANIFEST} lists it (an incomplete copy?)")
        if f.stat().st_size != rec.get("bytes"):
            raise LlamaInputError(
                f"{f}: {f.stat().st_size} bytes but {d / MANIFEST} records {rec.get('bytes')} "
                "(truncated or replaced? delete split.json if the new file is intended)"
            )
        listed.append(f)
    return listed


def open_source(ckpt_dir) -> Checkpoint:
    """Open and check a checkpoint folder (Meta, ours, HF, or stage files written by
    `split_model.py --mode layers`). Reads headers only. Tensors come in the model's order,
    wider dtypes first so every tensor in a safetensors output stays aligned."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise LlamaInputError(f"{d}: checkpoint folder not found")
    manifest = read_manifest(d)
    if (manifest or {}).get("mode") == "layers" or any(d.glob("stage.*.safetensors")):
        src = _open_stages(d, manifest)
    else:
        listed = None
        if manifest is not None and detect_format(d) in (META, OURS):  # before opening: a truncated shard is named as such
            listed = _check_manifest_files(d, manifest, re.compile(r"consolidated\.\d+\.(pth|safetensors)"))
        src = open_checkpoint(d)
        if listed and len(listed) != len(src.files) - 1:
            raise LlamaInputError(f"{d}: {len(src.files) - 1} shard files but {d / MANIFEST} lists {len(listed)}")
    src.check()
    if src.tokenizer is not None:  # copied into the output, so it must belong to these weights
        vocab = src.shape("output.weight")[0]  # the model's, also where params.json says -1 (LLaMA-1)
        check_vocab(replace(src.args, vocab_size=vocab), Tokenizer(src.tokenizer))
    order = sorted(src.tensors, key=lambda k: -src.tensors[k].dtype.itemsize)  # stable: model order within a dtype
    src.tensors = {k: src.tensors[k] for k in order}
    return src


def _open_stages(d: Path, manifest: Optional[dict]) -> Checkpoint:
    """A folder of stage.NN.safetensors (full tensors, each in exactly one file) + params.json."""
    if manifest is None or manifest.get("mode") != "layers":
        raise LlamaInputError(f"{d}: stage.*.safetensors files without a {MANIFEST} manifest of mode 'layers'")
    files = _check_manifest_files(d, manifest, STAGE_RE)
    on_disk = sorted(d.glob("stage.*.safetensors"))
    if sorted(files) != on_disk or not files:
        extra = sorted(set(on_disk) - set(files))
        raise LlamaInputError(f"{d}: {extra[0].name if extra else 'no stage file'} is not among the stages {MANIFEST} lists")
    args = ModelArgs.from_params_json(d / "params.json")
    tensors = {}
    for path in files:
        f = SafetensorsFile(path)
        for key in f.keys():
            if key in tensors:
                raise LlamaInputError(f"{path}: tensor {key} is also in {tensors[key].path.name}")
            tensors[key] = single_part(f, key)
    return Checkpoint(d, "stages", args, tensors, [d / "params.json"] + files, tokenizer_beside(d))
