"""Meta's layout: `params.json` + `consolidated.NN.pth` (Meta's release, one file per
tensor-parallel rank, fairscale's split dims), and ours, the same keys and layout in
`consolidated.NN.safetensors`."""
import re
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.formats.base import Checkpoint, Format, Part, TensorEntry, single_part, tokenizer_beside
from llama.formats.tensorfiles import open_tensor_file
from llama.layers import IGNORED_KEYS, split_dim


class MetaLayout(Format):
    config_file = "params.json"

    def __init__(self, name: str, ext: str):
        self.name, self.ext = name, ext

    def detect(self, d: Path) -> bool:
        # a folder with a params.json is Meta's unless it holds our safetensors shards
        if not (d / "params.json").is_file() or (d / "config.json").is_file():
            return False
        return any(d.glob("consolidated.*.safetensors")) == (self.ext == ".safetensors")

    def read_args(self, d: Path) -> ModelArgs:
        """params.json, and for several shards how they split the embedding (their shapes say)."""
        args = ModelArgs.from_params_json(d / "params.json")
        files = self.shard_files(d)  # a missing shard is named before the shapes are read
        split = embedding_split(files, args)  # also names a missing last shard, or an extra one
        return replace(args, vocab_parallel=split) if len(files) > 1 else args

    def shard_files(self, d: Path) -> list[Path]:
        """consolidated.00 .. consolidated.{N-1}, checked for gaps."""
        files = sorted(d.glob(f"consolidated.*{self.ext}"))
        if not files:
            raise LlamaInputError(f"{d}: params.json found but no consolidated.*.pth or .safetensors weights")
        numbers = {int(m.group(1)) for f in files if (m := re.fullmatch(r"consolidated\.(\d+)\..*", f.name))}
        n = max(numbers) + 1
        missing = sorted(set(range(n)) - numbers)
        if missing:
            raise LlamaInputError(f"{d}: shard consolidated.{missing[0]:02d}{self.ext} is missing from a {n}-shard checkpoint")
        return [d / f"consolidated.{i:02d}{self.ext}" for i in range(n)]

    def n_shards(self, d: Path) -> int:
        return len(self.shard_files(d))

    def open(self, d: Path, parts: int = 1, rank: int = 0) -> Checkpoint:
        args = self.read_args(d)
        files = self.shard_files(d)
        if parts > 1:  # this rank's own shard, as stored
            f = open_tensor_file(files[rank])
            tensors = {k: single_part(f, k) for k in f.keys() if not IGNORED_KEYS.search(k)}
        else:
            tensors = merged_shards(files, args)
        return Checkpoint(d, self.name, args, tensors, [d / "params.json"] + files, tokenizer_beside(d))


