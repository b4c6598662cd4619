"""The reader interface every checkpoint format implements, and the registry of formats.

A format is detected from a folder's content and opened into a `Checkpoint`: Meta-named,
Meta-laid-out tensors (RoPE on interleaved pairs, fairscale's split dims), each described by its
shape and dtype and the stored parts it is made of. Opening reads headers only (safetensors) or
mmaps (`.pth`); a tensor is read whole (`read`, the loader) or in row blocks (`read_rows`, the
splitter), so no reader ever holds a second copy of a model.
"""
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.formats.tensorfiles import SafetensorsFile, page_out
from llama.layers import expected_shapes, unpermute_rope_rows, unpermute_rope_rows_
from llama.plugins import load_plugins

# Rows read at a time by read_rows: bounds memory whatever the tensor size (an 8B model's
# embedding is 1 GB).
BLOCK_BYTES = 8 << 20


@dataclass
class Part:
    """One stored piece of a tensor: `name` in an opened file, with its shape."""
    file: object  # SafetensorsFile | PthFile
    name: str
    shape: tuple


@dataclass
class TensorEntry:
    """A Meta-layout tensor: its parts concatenated along `cat_dim` (one part: stored whole)."""
    key: str
    shape: tuple
    dtype: torch.dtype
    parts: list
    cat_dim: Optional[int] = None
    rope_heads: Optional[int] = None  # HF q/k: rows to un-permute, in heads of shape[0] // rope_heads rows
    tied_to: Optional[str] = None  # an output layer stored as the embedding (tie_word_embeddings)
    compute: Optional[Callable] = None  # a tensor not stored as such (a dequantized int4 weight): read = compute()

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)

    @property
    def path(self) -> Path:
        """The file it is read from (the first, for a tensor in several shards)."""
        return self.parts[0].file.path


