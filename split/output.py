"""Writing a split: the output plan, a streaming safetensors writer, `.pth` files one at a time,
the output-folder checks and the `split.json` manifest.

Every file goes through `llama.files.atomic_path` (temp file, fsync, rename) and all data files
are renamed only once every one of them is complete; `params.json` follows, the manifest comes
last. A split killed at any point leaves no file that looks complete under a final name, and
one replacing an older split (--overwrite) leaves that one as it was until the new data files
are complete.
"""
import contextlib
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from llama.errors import LlamaInputError
from llama.files import atomic_path, atomic_write_bytes, check_parent
from llama.formats import Checkpoint, TensorEntry
from llama.export.meta import meta_params
from llama.formats.tensorfiles import SafetensorsStreamWriter
from split.source import MANIFEST
# What makes a folder hold a checkpoint: refused as an output unless --overwrite (then removed;
# nothing else in the folder is touched).
CHECKPOINT_FILES = (MANIFEST, "params.json", "config.json", "consolidated.*.pth", "consolidated.*.safetensors",
                    "stage.*.safetensors", "model*.safetensors", "model.safetensors.index.json",
                    "pytorch_model*.bin", "pytorch_model.bin.index.json")


@dataclass
class Piece:
    """One tensor of an output file: `src.narrow(dim, lo, hi - lo)`, or all of `src` (dim None)."""
    key: str
    src: TensorEntry
    dim: Optional[int] = None
    lo: int = 0
    hi: int = 0

    @property
    def shape(self) -> tuple:
        s = list(self.src.shape)
        if self.dim is not None:
            s[self.dim] = self.hi - self.lo
        return tuple(s)

    @property
    def nbytes(self) -> int:
        return self.src.dtype.itemsize * math.prod(self.shape)

    def cut(self, block: torch.Tensor) -> torch.Tensor:
        """This piece's share of a block of the source's rows (dim 0 pieces get their own rows)."""
        if self.dim is None or self.dim == 0:
            return block
        return block.narrow(self.dim, self.lo, self.hi - self.lo)


@dataclass
class OutFile:
    name: str
    pieces: list = field(default_factory=list)  # in the source's tensor order

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


# --- streaming safetensors -----------------------------------------------------------------------


def _write(f, data) -> None:
    """Every data write goes through here (the tests make it fail with ENOSPC)."""
    f.write(data)


def _sha256_file(path: Path) -> str:
    h, buf = hashlib.sha256(), memoryview(bytearray(1 << 20))
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def _save_pth(obj: dict, path: Path) -> None:
    torch.save(obj, path)


# --- the output folder ----------------------------------------------------------------------------


def checkpoint_files(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    found = {f for pattern in CHECKPOINT_FILES for f in out.glob(pattern) if f.is_file()}
    return sorted(found)


def same_split_done(out: Path, request: dict) -> bool:
    """The folder's manifest records this very request (same source files, sizes and mtimes,
    mode, n, format) and every file it lists is there at its recorded size."""
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in request.items()):
        return False
    files = manifest.get("files") or []
    return all(isinstance(r, dict) and (out / str(r.get("name"))).is_file()
               and (out / str(r.get("name"))).stat().st_size == r.get("bytes") for r in files)


def check_output(out: Path, src: Checkpoint, request: dict, files: list, overwrite: bool) -> bool:
    """Everything about the output folder, before anything is written. True: go ahead; False:
    it already holds exactly this split."""
    if out.resolve() == src.dir.resolve():
        raise LlamaInputError(f"{out}: the output folder is the checkpoint being split; pass another --out")
    check_parent(out)
    if out.exists() and not out.is_dir():
        raise LlamaInputError(f"{out}: a file, not a folder; choose another --out or remove it")
    existing = checkpoint_files(out)
    if existing and not overwrite:
        if same_split_done(out, request):
            return False
        raise LlamaInputError(
            f"{out}: already holds a checkpoint ({existing[0].name}, ...) that is not this split; "
            "pass --overwrite to replace it, or another --out"
        )
    need = sum(f.nbytes for f in files)
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free  # an older split stays until the new one is complete: no credit for it
    if need > free:
        raise LlamaInputError(f"{out}: needs {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free there")
    return True


# --- writing --------------------------------------------------------------------------------------


