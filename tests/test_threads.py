"""Threads: llama.threads.set_threads (--threads / `threads = N`, else OMP_NUM_THREADS, else
PyTorch's default), through example.py in a subprocess and the trainer in this process; a bad
count is one clear error."""
import sys

import pytest
import torch

from finetune.trainer import train
from llama.errors import LlamaInputError
from llama.threads import set_threads
from llama.tiny import random_model
from tests.utils import run, tiny_args, trainer_config, write_meta


@pytest.fixture
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_set_threads_reads_omp_num_threads_and_a_count_overrides_it(monkeypatch, restore_threads):
    torch.set_num_threads(1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert set_threads(None) == 1 == torch.get_num_threads()  # nothing set: PyTorch's count is left alone
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert set_threads(None) == 3 == torch.get_num_threads()
    assert set_threads(2) == 2 == torch.get_num_threads()


@pytest.mark.parametrize("n, env, message", [
    (0, None, "threads = 0: expected a whole number of threads, at least 1"),
    (-2, None, "threads = -2: expected a whole number of threads, at least 1"),
    (None, "two", "OMP_NUM_THREADS='two': expected a whole number of threads, at least 1"),
    (None, "0", "OMP_NUM_THREADS = 0: expected a whole number of threads, at least 1"),
])
def test_bad_counts_are_refused(monkeypatch, restore_threads, n, env, message):
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    before = torch.get_num_threads()
    with pytest.raises(LlamaInputError) as e:
        set_threads(n)
    assert str(e.value) == message
    assert torch.get_num_threads() == before


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tokenizer_path):
    args = tiny_args()
    out = tmp_path_factory.mktemp("threads") / "ckpt"
    write_meta(random_model(args, seed=0).state_dict(), args, out, 1, tokenizer_path)
    return out


def example(ckpt, *flags, omp="1"):
    """example.py with dtype auto (whose first line names the thread count) and OMP_NUM_THREADS."""
    cmd = [sys.executable, "example.py", "--ckpt_dir", ckpt, "--prompt", "hi", "--max_gen_len", "1",
           "--temperature", "0", "--dtype", "auto", *flags]
    return run(cmd, timeout=120, env={"OMP_NUM_THREADS": omp})


@pytest.mark.parametrize("omp, flags, count", [("1", [], "1 CPU thread"), ("2", [], "2 CPU threads"),
                                               ("1", ["--threads", "2"], "2 CPU threads")])
def test_example_respects_omp_num_threads_and_threads_overrides_it(tiny_ckpt, omp, flags, count):
    result = example(tiny_ckpt, *flags, omp=omp)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("dtype auto: ") and first.endswith(f"; {count}"), first


@pytest.mark.parametrize("flags, omp, message", [
    (["--threads", "0"], "1", "error: threads = 0: expected a whole number of threads, at least 1"),
    ([], "lots", "error: OMP_NUM_THREADS='lots': expected a whole number of threads, at least 1"),
])
def test_example_refuses_a_bad_count_in_one_line(tiny_ckpt, flags, omp, message):
    result = example(tiny_ckpt, *flags, omp=omp)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == message


def test_trainer_sets_the_config_threads(tiny_ckpt, tmp_path, monkeypatch, capsys, restore_threads):
    """`threads = 3` wins over OMP_NUM_THREADS=1; the count is in the run's first lines."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train(trainer_config(tiny_ckpt, tmp_path, dtype="auto", max_steps=1, threads=3))
    assert torch.get_num_threads() == 3
    assert any(line.startswith("dtype auto: ") and line.endswith("; 3 CPU threads")
               for line in capsys.readouterr().out.splitlines())


def test_threads_key_is_checked(tiny_ckpt, tmp_path):
    with pytest.raises(LlamaInputError, match="threads = -1: expected a whole number of threads"):
        trainer_config(tiny_ckpt, tmp_path, threads=-1)
