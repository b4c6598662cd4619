"""Training tokens/s and peak memory on bench-58M: ours against HF + PEFT (LoRA) and HF (full
fine-tuning), each as a plain loop of forward, loss, backward and AdamW step, and against the same
under transformers' `Trainer` (what LLaMA-Factory and most users run).

    python bench/train.py                          # CPU, float32, seq 256, batch 2, 5 timed steps
    python bench/train.py --dtype bfloat16 --modes lora   # a bf16 base (ours: float32 LoRA weights)
    python bench/train.py --device cuda --dtype bfloat16 --modes lora --seq 1024 --batch 8
    python bench/train.py --modes lora --runs 9 --peers hf   # the plain HF loop only

LoRA is r 8, alpha 16, no dropout, on q and v; full fine-tuning trains every weight. All peers
load one random float32 checkpoint (HF folder, seed 0) in --dtype and train on the same random tokens.
Ours is the trainer's own step (`finetune.adapters.attach`, `TaskModel`, the trainer's AdamW);
the plain HF loop is `model(input_ids, labels=input_ids).loss` with torch.optim.AdamW; the HF
Trainer runs `Trainer.train()` with its defaults (its AdamW, gradient clipping at 1.0, a linear
schedule) on an in-memory dataset of the same rows, no evaluation, no saving, a step's time taken
between its `on_step_end` callbacks. Each workload runs in a fresh process, so its peak resident
memory (or peak CUDA memory) is its own: reported whole and above the process's memory once its
libraries are imported. tokens/s = batch x seq / step time, median over --rounds processes (the
peers alternating) of --runs steps each after 2 warm-up steps; the step-0 losses of the peers
are compared as a check that all train the same model. Appends one row to bench/results.jsonl.
"""
import argparse
import json
import tempfile
from pathlib import Path

import torch

from common import BENCH_58M, append_row, gpu_ceilings, median, peak_rss_bytes, run_fresh, timed, write_hf_checkpoint

PEERS = {"lora": {"hf": "hf+peft", "trainer": "hf trainer+peft"}, "full": {"hf": "hf", "trainer": "hf trainer"}}


def ours_step(ckpt: str, mode: str, dtype, device: str, tokens):
    from finetune.adapters import attach
    from finetune.config import TrainConfig
    from finetune.trainer import make_optimizer
    from llama.formats import read_model_args
    from llama.loader import load_model

    cfg = TrainConfig(method=mode, lora_dropout=0.0, lora_targets=["wq", "wv"], lr=1e-4)
    model = load_model(ckpt, read_model_args(ckpt), dtype, device)
    task_model = attach(model, cfg, tokenizer=None).train()
    optimizer = make_optimizer([p for p in task_model.parameters() if p.requires_grad], cfg)

    def step():
        loss, count, _ = task_model(tokens, tokens)
        loss = loss / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def hf_model(ckpt: str, mode: str, dtype, device: str):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    return model.train()


def hf_step(ckpt: str, mode: str, dtype, device: str, tokens):
    model = hf_model(ckpt, mode, dtype, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)  # as ours

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def trainer_run(ckpt: str, mode: str, dtype, device: str, tokens, steps: int) -> tuple[list[float], list[float]]:
    """transformers.Trainer on the rows of tokens [batch, seq], one batch per step, for `steps`
    steps: (seconds of each step, between on_step_end callbacks, from the second; loss of each step)."""
    import time
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_begin(self, args, state, control, **kw):
            if not self.ends:
                self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=len(tokens), max_steps=steps, learning_rate=1e-4,
                                 weight_decay=0.0, logging_steps=1, save_strategy="no", eval_strategy="no",
                                 report_to="none", disable_tqdm=True, use_cpu=device == "cpu",
                                 dataloader_num_workers=0, seed=0)
        rows = [{"input_ids": row, "labels": row} for row in tokens.cpu()]
        clock = Clock()
        trainer = Trainer(model=hf_model(ckpt, mode, dtype, device), args=args, train_dataset=rows, callbacks=[clock])
        trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return [b - a for a, b in zip(clock.ends, clock.ends[1:])], losses


