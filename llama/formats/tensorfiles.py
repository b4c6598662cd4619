"""Tensor files, read one tensor at a time: safetensors (header checked against the file size,
each tensor read straight from disk into its own memory) and torch pickles (`.pth`/`.bin`,
weights_only, mmapped where the file allows)."""
import ctypes
import hashlib
import json
import math
import mmap
from pathlib import Path

import torch

from llama.errors import LlamaInputError

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}


class SafetensorsFile:
    """Reads one safetensors file tensor by tensor, straight from disk into the tensor's memory
    (no mmap, whose touched pages would count twice), checking the header against the file size."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise LlamaInputError(f"{path}: not a safetensors file, or truncated")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LlamaInputError(f"{path}: corrupt safetensors header") from None
        if not isinstance(header, dict):
            raise LlamaInputError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.entries = {}
        for key, info in header.items():
            try:
                begin, end = info["data_offsets"]
                dtype_name, shape = info["dtype"], tuple(info["shape"])
                valid = all(isinstance(x, int) and x >= 0 for x in (begin, end, *shape)) and begin <= end
            except (TypeError, KeyError, ValueError):
                valid = False
            if not valid:
                raise LlamaInputError(f"{path}: corrupt safetensors header (bad entry for tensor {key})")
            dtype = ST_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
            if dtype is None:
                raise LlamaInputError(f"{path}: tensor {key} has unsupported dtype {dtype_name}")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise LlamaInputError(
                    f"{path}: corrupt safetensors header (tensor {key}: shape {shape} does not match its byte range)"
                )
            if 8 + n + end > size:
                raise LlamaInputError(f"{path}: truncated (tensor {key} runs past the end of the file)")
            self.entries[key] = (8 + n + begin, end - begin, dtype, shape)

    def keys(self):
        return self.entries.keys()

    def info(self, key: str) -> tuple[tuple, torch.dtype]:
        """(shape, dtype) of a tensor, from the header."""
        _, _, dtype, shape = self.entries[key]
        return tuple(shape), dtype

    def get(self, key: str) -> torch.Tensor:
        offset, nbytes, dtype, shape = self.entries[key]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(offset)
            if f.readinto(buf.numpy()) != nbytes:
                raise LlamaInputError(f"{self.path}: truncated while reading {key}")
        return buf.view(dtype).reshape(shape)


class PthFile:
    """A torch pickle (`.pth`/`.bin`), opened with weights_only=True and, where the file is in the
    zip format, mmap=True so tensors are paged in from disk as they are used."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise _unreadable(path, e) from None
            self.tensors = self._load_legacy(path)
        except Exception as e:  # unpickling errors come in many types
            raise _unreadable(path, e) from None
        if not isinstance(self.tensors, dict) or not all(isinstance(k, str) for k in self.tensors):
            raise LlamaInputError(f"{path}: expected a dict of tensors")

    @staticmethod
    def _load_legacy(path):  # pre-zip torch.save files can't be mmapped
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise _unreadable(path, e) from None

    def keys(self):
        return self.tensors.keys()

    def info(self, key: str) -> tuple[tuple, torch.dtype]:
        t = self.get(key)
        return tuple(t.shape), t.dtype

    def get(self, key: str) -> torch.Tensor:
        t = self.tensors[key]
        if not isinstance(t, torch.Tensor):
            raise LlamaInputError(f"{self.path}: {key} is a {type(t).__name__}, not a tensor")
        return t


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _unreadable(path: Path, e: Exception) -> LlamaInputError:
    """torch.load's errors are long and, for weights_only, suggest weights_only=False (unsafe, and
    no help for a corrupt file): keep the one line that says what went wrong."""
    msg = str(e)
    if "WeightsUnpickler error:" in msg:
        detail = msg.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0][:200]
    else:
        detail = _first_line(e).split(". ")[0]
    return LlamaInputError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {detail}")


def open_tensor_file(path: Path):
    return SafetensorsFile(path) if path.suffix == ".safetensors" else PthFile(path)


# --- releasing mmapped pages -------------------------------------------------------------------

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # not on Linux: the pages just stay mapped
    _madvise = None
_MADV_PAGEOUT = 21  # Linux >= 5.4; older kernels answer EINVAL and nothing happens


def page_out(view: torch.Tensor) -> None:
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


# --- writing safetensors a tensor (or a row block) at a time ---------------------------------------


def _as_bytes(t: torch.Tensor):
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


def safetensors_header(entries: list, metadata: dict | None = None) -> bytes:
    """The header for entries [(name, dtype, shape)] laid out back to back in order, padded (with
    spaces, as the format allows) so the data starts 8-byte aligned."""
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        nbytes = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw


class SafetensorsStreamWriter:
    """Writes a safetensors file whose header is known up front ([(name, dtype, shape)]), the data
    appended in header order, whole tensors or row blocks; checks every block and the final size;
    hashes as it goes. `write(f, data)` does the writing (a hook for tests)."""

    def __init__(self, path: Path, entries: list, metadata: dict | None = None, write=None):
        self.path = path
        self.entries = [(name, dtype, dtype.itemsize * math.prod(shape)) for name, dtype, shape in entries]
        head = safetensors_header(entries, metadata)
        self.size = len(head) + sum(n for _, _, n in self.entries)
        self.sha = hashlib.sha256()
        self._write = write or (lambda f, data: f.write(data))
        self.f = open(path, "wb")
        self.index, self.done = 0, 0  # current entry, bytes of it written
        self._put(head)

    def _put(self, data) -> None:
        self._write(self.f, data)
        self.sha.update(data)

    def append(self, name: str, block: torch.Tensor) -> None:
        while self.index < len(self.entries) and self.done == self.entries[self.index][2] \
                and self.entries[self.index][0] != name:
            self.index, self.done = self.index + 1, 0
        entry = self.entries[self.index] if self.index < len(self.entries) else None
        data = _as_bytes(block)
        if entry is None or entry[0] != name or block.dtype != entry[1] or self.done + len(data) > entry[2]:
            raise RuntimeError(f"{self.path}: block of {name} out of order")  # a bug here, not bad input
        self._put(data)
        self.done += len(data)

    def close(self) -> str:
        self.f.close()
        written = self.path.stat().st_size
        if written != self.size:
            raise RuntimeError(f"{self.path}: wrote {written} bytes, header promised {self.size}")
        return self.sha.hexdigest()