def embedding_split(files: list[Path], args: ModelArgs) -> Optional[bool]:
    """Whether the shards of a checkpoint split tok_embeddings along the vocabulary (Meta's
    Llama-3) rather than dim (Llama-1/2), from the first shard's share; None if it has none (or
    for one file whose shapes are not a share: `Checkpoint.check` names the mismatch). A share of
    another shard count means a shard is missing or extra: the one place a missing LAST shard
    shows (the file names have no gap), named here rather than as a shape mismatch."""
    n, f = len(files), open_tensor_file(files[0])
    if "tok_embeddings.weight" not in f.keys():
        return None
    shape, _ = f.info("tok_embeddings.weight")
    vocab, dim = args.vocab_size, args.dim
    if n > 1 and vocab > 0 and vocab % n == 0 and shape == (vocab // n, dim):
        return True
    if len(shape) == 2 and shape[1] * n == dim and (vocab <= 0 or shape[0] == vocab):
        return False
    parts = _share_count(shape, vocab, dim)
    # a replicated norm of params.json's width tells a share from a params.json of the wrong dim
    norm_fits = "norm.weight" in f.keys() and f.info("norm.weight")[0] == (dim,)
    if parts is not None and parts != n and norm_fits:
        d, ext = files[0].parent, files[0].suffix
        if parts > n:
            odd = [f"consolidated.{i:02d}{ext}" for i in range(n, parts)]
            problem, todo = ("is" if len(odd) == 1 else "are") + " missing", "copy every shard into the folder"
        else:
            odd = [p.name for p in files[parts:]]
            problem, todo = "is one shard too many" if len(odd) == 1 else "are shards too many", \
                "remove the extra file(s) (from another checkpoint?)"
        raise LlamaInputError(
            f"{d}: {', '.join(odd)} {problem}: tok_embeddings.weight in {files[0].name} has shape {shape}, 1/{parts} "
            f"of the ({vocab}, {dim}) params.json implies, so this looks like a {parts}-shard checkpoint with {n} "
            f"shard file(s) here; {todo}")
    if n == 1:
        return None
    raise LlamaInputError(
        f"{files[0]}: tok_embeddings.weight has shape {shape}, neither a vocabulary split "
        f"({vocab // n if vocab > 0 else 'vocab/n'}, {dim}) nor a dim split ({vocab if vocab > 0 else 'vocab'}, "
        f"{dim / n:g}) of the {n}-shard model params.json describes")


def _share_count(shape: tuple, vocab: int, dim: int) -> Optional[int]:
    """Into how many parts an embedding share of this shape splits the whole one, if it is one."""
    if len(shape) != 2 or not all(shape):
        return None
    if shape[1] == dim and vocab > 0 and vocab % shape[0] == 0:
        return vocab // shape[0]
    if (shape[0] == vocab or vocab <= 0) and dim % shape[1] == 0:  # vocab -1 (LLaMA-1): a dim split
        return dim // shape[1]
    return None


def merged_shards(files: list[Path], args: ModelArgs) -> dict:
    """The whole tensors of a checkpoint in several shards, each made of its shards' parts along
    its split dim. Every shard must hold the same tensors, replicated ones alike (equal values:
    shards of another checkpoint with the same shapes show only there), split ones of equal
    shares."""
    opened = [open_tensor_file(f) for f in files]
    keys = [k for k in opened[0].keys() if not IGNORED_KEYS.search(k)]
    for f, o in zip(files[1:], opened[1:]):
        mine = {k for k in o.keys() if not IGNORED_KEYS.search(k)}
        if mine != set(keys):
            odd = sorted(set(keys) - mine) or sorted(mine - set(keys))
            here, there = ("missing", "present") if set(keys) - mine else ("present", "missing")
            raise _disagree(f, f"tensor {odd[0]} is {here} here but {there} in {files[0].name}")
    tensors = {}
    for key in keys:
        shapes, dtypes = zip(*(o.info(key) for o in opened))
        if len(set(dtypes)) > 1:
            i = next(i for i, t in enumerate(dtypes) if t != dtypes[0])
            raise _disagree(files[i], f"{key} is {dtypes[i]} here but {dtypes[0]} in {files[0].name}")
        dim = split_dim(key, args) if len(files) > 1 else None
        i = next((i for i, s in enumerate(shapes) if s != shapes[0]), None)
        if i is not None:  # a split tensor's shares are equal too (fairscale's and our splits alike)
            raise _disagree(files[i], f"{key} has shape {shapes[i]} here but {shapes[0]} in {files[0].name}")
        if dim is None:
            i = next((i for i, o in enumerate(opened[1:], 1) if not torch.equal(o.get(key), opened[0].get(key))), None)
            if i is not None:
                raise _disagree(files[i], f"replicated tensor {key} holds other values than in {files[0].name}")
            tensors[key] = single_part(opened[0], key)
            continue
        if len(shapes[0]) <= dim:
            raise LlamaInputError(f"{files[0]}: {key} has shape {shapes[0]}, no split dim {dim}")
        full = shapes[0][:dim] + (sum(s[dim] for s in shapes),) + shapes[0][dim + 1:]
        parts = [Part(o, key, s) for o, s in zip(opened, shapes)]
        tensors[key] = TensorEntry(key, full, dtypes[0], parts, cat_dim=dim)
    return tensors


def _disagree(shard: Path, what: str) -> LlamaInputError:
    return LlamaInputError(f"{shard}: the shards disagree: {what} (shards of two different checkpoints?); take "
                           f"every consolidated.NN file from one checkpoint")


META = MetaLayout("meta", ".pth")
