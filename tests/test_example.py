"""example.py end to end: one process vs `torchrun --nproc_per_node 2` on a 2-shard checkpoint
(gloo, CPU), the no-checkpoint message, and --device cuda on a machine without a GPU."""
import sys

import pytest
import torch

from llama.tiny import random_model
from tests.utils import DEMO_TRAIN, PROMPTS, peaked_random_model, prompt_flags, run, tiny_args, write_meta


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_torchrun_two_shards_prints_what_one_process_prints(tmp_path, tokenizer_path, n_kv_heads):
    args = tiny_args(n_kv_heads=n_kv_heads)
    model = peaked_random_model(args, seed=3, std=0.15)
    state = model.state_dict()
    write_meta(state, args, tmp_path / "one", 1, tokenizer_path)
    write_meta(state, args, tmp_path / "two", 2, tokenizer_path)

    single = run([sys.executable, "example.py", "--ckpt_dir", str(tmp_path / "one")] + prompt_flags(), timeout=240)
    assert single.returncode == 0, single.stderr
    parallel = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "example.py", "--ckpt_dir", str(tmp_path / "two")] + prompt_flags(), timeout=240)
    assert parallel.returncode == 0, parallel.stderr
    # fairscale announces its groups on stdout; the rest must be identical
    lines = [ln for ln in parallel.stdout.splitlines() if not ln.startswith("> initializing")]
    assert lines == single.stdout.splitlines()
    assert sum(ln.startswith("> ") for ln in lines) == len(PROMPTS)


def test_shard_count_mismatch_names_split_model(tmp_path, tokenizer_path):
    args = tiny_args()
    write_meta(random_model(args).state_dict(), args, tmp_path / "one", 1, tokenizer_path)
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "example.py", "--ckpt_dir", str(tmp_path / "one"), "--prompt", "hi"], timeout=240)
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("entry", ["example.py", "ft_main.py", "example.py --devices"])
def test_cuda_without_a_gpu_is_one_line(tmp_path, tokenizer_path, entry):
    """--device cuda (or a GPU in --devices) on a machine without CUDA: one `error:` line that
    says no GPU is visible, exit 2, no traceback, before any weight is loaded."""
    args = tiny_args()
    write_meta(random_model(args).state_dict(), args, tmp_path / "ckpt", 1, tokenizer_path)
    script, *extra = entry.split()
    where = ["--devices", "cuda:0,cpu"] if extra else ["--device", "cuda"]
    rest = ["--prompt", "hi"] if script == "example.py" else ["--train_file", str(DEMO_TRAIN), "--out_dir", str(tmp_path / "out")]
    result = run([sys.executable, script, "--ckpt_dir", str(tmp_path / "ckpt"), *where, *rest], timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: device cuda") and "no GPU is visible" in lines[0], lines
    assert not (tmp_path / "out").exists()