@dataclass
class Checkpoint:
    """An opened checkpoint folder: Meta-named tensors read whole or in row blocks."""
    dir: Path
    format: str
    args: ModelArgs
    tensors: dict  # key -> TensorEntry
    files: list  # the files it was read from (weights and config)
    tokenizer: Optional[Path] = None
    _handles: dict = field(default_factory=dict, repr=False)
    _buffers: dict = field(default_factory=dict, repr=False)

    @property
    def config_name(self) -> str:
        return self.files[0].name

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple:
        return self.tensors[key].shape

    # --- checking against the config -----------------------------------------------------------

    def check(self, args: Optional[ModelArgs] = None, parts: int = 1) -> "Checkpoint":
        """Every tensor the config implies, with its shape (one rank's share of `parts`), and
        nothing else; kept in the model's order. A tied output with no tensor of its own is read
        from the embedding; vocab_size -1 (LLaMA-1) is taken from the embedding."""
        args = args or self.args
        emb = self.tensors.get("tok_embeddings.weight")
        if args.vocab_size <= 0:
            if emb is None or len(emb.shape) != 2:
                raise LlamaInputError(f"{self.dir}: vocab_size is -1 in {self.config_name} and there is no 2-D "
                                      f"tok_embeddings.weight to take it from")
            args = replace(args, vocab_size=emb.shape[0])
        expected = expected_shapes(args, parts)
        for key, t in self.tensors.items():
            if key not in expected:
                raise LlamaInputError(f"{t.path}: unexpected tensor {key} for the {args.n_layers}-layer model "
                                      f"{self.config_name} describes")
        if "output.weight" not in self.tensors and args.tie_word_embeddings and emb is not None and parts == 1:
            self.tensors["output.weight"] = replace(emb, key="output.weight", tied_to=emb.key)
        missing = [k for k in expected if k not in self.tensors]
        if missing:
            raise LlamaInputError(f"{self.dir}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")
        for key, shape in expected.items():
            t = self.tensors[key]
            if t.shape != shape:
                hint = " (shards add up to that along their split dim: is a shard missing?)" if len(t.parts) > 1 else ""
                raise LlamaInputError(f"{t.path}: tensor {key} has shape {t.shape}{hint} but {self.config_name} "
                                      f"implies {shape}")
        self.tensors = {k: self.tensors[k] for k in expected}
        return self

    # --- reading whole tensors (the loader) ----------------------------------------------------

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor in Meta layout, in its own memory (or mmapped from a `.pth`)."""
        t = self.tensors[key]
        if t.compute is not None:
            return t.compute()
        if len(t.parts) == 1:
            block = t.parts[0].file.get(t.parts[0].name)
        else:
            block = torch.cat([p.file.get(p.name) for p in t.parts], dim=t.cat_dim)
        if t.rope_heads:
            block = unpermute_rope_rows_(block.contiguous(), t.rope_heads)
        return block

    # --- reading row blocks (the splitter) -----------------------------------------------------

    def row_blocks(self, t: TensorEntry, lo: int, hi: int) -> Iterator[tuple[int, int]]:
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

    def read_rows(self, t: TensorEntry, r0: int, r1: int) -> torch.Tensor:
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
        """A reusable buffer per slot, grown as needed and never freed while the checkpoint is
        open: reading every block into fresh memory would churn the allocator (glibc's heap
        fragments and RSS creeps up by a third over a split) and page-fault every block in anew."""
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
        page_out(view)
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


def single_part(f, name: str, key: Optional[str] = None, rope_heads: Optional[int] = None) -> TensorEntry:
    """The entry of a tensor stored whole as `name` in opened file f."""
    shape, dtype = f.info(name)
    return TensorEntry(key or name, shape, dtype, [Part(f, name, shape)], rope_heads=rope_heads)


# --- formats --------------------------------------------------------------------------------------


class Format:
    """One checkpoint format: how to recognise a folder of it and open it."""
    name: str = ""
    config_file: str = ""  # params.json or config.json
    quant: Optional[str] = None  # the quantized base it holds ("int4"), loaded by its own `load_model`

    def detect(self, d: Path) -> bool:
        raise NotImplementedError

    def read_args(self, d: Path) -> ModelArgs:
        raise NotImplementedError

    def n_shards(self, d: Path) -> int:
        """How many tensor-parallel shards the folder holds."""
        return 1

    def open(self, d: Path, parts: int = 1, rank: int = 0) -> Checkpoint:
        """The checkpoint as `parts` tensor-parallel ranks see it: rank `rank`'s own shard (the
        folder must hold `parts` shards), or everything merged when parts is 1."""
        raise NotImplementedError

    def open_float(self, d: Path) -> Checkpoint:
        """The whole checkpoint with any quantized weights as float tensors (for the exporters)."""
        return self.open(d)

    def load_model(self, ckpt_dir, args: ModelArgs, dtype, device, mp_rank: int, mp_size: int):
        """A quantized format (`quant` set) builds its own model: its tensors are not float
        weights for `open` to hand out (see llama.loader.load_model)."""
        raise NotImplementedError


FORMATS: list[Format] = []


def register_format(fmt: Format, first: bool = False) -> None:
    """Add a format; first: try it before the others (a quantized HF folder before plain HF)."""
    FORMATS.insert(0 if first else len(FORMATS), fmt)


def detect_format(ckpt_dir) -> Format:
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise LlamaInputError(f"{d}: checkpoint folder not found")
    load_plugins()
    for fmt in FORMATS:
        if fmt.detect(d):
            return fmt
    raise LlamaInputError(f"{d}: no params.json (Meta format) or config.json (HF format) in the folder")


def read_model_args(ckpt_dir) -> ModelArgs:
    return detect_format(ckpt_dir).read_args(Path(ckpt_dir))


def n_shards(ckpt_dir) -> int:
    return detect_format(ckpt_dir).n_shards(Path(ckpt_dir))


def check_shard_count(ckpt_dir, parts: int) -> None:
    """One process loads any checkpoint; N tensor-parallel processes need N Meta-layout shards."""
    if parts == 1:
        return
    n = n_shards(ckpt_dir)
    if n != parts:
        d = Path(ckpt_dir)
        raise LlamaInputError(
            f"{d}: checkpoint has {n} shard(s) but {parts} processes were started; "
            f"run `python split_model.py --n {parts} --ckpt_dir {d}` first"
        )


def open_checkpoint(ckpt_dir, parts: int = 1, rank: int = 0) -> Checkpoint:
    """Open any checkpoint folder (see `Format.open`), its shard count checked against parts."""
    check_shard_count(ckpt_dir, parts)
    return detect_format(ckpt_dir).open(Path(ckpt_dir), parts, rank)


def find_file(d: Path, name: str) -> Optional[Path]:
    """d/name if it is a file, else None."""
    return d / name if (d / name).is_file() else None


def tokenizer_beside(d: Path) -> Optional[Path]:
    """The tokenizer shipped beside the weights: tokenizer.model, else tokenizer.json (HF Llama-3)."""
    return find_file(d, "tokenizer.model") or find_file(d, "tokenizer.json")
