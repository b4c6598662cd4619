"""`torchrun --nproc_per_node N example.py` on split checkpoints (gloo, CPU) prints what one
process prints on the original: MHA split into 2 and 4, GQA (n_kv_heads 2) split into 2."""
import shutil
import sys

import pytest

from llama.formats import save_checkpoint
from split.reshard import split_checkpoint
from tests.utils import PROMPTS, peaked_random_model, prompt_flags, run, tiny_args


def source(tmp_path_factory, tokenizer_path, n_kv_heads):
    d = tmp_path_factory.mktemp(f"kv{n_kv_heads}") / "src"
    # larger weights than the default, so greedy text is not one repeated token
    model = peaked_random_model(tiny_args(n_kv_heads=n_kv_heads), seed=3, std=0.15)
    save_checkpoint(model, d)
    shutil.copy(tokenizer_path, d / "tokenizer.model")
    single = run([sys.executable, "example.py", "--ckpt_dir", str(d)] + prompt_flags(), timeout=240)
    assert single.returncode == 0, single.stderr
    return d, single.stdout.splitlines()


@pytest.fixture(scope="module")
def mha(tmp_path_factory, tokenizer_path):
    return source(tmp_path_factory, tokenizer_path, 4)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory, tokenizer_path):
    return source(tmp_path_factory, tokenizer_path, 2)


@pytest.mark.parametrize("case,n", [("mha", 2), ("mha", 4), ("gqa", 2)])
def test_torchrun_on_split_checkpoint_prints_what_one_process_prints(request, case, n):
    src, want = request.getfixturevalue(case)
    out, _ = split_checkpoint(src, n, progress=False)
    assert len(list(out.glob("consolidated.*.safetensors"))) == n
    got = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
               "example.py", "--ckpt_dir", str(out)] + prompt_flags(), timeout=240)
    assert got.returncode == 0, got.stderr
    lines = [ln for ln in got.stdout.splitlines() if not ln.startswith("> initializing")]
    assert lines == want
    assert sum(ln.startswith("> ") for ln in lines) == len(PROMPTS)
