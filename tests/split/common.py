"""Helpers for the split tests, written independently of split/: Meta's fairscale split rule
from REFERENCE.md, checkpoint writers, and split_model.py run in-process."""
import json
import shutil

import torch
from safetensors.torch import load_file

import split_model

COLUMN, ROW = ("wq", "wk", "wv", "w1", "w3", "output"), ("wo", "w2", "tok_embeddings")


def fs_dim(key: str):
    """Column-parallel weights split on dim 0, row-parallel and the embedding on dim 1, norms whole."""
    name = key.split(".")[-2]
    return 0 if name in COLUMN else 1 if name in ROW else None


def chunk_state(state: dict, n: int) -> list[dict]:
    shards = [{} for _ in range(n)]
    for key, t in state.items():
        dim = fs_dim(key)
        for rank, shard in enumerate(shards):
            shard[key] = t if dim is None else torch.chunk(t, n, dim)[rank].clone()
    return shards


def params_of(args) -> dict:
    params = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                  vocab_size=args.vocab_size, multiple_of=args.multiple_of, norm_eps=args.norm_eps)
    if args.hidden_dim is not None:
        params["hidden_dim"] = args.hidden_dim
    return params


def write_meta(state: dict, args, out, n: int, tokenizer_path=None):
    """Meta's layout: consolidated.NN.pth (torch.save of each rank's dict) + params.json."""
    out.mkdir(parents=True)
    for rank, shard in enumerate(chunk_state(state, n)):
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
    (out / "params.json").write_text(json.dumps(params_of(args)))
    if tokenizer_path is not None:
        shutil.copy(tokenizer_path, out / "tokenizer.model")
    return out


def load_dir(d) -> list[dict]:
    """Every consolidated.NN file of a folder, with the safetensors library or plain torch.load."""
    files = sorted(d.glob("consolidated.*"))
    return [load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=True) for f in files]


def run_split(*argv) -> int:
    return split_model.main([str(a) for a in argv] + ["--quiet"])


def assert_same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        assert torch.equal(got[key], want[key]), key