def worker(a) -> None:
    """In a fresh process: build one peer's step, time it, print a JSON line."""
    cuda = a.device == "cuda"
    dtype = getattr(torch, a.dtype)
    tokens = torch.randint(3, BENCH_58M["vocab_size"], (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(a.device)
    if a.worker != "ours":
        import peft, transformers  # noqa: F401,E401  (imported before the baseline: libraries aren't the workload)
    baseline = peak_rss_bytes()
    if a.worker == "trainer":
        times, losses = trainer_run(a.ckpt, a.mode, dtype, a.device, tokens, a.runs + 2)
        times = times[2:]  # as timed()'s 2 warm-up steps
    else:
        step = (ours_step if a.worker == "ours" else hf_step)(a.ckpt, a.mode, dtype, a.device, tokens)
        losses = []
        times = timed(lambda: losses.append(step()), a.runs, warmup=2, sync=torch.cuda.synchronize if cuda else lambda: None)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    print(json.dumps({"tok_s": [round(a.batch * a.seq / t, 1) for t in times], "losses": losses,
                      "peak_bytes": peak, "baseline_bytes": 0 if cuda else baseline,
                      "threads": torch.get_num_threads()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and compute of both peers (default float32)")
    p.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"], help="workloads (default both)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--batch", type=int, default=2, help="rows per step (default 2)")
    p.add_argument("--runs", type=int, default=5, help="timed steps per workload; the median counts (default 5)")
    p.add_argument("--rounds", type=int, default=2,
                   help="fresh processes per workload, ours and the peer alternating; their steps are pooled (default 2)")
    p.add_argument("--peers", nargs="+", choices=("hf", "trainer"), default=["hf", "trainer"],
                   help="peers beside ours: hf (a plain loop) and trainer (transformers' Trainer) (default both)")
    p.add_argument("--worker", choices=("ours", "hf", "trainer"), help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if a.dtype != "float32" and "full" in a.modes:  # ours trains float32 master weights whatever the base dtype
        p.error("full fine-tuning compares float32 only (ours keeps float32 weights to train); use --modes lora")

    common_args = ["--device", a.device, "--dtype", a.dtype, "--seq", str(a.seq), "--batch", str(a.batch),
                   "--runs", str(a.runs)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(write_hf_checkpoint(Path(tmp)))
        for _ in range(a.rounds):  # peers take turns, so a slow spell of the machine hits all
            for mode in a.modes:
                for impl in ("ours", *a.peers):
                    got = run_fresh(["bench/train.py", "--worker", impl, "--mode", mode, "--ckpt", ckpt, *common_args])
                    got["above_baseline_bytes"] = got["peak_bytes"] - got["baseline_bytes"]
                    pooled = results.setdefault(f"{mode} {'ours' if impl == 'ours' else PEERS[mode][impl]}", got)
                    if pooled is not got:
                        pooled["tok_s"] += got["tok_s"]
                        for key in ("peak_bytes", "above_baseline_bytes"):
                            pooled[key] = max(pooled[key], got[key])

    gib = 2 ** 30
    print(f"bench-58M training, batch {a.batch} x seq {a.seq}, {a.dtype}, {a.device}, "
          f"{torch.get_num_threads()} threads, median of {a.runs} steps x {a.rounds} rounds")
    summary = {}
    for mode in a.modes:
        ours = results[f"{mode} ours"]
        for impl in a.peers:
            name = PEERS[mode][impl]
            peer = results[f"{mode} {name}"]
            row = {"peer": name, "ours_tok_s": round(median(ours["tok_s"]), 1), "peer_tok_s": round(median(peer["tok_s"]), 1),
                   "ours_peak_gib": round(ours["peak_bytes"] / gib, 3), "peer_peak_gib": round(peer["peak_bytes"] / gib, 3),
                   "ours_peak_above_baseline_gib": round(ours["above_baseline_bytes"] / gib, 3),
                   "peer_peak_above_baseline_gib": round(peer["above_baseline_bytes"] / gib, 3),
                   "step0_loss": [round(ours["losses"][0], 5), round(peer["losses"][0], 5)]}
            row["ratio"] = round(row["ours_tok_s"] / row["peer_tok_s"], 2)
            summary[f"{mode} vs {name}"] = row
            print(f"  {mode:<5} ours {row['ours_tok_s']:8.1f} tok/s   {name:<16} {row['peer_tok_s']:8.1f} tok/s   "
                  f"ratio {row['ratio']:.2f}x   peak above baseline: ours {row['ours_peak_above_baseline_gib']:.2f} GiB, "
                  f"{name} {row['peer_peak_above_baseline_gib']:.2f} GiB   step-0 loss {row['step0_loss']}")
    result = {"workload": "bench-58M", "shape": BENCH_58M, "dtype": a.dtype, "batch": a.batch, "seq": a.seq,
              "threads": sorted({r["threads"] for r in results.values()}),
              "runs": a.runs, "rounds": a.rounds, "summary": summary, "raw": results}
    if a.device == "cuda":
        result["ceilings"] = gpu_ceilings()
        print("  ceilings:", result["ceilings"])
    append_row("train", result, "bench/train.py", a.device)


if __name__ == "__main__":
    main()
