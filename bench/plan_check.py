"""The memory planner (finetune/plan.py) against measured peaks: CPU training steps on small
LLaMA shapes, each in a fresh process.

    python bench/plan_check.py            # the cases of tests/finetune/test_plan.py, as a table (~1 min)

Each case runs in a fresh process (`--worker CASE`, started through bench/common.py's launcher so
that its ru_maxrss is its own) with MALLOC_MMAP_THRESHOLD_=131072, so that glibc returns freed
tensors to the system and RSS follows the tensors (see ALLOCATOR below). It builds the model
(random float32 weights), runs one warm-up step of the same method on a tiny model (which pages
in the kernels' code and thread buffers: ~30 MiB that any first step adds, whatever its size),
notes its resident memory (the baseline: imports, the loaded model, warm code), attaches the method as the trainer does
(finetune.adapters.attach), makes the trainer's AdamW (make_optimizer) and runs 3 steps as
finetune/trainer.py's train_step does for one micro-batch (forward through TaskModel with
pad_lens, backward of the mean loss, clip_grad_norm, optimizer step, zero_grad), then reports
peak RSS (ru_maxrss) minus the baseline.

The planner's figure is its CPU estimate of what a training step adds to the loaded model:
trainable + gradients + optimizer + activations (DeviceMemory.training_step); for full
fine-tuning of a float32 model the trainable weights are the loaded ones (already in the
baseline), so they are left out of the comparison.
"""
import argparse
import gc
import json
import os
import resource
import sys

from common import run_fresh

# Each case: model shape, trainer keys, and micro batches. 3 steps each: the second and later
# run with AdamW's state allocated.
CASES = [
    {"name": "lora-qv-dropout", "model": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000),
     "cfg": dict(method="lora", lora_targets=["wq", "wv"], lora_dropout=0.05, cutoff_len=256), "batches": [2, 4]},
    {"name": "lora-all-linear", "model": dict(dim=256, n_layers=4, n_heads=4, vocab_size=32000),
     "cfg": dict(method="lora", lora_targets=["all-linear"], lora_dropout=0.0, cutoff_len=256), "batches": [4]},
    {"name": "full", "model": dict(dim=256, n_layers=4, n_heads=4, vocab_size=8000),
     "cfg": dict(method="full", cutoff_len=128), "batches": [2, 8]},
]
STEPS = 3
# glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in its heap, where
# later requests fragment them: with the default allocator the same steps peak up to ~1.8x higher
# (see --default-malloc). The planner counts tensors, not the allocator's slack.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def rss_bytes() -> int:
    """This process's resident memory now (/proc/self/statm, Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(case: dict, batch: int) -> dict:
    from finetune.adapters import attach
    from finetune.config import TrainConfig
    from llama.config import ModelArgs
    from llama.tiny import random_model

    cfg = TrainConfig(**case["cfg"], micro_batch_size=batch, dtype="float32", device="cpu").check()
    train_steps(attach(random_model(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=256)), cfg, None).train(),
                cfg, batch=1, seq=8, steps=1)  # warm-up: the same kernels, on a tiny model
    model = random_model(ModelArgs(**case["model"]))
    gc.collect()
    baseline = rss_bytes()
    train_steps(attach(model, cfg, None).train(), cfg, batch, cfg.cutoff_len, STEPS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline": baseline, "peak": peak, "increase": peak - baseline}


def train_steps(task_model, cfg, batch: int, seq: int, steps: int) -> None:
    """The trainer's step for one micro-batch of full rows (finetune/trainer.py train_step)."""
    import torch

    from finetune.trainer import clip_grad_norm, make_optimizer

    params = [p for p in task_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    vocab = task_model.transformer.args.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    pad_lens = torch.zeros(batch, dtype=torch.long)  # what collate passes for full rows
    for _ in range(steps):
        loss, count, _ = task_model(tokens, tokens, pad_lens)
        (loss / count).backward()
        clip_grad_norm(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def estimate(case: dict, batch: int) -> dict:
    """The planner's CPU figures for a case, and the part compared with the measured increase."""
    from finetune.config import TrainConfig
    from finetune.plan import Devices, plan, resolve
    from llama.config import ModelArgs

    cfg = TrainConfig(**case["cfg"], micro_batch_size=batch, dtype="float32", device="cpu").check()
    setup = resolve(cfg, ModelArgs(**case["model"]), Devices("cpu", 1, 1 << 40), "single", "none")
    mem = plan(setup)[0]
    compared = mem.training_step - (mem.trainable if cfg.method == "full" else 0)
    return {"activations": mem.activations, "gradients": mem.gradients, "optimizer": mem.optimizer,
            "trainable": mem.trainable, "compared": compared}


def measure(case: dict, batch: int, default_malloc: bool = False) -> dict:
    """The worker's figures, in a fresh process (with ALLOCATOR's setting unless default_malloc)."""
    saved = dict(os.environ)
    if not default_malloc:
        os.environ.update(ALLOCATOR)
    try:
        return run_fresh([__file__, "--worker", json.dumps(case), "--batch", str(batch)], timeout=300)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", metavar="CASE", help="internal: run one case (JSON) in this process and print JSON")
    p.add_argument("--batch", type=int, help="internal: the worker's micro batch")
    p.add_argument("--default-malloc", action="store_true",
                   help="also measure with glibc's default allocator settings (a second column)")
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker), a.batch)))
        return
    MiB = 2**20
    print(f"{'case':18} {'batch':>5} {'seq':>4} {'estimate MiB':>13} {'measured MiB':>13} {'est/meas':>9}"
          + (f" {'default malloc':>15}" if a.default_malloc else "") + "  (activations / grads+optimizer estimated)")
    for case in CASES:
        for batch in case["batches"]:
            est, got = estimate(case, batch), measure(case, batch)
            extra = f" {measure(case, batch, True)['increase'] / MiB:15.1f}" if a.default_malloc else ""
            print(f"{case['name']:18} {batch:5d} {case['cfg']['cutoff_len']:4d} {est['compared'] / MiB:13.1f} "
                  f"{got['increase'] / MiB:13.1f} {est['compared'] / got['increase']:9.3f}{extra}  "
                  f"({est['activations'] / MiB:.1f} / {(est['gradients'] + est['optimizer']) / MiB:.1f})")


if __name__ == "__main__":
    sys.exit(main())
