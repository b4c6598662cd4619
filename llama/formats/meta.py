"""Meta's layout: `params.json` + `consolidated.NN.pth` (Meta's release, one file per
tensor-parallel rank, fairscale's split dims), and ours, the same keys and layout in
`consolidated.NN.safetensors`."""
import re
from dataclasses import replace
from pathlib import Path
from typing import Optional

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
        if len(list(d.glob(f"consolidated.*{self.ext}"))) > 1:
            files = self.shard_files(d)  # a missing shard is named before the shapes are read
            args = replace(args, vocab_parallel=embedding_split(files[0], len(files), args))
        return args

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
            tensors = merged_shards(d, files, args)
        return Checkpoint(d, self.name, args, tensors, [d / "params.json"] + files, tokenizer_beside(d))


def embedding_split(shard: Path, n: int, args: ModelArgs) -> Optional[bool]:
    """Whether the n shards of a checkpoint split tok_embeddings along the vocabulary (Meta's
    Llama-3) rather than dim (Llama-1/2), from the first shard's share; None if it has none."""
    f = open_tensor_file(shard)
    if "tok_embeddings.weight" not in f.keys():
        return None
    shape, _ = f.info("tok_embeddings.weight")
    vocab, dim = args.vocab_size, args.dim
    if vocab > 0 and vocab % n == 0 and shape == (vocab // n, dim):
        return True
    if len(shape) == 2 and shape[1] * n == dim and (vocab <= 0 or shape[0] == vocab):
        return False
    parts = _share_count(shape, vocab, dim)
    if parts is not None:  # a whole split of another shard count
        problem = f"is a shard missing? ({parts} expected)" if parts > n else f"are there {n - parts} shard(s) too many?"
        raise LlamaInputError(f"{shard.parent}: {n} shard files, but tok_embeddings.weight in {shard.name} has shape "
                              f"{shape}, 1/{parts} of the ({vocab}, {dim}) params.json implies: {problem}")
    raise LlamaInputError(
        f"{shard}: tok_embeddings.weight has shape {shape}, neither a vocabulary split "
        f"({vocab // n if vocab > 0 else 'vocab/n'}, {dim}) nor a dim split ({vocab if vocab > 0 else 'vocab'}, "
        f"{dim / n:g}) of the {n}-shard model params.json describes")


def _share_count(shape: tuple, vocab: int, dim: int) -> Optional[int]:
    """Into how many parts an embedding share of this shape splits the whole one, if it is one."""
    if len(shape) != 2 or not all(shape):
        return None
    if shape[1] == dim and vocab > 0 and vocab % shape[0] == 0:
        return vocab // shape[0]
    if shape[0] == vocab and dim % shape[1] == 0:
        return dim // shape[1]
    return None


def merged_shards(d: Path, files: list[Path], args: ModelArgs) -> dict:
    """The whole tensors of a checkpoint in several shards, each made of its shards' parts along
    its split dim. Every shard must hold the same tensors, replicated ones alike, split ones
    lining up along the split dim."""
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
        shapes, dtypes = zip(*(o.info(key) for o in opened))
        if len(set(dtypes)) > 1:
            raise LlamaInputError(f"{d}: tensor {key} has different dtypes across shards: {sorted(map(str, set(dtypes)))}")
        dim = split_dim(key, args) if len(files) > 1 else None
        if dim is None:
            if len(set(shapes)) > 1:
                raise LlamaInputError(f"{d}: replicated tensor {key} has different shapes across shards: {sorted(set(shapes))}")
            tensors[key] = single_part(opened[0], key)
            continue
        rest = {s[:dim] + s[dim + 1:] for s in shapes}
        if any(len(s) <= dim for s in shapes) or len(rest) > 1:
            raise LlamaInputError(f"{d}: shards of {key} don't line up along split dim {dim}: shapes {list(shapes)}")
        full = shapes[0][:dim] + (sum(s[dim] for s in shapes),) + shapes[0][dim + 1:]
        parts = [Part(o, key, s) for o, s in zip(opened, shapes)]
        tensors[key] = TensorEntry(key, full, dtypes[0], parts, cat_dim=dim)
    return tensors


META = MetaLayout("meta", ".pth")