def write_split(src: Checkpoint, files: list, out: Path, fmt: str, request: dict, extra: dict,
                overwrite: bool, progress: bool = True) -> dict:
    """Write the data files, params.json, the tokenizer and, last, split.json. Returns the
    manifest."""
    out.mkdir(parents=True, exist_ok=True)
    for f in files:  # temp files a killed split left behind (atomic_path names them .NAME.*.tmp)
        for stale in out.glob(f".{f.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    old = checkpoint_files(out) if overwrite else []

    def clear_old() -> None:
        """Once every new data file is complete (not renamed yet): the older checkpoint's files the
        new one does not replace go, manifest first, so the folder never holds a mixture of two."""
        keep = {f.name for f in files} | {"params.json"}
        for f in sorted(old, key=lambda f: f.name != MANIFEST):
            if f.name not in keep:
                f.unlink()

    write = _write_safetensors if fmt == "safetensors" else _write_pth
    records = write(src, files, out, progress, clear_old)
    if fmt == "pth":  # for Meta's own code, which takes only its own keys
        atomic_write_bytes(out / "params.json", json.dumps(meta_params(src.args), indent=2).encode() + b"\n")
    else:
        src.args.write_params_json(out / "params.json")
    records.append(_record(out / "params.json"))
    if src.tokenizer is not None:
        with atomic_path(out / src.tokenizer.name) as tmp:
            shutil.copyfile(src.tokenizer, tmp)
        records.append(_record(out / src.tokenizer.name))
    manifest = {**request, **extra, "files": records}
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n")
    return manifest


def _record(path: Path, sha: Optional[str] = None) -> dict:
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha or _sha256_file(path)}


def _write_safetensors(src: Checkpoint, files: list, out: Path, progress: bool, before_rename) -> list[dict]:
    """All files at once: each source tensor is read once, in row blocks, and each block's
    pieces are appended to the files that take them. `before_rename()` runs once all are
    complete, before any is renamed into place."""
    by_source = {}
    for i, f in enumerate(files):
        for p in f.pieces:
            by_source.setdefault(p.src.key, []).append((i, p))
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(out / f.name)) for f in files]
        writers = [SafetensorsStreamWriter(tmp, [(p.key, p.src.dtype, p.shape) for p in f.pieces],
                                           write=lambda f, data: _write(f, data))  # the tests' hook
                   for tmp, f in zip(tmps, files)]
        stack.callback(lambda: [w.f.close() for w in writers])
        for key, t in tqdm(src.tensors.items(), total=len(src.tensors), unit="tensor", disable=not progress,
                           desc=f"{len(files)} file(s)"):
            targets = by_source.get(key, [])
            for i, p in [(i, p) for i, p in targets if p.dim == 0]:  # own rows
                for r0, r1 in src.row_blocks(t, p.lo, p.hi):
                    writers[i].append(p.key, src.read_rows(t, r0, r1))
            shared = [(i, p) for i, p in targets if p.dim != 0]  # all rows, their columns
            if shared:
                for r0, r1 in src.row_blocks(t, 0, t.shape[0] if t.shape else 1):
                    block = src.read_rows(t, r0, r1)
                    for i, p in shared:
                        piece = p.cut(block)
                        if not piece.is_contiguous():  # columns: gathered in a reused buffer
                            piece = src.scratch("piece", piece.dtype, tuple(piece.shape)).copy_(piece)
                        writers[i].append(p.key, piece)
        shas = [w.close() for w in writers]
        before_rename()
    return [_record(out / f.name, sha) for f, sha in zip(files, shas)]


def _arena(pieces: list) -> list[torch.Tensor]:
    """Empty tensors for every piece of one output file, carved from ONE allocation: each has its
    own storage (a slice of the arena's), so torch.save writes each as its own record, and the
    whole file's memory goes back to the OS at once when freed. (A tensor per piece leaves
    glibc's heap fragmented: RSS grew by a third over a 4-file split.)"""
    offsets, total = [], 0
    for p in pieces:
        offsets.append(total)
        total += -(-p.nbytes // 64) * 64  # 64-byte aligned, like torch's own records
    arena = torch.empty(total, dtype=torch.uint8).untyped_storage()
    return [torch.empty(0, dtype=p.src.dtype).set_(arena[o:o + p.nbytes], 0, p.shape) for p, o in zip(pieces, offsets)]


def _write_pth(src: Checkpoint, files: list, out: Path, progress: bool, before_rename) -> list[dict]:
    """One file's dict at a time (torch.save wants the whole dict): peak memory ~ one file.
    Each output tensor is filled from row blocks of the source, reading only its own share.
    `before_rename()` runs once all are complete, before any is renamed into place."""
    bar = tqdm(total=sum(len(f.pieces) for f in files), unit="tensor", disable=not progress, desc=f"{len(files)} file(s)")
    with contextlib.ExitStack() as stack, bar:
        shas = []
        for f in files:
            tmp = stack.enter_context(atomic_path(out / f.name))
            state = {}
            for p, buf in zip(f.pieces, _arena(f.pieces)):
                t = p.src
                lo, hi = (p.lo, p.hi) if p.dim == 0 else (0, t.shape[0] if t.shape else 1)
                pos = 0
                for r0, r1 in src.row_blocks(t, lo, hi):
                    block = p.cut(src.read_rows(t, r0, r1))
                    if not t.shape:
                        buf.copy_(block)
                    else:
                        buf[pos:pos + r1 - r0] = block
                    pos += r1 - r0
                state[p.key] = buf
                bar.update()
            _save_pth(state, tmp)
            del state, buf
            shas.append(_sha256_file(tmp))
        before_rename()
    return [_record(out / f.name, sha) for f, sha in zip(files, shas)]
