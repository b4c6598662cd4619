"""Any checkpoint the core loads (Meta `.pth` with any shard count, ours, HF) or a stage folder,
seen as one list of full, merged, Meta-named and Meta-laid-out tensors that are read in row
blocks, so no tensor is ever held whole.

Opening a source reads only headers (safetensors) or mmaps (`.pth`, `.bin`), and checks
everything before a byte is written: every shard holds the same tensors, shard shapes add up
along the split dims to what `params.json`/`config.json` implies (a missing last shard shows
up here), and a `split.json` manifest, where there is one, still matches the files.
"""
import ctypes
import json
import math
import mmap
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import torch

from llama.checkpoint import (
    IGNORED_KEYS, SafetensorsFile, detect_format, hf_weight_files, iter_hf_names,
    open_tensor_file, read_model_args, shard_files, split_dim, unpermute_rope_rows,
)
from llama.config import ModelArgs
from llama.errors import LlamaInputError

MANIFEST = "split.json"
STAGE_RE = re.compile(r"stage\.(\d+)\.safetensors")
# Rows read at a time: bounds memory whatever the tensor size (an 8B model's embedding is 1 GB).
BLOCK_BYTES = 8 << 20


@dataclass
class Part:
    """One stored piece of a tensor: `name` in an opened file, with its shape."""
    file: object  # SafetensorsFile | PthFile
    name: str
    shape: tuple


@dataclass
class SourceTensor:
    """A full Meta-layout tensor: its parts concatenated along `cat_dim` (one part: stored whole)."""
    key: str
    shape: tuple
    dtype: torch.dtype
    parts: list
    cat_dim: Optional[int] = None
    rope_heads: Optional[int] = None  # HF q/k: rows to un-permute, in heads of shape[0] // rope_heads rows

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


