"""example.py end to end: one process vs `torchrun --nproc_per_node 2` on a 2-shard checkpoint
(gloo, CPU), and the no-checkpoint message."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from llama.tiny import random_model
from tests.utils import ROOT, tiny_args

PROMPTS = ["The red cat", "What is 12 plus 30? The answer", "hi"]
COLUMN, ROW = ("wq", "wk", "wv", "w1", "w3", "output"), ("wo", "w2", "tok_embeddings")


def write_meta_shards(state: dict, args, out, n: int, tokenizer_path) -> None:
    """Meta's fairscale layout, written here independently of the package: column-parallel
    weights split on dim 0, row-parallel and the embedding on dim 1, norms replicated."""
    out.mkdir()
    for rank in range(n):
        shard = {}
        for key, t in state.items():
            name = key.split(".")[-2]
            dim = 0 if name in COLUMN else 1 if name in ROW else None
            shard[key] = t if dim is None else t.chunk(n, dim)[rank].clone()
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
    params = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                  vocab_size=args.vocab_size, multiple_of=args.multiple_of, norm_eps=args.norm_eps)
    (out / "params.json").write_text(json.dumps(params))
    shutil.copy(tokenizer_path, out / "tokenizer.model")


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env, **kw)


def prompt_flags():
    return [f for p in PROMPTS for f in ("--prompt", p)] + ["--temperature", "0", "--max_gen_len", "16"]


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_torchrun_two_shards_prints_what_one_process_prints(tmp_path, tokenizer_path, n_kv_heads):
    args = tiny_args(n_kv_heads=n_kv_heads)
    model = random_model(args, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(std=0.15)
    state = model.state_dict()
    write_meta_shards(state, args, tmp_path / "one", 1, tokenizer_path)
    write_meta_shards(state, args, tmp_path / "two", 2, tokenizer_path)

    single = run([sys.executable, "example.py", "--ckpt_dir", str(tmp_path / "one")] + prompt_flags())
    assert single.returncode == 0, single.stderr
    parallel = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "example.py", "--ckpt_dir", str(tmp_path / "two")] + prompt_flags())
    assert parallel.returncode == 0, parallel.stderr
    # fairscale announces its groups on stdout; the rest must be identical
    lines = [ln for ln in parallel.stdout.splitlines() if not ln.startswith("> initializing")]
    assert lines == single.stdout.splitlines()
    assert sum(ln.startswith("> ") for ln in lines) == len(PROMPTS)


def test_shard_count_mismatch_names_split_model(tmp_path, tokenizer_path):
    args = tiny_args()
    write_meta_shards(random_model(args).state_dict(), args, tmp_path / "one", 1, tokenizer_path)
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "example.py", "--ckpt_dir", str(tmp_path / "one"), "--prompt", "hi"])
    assert result.returncode != 0
    assert "split_model.py --n 2" in result.stderr
    # the ranks print one-line errors; the only traceback is torchrun's own report of their exit
    assert "error: rank 0:" in result.stderr and "error: rank 1:" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr


def test_no_checkpoint_explains_how_to_get_one(tmp_path, monkeypatch, capsys):
    import example

    monkeypatch.setattr(example, "DEMO_CKPT", tmp_path / "no_demo_here")
    assert example.main([]) == 2
    err = capsys.readouterr().err
    assert "python ft_main.py" in err and "python -m llama.tiny" in err
