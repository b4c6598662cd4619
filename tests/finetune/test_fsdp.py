"""sharding = "fsdp" (torch's FSDP2) under torchrun on CPU with gloo, 2 ranks, against one process
with the same global batch: the step losses, gradient norms and eval losses agree within 1e-4
(full, freeze, LoRA; gradient accumulation; activation checkpointing), the trained weights written
whole (gathered one tensor at a time) equal one process's, and a run resumed from its sharded
checkpoint continues exactly. The gradients themselves are compared in test_fsdp_gradients_*:
FSDP2 averages them with ReduceOp.AVG, which gloo has been reported to sum (pytorch issue 162338)."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from llama.errors import LlamaInputError
from tests.finetune.test_torchrun import COMMON, adapter, assert_same_run
from tests.utils import (
    ROOT, assert_same_tensors, metrics_by_step as metrics, one_process, tiny_args, torchrun, write_ckpt,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_path):
    return write_ckpt(tmp_path_factory.mktemp("fsdp"), tiny_args(n_kv_heads=2), tokenizer_path, seed=3)


@pytest.mark.parametrize("method, kw", [
    ("full", dict(lr=2e-3)),
    ("freeze", dict(lr=2e-3, train_layers=1, grad_accum=2)),
    ("lora", dict(grad_checkpointing=True)),
])
def test_fsdp_matches_one_process(ckpt, tmp_path, method, kw):
    kw = dict(method=method, micro_batch_size=2, **kw)
    sharded = tmp_path / "fsdp"
    result = torchrun(COMMON, ckpt, sharded, sharding="fsdp", **kw)
    assert "tensor-parallel 1 x data-parallel 2 (fsdp)" in result.stdout
    one_process(COMMON, ckpt, tmp_path / "one", **{**kw, "micro_batch_size": 4})
    assert_same_run(sharded, tmp_path / "one", tol=1e-4)
    losses = [r["loss"] for k, r in sorted(metrics(sharded).items()) if k[1] == "train"]
    assert losses[-1] < losses[0]
    if method == "lora":
        assert_same_tensors(adapter(sharded), adapter(tmp_path / "one"), tol=3e-5)
    else:  # gathered to one whole file by rank 0, exported as HF like one process's
        got = load_file(str(sharded / "model" / "model.safetensors"))
        want = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
        assert_same_tensors(got, want, tol=1e-5)


def test_fsdp_run_resumes_identically(ckpt, tmp_path):
    """Each rank saves its shards of the weights and AdamW's moments; resumed on 2 ranks from step
    3 the run logs what the uninterrupted one logged."""
    kw = dict(method="full", lr=2e-3, micro_batch_size=2, save_every=3, keep_last=5, eval_every=1,
              sharding="fsdp")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    torchrun(COMMON, ckpt, whole, **kw)
    step3 = whole / "checkpoints" / "step_000003"
    assert (step3 / "sharded" / ".metadata").is_file()  # torch.distributed.checkpoint's, each rank its shards
    result = torchrun(COMMON, ckpt, resumed, resume=str(step3), **kw)
    assert f"resumed from {step3} at step 3" in result.stdout
    assert_same_run(resumed, whole, tol=1e-6, steps={4, 5, 6})
    with pytest.raises(LlamaInputError, match="resume it with sharding = 'fsdp'"):
        one_process(COMMON, ckpt, tmp_path / "one", **{**kw, "sharding": "ddp", "resume": str(step3)})


def test_fsdp_run_killed_at_any_moment_resumes_identically(ckpt, tmp_path):
    """SIGKILL to every process of a 2-rank FSDP run at a seeded moment after its second
    checkpoint (mid-step or mid-save); the same command again resumes from the last whole
    checkpoint and logs what an uninterrupted run logs."""
    kw = dict(method="full", lr=2e-3, micro_batch_size=2, save_every=1, keep_last=2, eval_every=0, sharding="fsdp",
              max_steps=12)
    values = {**COMMON, "ckpt_dir": str(ckpt), "out_dir": str(tmp_path / "killed"), **kw}
    flags = [x for k, v in values.items() for x in (f"--{k}", ",".join(map(str, v)) if isinstance(v, list) else str(v))]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "ft_main.py"]
    proc = subprocess.Popen(command + flags, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "killed" / "checkpoints" / "step_000002").is_dir():
            assert proc.poll() is None and time.time() < deadline, "no step 2 checkpoint"
            time.sleep(0.01)
        time.sleep(random.Random(7).uniform(0.0, 0.5))
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    finally:
        proc.wait()
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it was killed"
    again = torchrun(COMMON, ckpt, tmp_path / "killed", **kw)
    assert "resumed from" in again.stdout and " at step 0" not in again.stdout
    torchrun(COMMON, ckpt, tmp_path / "whole", **kw)
    assert_same_run(tmp_path / "killed", tmp_path / "whole", tol=1e-6)
    assert not list((tmp_path / "killed" / "checkpoints").glob("*.partial"))


GRADIENTS = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from llama.tiny import random_model
from tests.utils import tiny_args
dist.init_process_group("gloo")
rank = dist.get_rank()
sharded, whole = random_model(tiny_args(), seed=0), random_model(tiny_args(), seed=0)
for layer in sharded.layers:
    fully_shard(layer)
fully_shard(sharded)
x = torch.randint(1, 300, (4, 16), generator=torch.Generator().manual_seed(1))
y = torch.randint(1, 300, (4, 16), generator=torch.Generator().manual_seed(2))
def loss(model, rows):
    return torch.nn.functional.cross_entropy(model(x[rows]).flatten(0, 1), y[rows].flatten())
loss(sharded, slice(2 * rank, 2 * rank + 2)).backward()  # each rank half the batch
loss(whole, slice(0, 4)).backward()  # the whole batch
worst = max((p.grad.full_tensor() - q.grad).abs().max().item() / q.grad.abs().max().item()
            for p, q in zip(sharded.parameters(), whole.parameters()))
if rank == 0:
    print(f"worst relative gradient difference {worst:.3g}", flush=True)
dist.barrier()  # leave together: gloo aborts a process whose peer tears down mid-collective
dist.destroy_process_group()
"""


