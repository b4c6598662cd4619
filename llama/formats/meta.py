"""Meta's layout: `params.json` + `consolidated.NN.pth` (Meta's release, one file per
tensor-parallel rank, fairscale's split dims), and ours, the same keys and layout in
`consolidated.NN.safetensors`."""
import re
from pathlib import Path

from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.formats.base import Checkpoint, Format, Part, TensorEntry, find_file, single_part
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
        return ModelArgs.from_params_json(d / "params.json")

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
            tensors = merged_shards(d, files)
        return Checkpoint(d, self.name, args, tensors, [d / "params.json"] + files, find_file(d, "tokenizer.model"))


def merged_shards(d: Path, files: list[Path]) -> dict:
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
        dim = split_dim(key) if len(files) > 1 else None
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