@dataclass
class Source:
    dir: Path
    format: str  # meta | ours | hf | stages
    args: ModelArgs
    tensors: dict  # key -> SourceTensor, in write order
    files: list  # the files it was read from (weights and config), for the manifest
    tokenizer: Optional[Path] = None
    _handles: dict = field(default_factory=dict, repr=False)
    _buffers: dict = field(default_factory=dict, repr=False)

    def file_records(self) -> list[dict]:
        """Name, size and mtime of each source file: how a re-run recognises the same source."""
        return [{"name": f.name, "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in self.files]

    # --- reading -----------------------------------------------------------------------

    def row_blocks(self, t: SourceTensor, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """[r0, r1) ranges covering rows lo..hi of t: at most BLOCK_BYTES each (one row at
        least), never straddling two stored parts, whole heads for HF q/k rows."""
        if not t.shape:  # a scalar
            yield 0, 1
            return
        row_bytes = t.nbytes // t.shape[0] if t.shape[0] else 1
        align = t.shape[0] // t.rope_heads if t.rope_heads else 1
        step = max(align, (BLOCK_BYTES // max(row_bytes, 1)) // align * align)
        cuts = {lo, hi}
        if t.cat_dim == 0 and len(t.parts) > 1:
            start = 0
            for p in t.parts:
                start += p.shape[0]
                if lo < start < hi:
                    cuts.add(start)
        cuts = sorted(cuts)
        for a, b in zip(cuts, cuts[1:]):
            for r0 in range(a, b, step):
                yield r0, min(r0 + step, b)

    def read_rows(self, t: SourceTensor, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 of the full tensor in Meta layout. The block lives in a reusable buffer:
        it is valid until the next read_rows call (use it or copy it before reading again)."""
        if not t.shape:
            return self._part_rows(t.parts[0], t.dtype, None, None, slot=0)
        if len(t.parts) == 1:
            block = self._part_rows(t.parts[0], t.dtype, r0, r1, slot=0)
        elif t.cat_dim == 0:
            start = 0
            for p in t.parts:
                if start <= r0 < start + p.shape[0]:
                    block = self._part_rows(p, t.dtype, r0 - start, r1 - start, slot=0)
                    break
                start += p.shape[0]
        else:
            pieces = [self._part_rows(p, t.dtype, r0, r1, slot=i) for i, p in enumerate(t.parts)]
            block = self.scratch("cat", t.dtype, (r1 - r0, *t.shape[1:]))
            torch.cat(pieces, dim=t.cat_dim, out=block)
        if t.rope_heads:
            block = unpermute_rope_rows(block, (r1 - r0) // (t.shape[0] // t.rope_heads))
        return block

    def scratch(self, slot, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        """A reusable buffer per slot, grown as needed and never freed while the source is open:
        reading every block into fresh memory would churn the allocator (glibc's heap fragments
        and RSS creeps up by a third over a split) and page-fault every block in anew."""
        nbytes = dtype.itemsize * math.prod(shape)
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)

    def _part_rows(self, p: Part, dtype, r0, r1, slot) -> torch.Tensor:
        if isinstance(p.file, SafetensorsFile):
            offset, nbytes, _, shape = p.file.entries[p.name]
            if r0 is not None and shape[0]:
                row = nbytes // shape[0]
                offset, nbytes, shape = offset + r0 * row, (r1 - r0) * row, (r1 - r0, *shape[1:])
            block = self.scratch(("part", slot), dtype, shape)
            f = self._handle(p.file.path)
            f.seek(offset)
            if nbytes and f.readinto(block.view(-1).view(torch.uint8).numpy()) != nbytes:
                raise LlamaInputError(f"{p.file.path}: truncated while reading {p.name}")
            return block
        src = p.file.get(p.name)
        view = src if r0 is None else src[r0:r1]
        block = self.scratch(("part", slot), dtype, tuple(view.shape))
        block.copy_(view)
        _page_out(view)
        return block

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = open(path, "rb")
        return self._handles[path]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        self._buffers.clear()


# --- releasing mmapped pages -------------------------------------------------------------------

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # not on Linux: the pages just stay mapped
    _madvise = None
_MADV_PAGEOUT = 21  # Linux >= 5.4; older kernels answer EINVAL and nothing happens


def _page_out(view: torch.Tensor) -> None:
    """Hand back the pages of an mmapped `.pth` tensor once copied: touched pages of a file
    mapping count in the process's RSS until unmapped, so reading a 13 GB `.pth` would otherwise
    grow RSS by 13 GB. MADV_PAGEOUT never loses data (clean file pages are re-read on access)."""
    if _madvise is None or not view.is_contiguous():
        return
    start, end = view.data_ptr(), view.data_ptr() + view.numel() * view.element_size()
    page = mmap.PAGESIZE
    start, end = -(-start // page) * page, end // page * page
    if end > start:
        _madvise(start, end - start, _MADV_PAGEOUT)


# --- opening and checking a source --------------------------------------------------------------


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


def _shape_dtype(f, name: str) -> tuple[tuple, torch.dtype]:
    if isinstance(f, SafetensorsFile):
        _, _, dtype, shape = f.entries[name]
        return tuple(shape), dtype
    t = f.get(name)
    return tuple(t.shape), t.dtype


def open_source(ckpt_dir) -> Source:
    """Open and check a checkpoint folder (Meta, ours, HF, or stage files written by
    `split_model.py --mode layers`). Reads headers only."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise LlamaInputError(f"{d}: checkpoint folder not found")
    manifest = read_manifest(d)
    if (manifest or {}).get("mode") == "layers" or any(d.glob("stage.*.safetensors")):
        return _open_stages(d, manifest)
    fmt = detect_format(d)
    args = read_model_args(d)
    if fmt == "hf":
        tensors, files = _hf_tensors(d, args)
        files = [d / "config.json"] + files
    else:
        tensors, files = _meta_tensors(d, manifest)
        files = [d / "params.json"] + files
    tok = d / "tokenizer.model"
    return Source(d, fmt, args, _check_against_config(d, args, tensors, fmt), files, tok if tok.is_file() else None)


def _meta_tensors(d: Path, manifest: Optional[dict]):
    files = shard_files(d)
    if manifest is not None:
        ext = files[0].suffix
        listed = _check_manifest_files(d, manifest, re.compile(rf"consolidated\.\d+{re.escape(ext)}"))
        if listed and len(listed) != len(files):
            raise LlamaInputError(f"{d}: {len(files)} shard files but {d / MANIFEST} lists {len(listed)}")
    opened = [open_tensor_file(f) for f in files]
    keys = [k for k in opened[0].keys() if not IGNORED_KEYS.search(k)]
    for f, o in zip(files[1:], opened[1:]):
        mine = {k for k in o.keys() if not IGNORED_KEYS.search(k)}
        if mine != set(keys):
            odd = sorted(set(keys) - mine) or sorted(mine - set(keys))
            what = "lacks" if set(keys) - mine else "has an extra"
            raise LlamaInputError(f"{f}: {what} tensor {odd[0]} compared with {files[0].name}")
    tensors = {}
    for key in keys:
        shapes, dtypes = zip(*(_shape_dtype(o, key) for o in opened))
        if len(set(dtypes)) > 1:
            raise LlamaInputError(f"{d}: tensor {key} has different dtypes across shards: {sorted(map(str, set(dtypes)))}")
        dim = split_dim(key) if len(files) > 1 else None
        if dim is None:
            if len(set(shapes)) > 1:
                raise LlamaInputError(f"{d}: replicated tensor {key} has different shapes across shards: {sorted(set(shapes))}")
            tensors[key] = SourceTensor(key, shapes[0], dtypes[0], [Part(opened[0], key, shapes[0])])
            continue
        rest = {s[:dim] + s[dim + 1:] for s in shapes}
        if any(len(s) <= dim for s in shapes) or len(rest) > 1:
            raise LlamaInputError(f"{d}: shards of {key} don't line up along split dim {dim}: shapes {list(shapes)}")
        full = shapes[0][:dim] + (sum(s[dim] for s in shapes),) + shapes[0][dim + 1:]
        parts = [Part(o, key, s) for o, s in zip(opened, shapes)]
        tensors[key] = SourceTensor(key, full, dtypes[0], parts, cat_dim=dim)
    return tensors, files


def _hf_tensors(d: Path, args: ModelArgs):
    files = hf_weight_files(d)
    tensors = {}
    for path, f, name, key in iter_hf_names(d):
        if key in tensors:
            raise LlamaInputError(f"{path}: tensor {name} also appears in {tensors[key].parts[0].file.path.name}")
        shape, dtype = _shape_dtype(f, name)
        heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}
        rope = next((n for suffix, n in heads.items() if key.endswith(suffix)), None)
        tensors[key] = SourceTensor(key, shape, dtype, [Part(f, name, shape)], rope_heads=rope)
    return tensors, files


def _open_stages(d: Path, manifest: Optional[dict]) -> Source:
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
                raise LlamaInputError(f"{path}: tensor {key} is also in {tensors[key].parts[0].file.path.name}")
            shape, dtype = _shape_dtype(f, key)
            tensors[key] = SourceTensor(key, shape, dtype, [Part(f, key, shape)])
    tok = d / "tokenizer.model"
    tensors = _check_against_config(d, args, tensors, "stages")
    return Source(d, "stages", args, tensors, [d / "params.json"] + files, tok if tok.is_file() else None)


def expected_shapes(args: ModelArgs) -> dict:
    """Meta's keys and full shapes for a config, in the model's order. (Building the model on
    `meta` would say the same, but initialising an nn.Embedding there imports torch._dynamo and
    sympy: +75 MB of RSS for every split.)"""
    q, kv, hidden = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (q, args.dim), p + "attention.wk.weight": (kv, args.dim),
            p + "attention.wv.weight": (kv, args.dim), p + "attention.wo.weight": (args.dim, q),
            p + "feed_forward.w1.weight": (hidden, args.dim), p + "feed_forward.w2.weight": (args.dim, hidden),
            p + "feed_forward.w3.weight": (hidden, args.dim),
            p + "attention_norm.weight": (args.dim,), p + "ffn_norm.weight": (args.dim,),
        })
    shapes.update({"norm.weight": (args.dim,), "output.weight": (args.vocab_size, args.dim)})
    return shapes


def _check_against_config(d: Path, args: ModelArgs, tensors: dict, fmt: str) -> dict:
    """Every tensor the config implies, with its shape, and nothing else; returned in the
    model's order (embedding, layers, norm, output), wider dtypes first so every tensor in a
    safetensors file stays aligned. A tied output (HF) is read from the embedding."""
    config = "config.json" if fmt == "hf" else "params.json"
    emb = tensors.get("tok_embeddings.weight")
    if args.vocab_size <= 0:  # LLaMA-1: -1, from the tokenizer; here the embedding says it
        if emb is None or len(emb.shape) != 2:
            raise LlamaInputError(f"{d}: vocab_size is -1 in {config} and there is no 2-D tok_embeddings.weight to take it from")
        args = replace(args, vocab_size=emb.shape[0])
    expected = expected_shapes(args)
    for key in tensors:
        if key not in expected:
            raise LlamaInputError(f"{d}: unexpected tensor {key} for the {args.n_layers}-layer model {config} describes")
    if "output.weight" not in tensors and args.tie_word_embeddings and emb is not None:
        tensors["output.weight"] = replace(emb, key="output.weight")
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise LlamaInputError(f"{d}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    for key, shape in expected.items():
        t = tensors[key]
        if t.shape != shape:
            hint = " (shards add up to that along their split dim: is a shard missing?)" if len(t.parts) > 1 else ""
            raise LlamaInputError(f"{d}: tensor {key} has shape {t.shape}{hint} but {config} implies {shape}")
    order = sorted(expected, key=lambda k: -tensors[k].dtype.itemsize)  # stable: model order within a dtype
    return {k: tensors[k] for k in order}