def test_fsdp_gradients_are_the_average_over_ranks_on_gloo(tmp_path):
    """Each rank's half-batch mean loss, averaged by FSDP2's reduce-scatter, gives the whole
    batch's gradient: gloo averages (a sum would double every gradient)."""
    script = tmp_path / "grads.py"
    script.write_text(GRADIENTS)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    worst = float(result.stdout.split("worst relative gradient difference ")[1].split()[0])
    assert worst < 1e-5


def test_fsdp_bf16_mixed_precision_and_exact_match(ckpt, tmp_path):
    """precision bf16: parameters gathered in bf16, gradients reduced in float32; greedy
    generation for exact match runs on the sharded model (its embeddings and output gathered,
    under no_grad: inference-mode tensors would poison FSDP's reused buffers). The losses follow
    the float32 run within bf16's rounding."""
    kw = dict(method="full", lr=2e-3, micro_batch_size=2, sharding="fsdp", exact_match_samples=2, max_new_tokens=4)
    result = torchrun(COMMON, ckpt, tmp_path / "bf16", **{**kw, "precision": "bf16"})
    assert "exact match before training" in result.stdout and "exact match after training" in result.stdout
    torchrun(COMMON, ckpt, tmp_path / "fp32", **kw)
    first = {name: metrics(tmp_path / name)[(1, "train")]["loss"] for name in ("bf16", "fp32")}
    assert first["bf16"] == pytest.approx(first["fp32"], rel=2e-2)
    assert first["bf16"] != first["fp32"]  # bf16 did compute in bf16


@pytest.mark.parametrize("kw, says", [
    (dict(method="prompt"), "not method prompt"),
    (dict(task="cls", label_names=["a", "b"]), "not task cls"),
    (dict(merge=True), "python -m llama.export --adapter"),
    (dict(cpu_offload=True, sharding="ddp"), "cpu_offload needs sharding = 'fsdp'"),
])
def test_fsdp_refuses_what_it_cannot_do(ckpt, tmp_path, kw, says):
    from finetune.config import TrainConfig

    with pytest.raises(LlamaInputError, match=says.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{**COMMON, "ckpt_dir": str(ckpt), "out_dir": str(tmp_path), "sharding": "fsdp", **kw}).check()
