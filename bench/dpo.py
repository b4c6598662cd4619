"""DPO LoRA training steps on bench-58M: ours (task dpo, the reference is the base with the
adapter switched off) against TRL's DPOTrainer with a PEFT LoRA (its reference likewise), same
weights, same pairs, same batch.

    python bench/dpo.py                       # CPU, float32, 2 pairs of prompt 96 + answers 32, 5 timed steps
    python bench/dpo.py --device cuda --dtype bfloat16 --pairs 4 --prompt 384 --answer 128

LoRA r 8, alpha 16, no dropout, on q and v; sigmoid loss, beta 0.1; AdamW lr 1e-4. Every pair
has the same prompt and answer lengths, so neither side pads (ours pads left, TRL right) and both
compute on the same [2 x pairs, prompt + answer] tokens. TRL's vocabulary is a word-level
tokenizer of the bench model's 32000 ids ("t17" -> 17; 0, 1, 2 are <pad>, <s>, </s>), so
its text round-trips to our ids (checked).
Ours is the trainer's own pieces (`finetune.adapters.attach`, `TaskModel`, `collate`, the
trainer's AdamW); TRL's is `DPOTrainer.train()`, each step timed from its callback's
on_step_begin to on_step_end (forward of policy and reference, backward, optimizer step).
tokens/s = 2 x pairs x (prompt + answer) / step time, median over --rounds fresh processes per
peer (alternating) of --runs steps after 2 warm-up steps; peak resident memory (or peak CUDA
memory) of each process, also above its memory once its libraries are imported. Step 1's losses
(ln 2 for both: a fresh adapter is its own reference) check that both compute DPO. Appends one
row to bench/results.jsonl.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import BENCH_58M, append_row, gpu_ceilings, median, peak_rss_bytes, run_fresh, timed, write_hf_checkpoint


def pairs_of(a) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids, fixed by seed 1; answers end with id 2 (eos)."""
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, BENCH_58M["vocab_size"], (n,), generator=g).tolist()

    return [([1] + ids(a.prompt - 1), ids(a.answer - 1) + [2], ids(a.answer - 1) + [2]) for _ in range(a.pairs)]


def ours_steps(a, dtype, steps: int) -> tuple[list[float], list[float]]:
    from finetune.adapters import attach
    from finetune.config import TrainConfig
    from finetune.data import PairExample, collate
    from finetune.trainer import make_optimizer
    from llama.formats import read_model_args
    from llama.loader import load_model

    cfg = TrainConfig(method="lora", task="dpo", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_targets=["wq", "wv"],
                      lr=1e-4, dpo_beta=0.1)
    model = load_model(a.ckpt, read_model_args(a.ckpt), dtype, a.device)
    task_model = attach(model, cfg, tokenizer=None).train()
    optimizer = make_optimizer([p for p in task_model.parameters() if p.requires_grad], cfg)
    batch = {k: v.to(a.device) for k, v in collate([PairExample(*p) for p in pairs_of(a)], 0, "dpo").items()}
    losses = []

    def step():
        with torch.autocast(a.device, dtype=dtype, enabled=dtype != torch.float32):
            loss, count, _ = task_model(**batch)
        loss = loss / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    sync = torch.cuda.synchronize if a.device == "cuda" else lambda: None
    return timed(step, steps - 2, warmup=2, sync=sync), losses


def trl_steps(a, dtype, steps: int) -> tuple[list[float], list[float]]:
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOTrainer

    # the special tokens' names must not occur inside other words ("t1" in "t154"): HF matches them anywhere
    names = ["<pad>", "<s>", "</s>"] + [f"t{i}" for i in range(3, BENCH_58M["vocab_size"])]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<pad>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<pad>")

    def text(ids):
        return "".join(f" {names[i]}" for i in ids)

    # the answers' eos is in the text already; TRL adds none when it is there
    rows = [{"prompt": text(p), "chosen": text(c), "rejected": text(r)} for p, c, r in pairs_of(a)]
    data = Dataset.from_list(rows * steps)  # one batch per step, the same pairs each time
    model = LlamaForCausalLM.from_pretrained(a.ckpt, dtype=dtype).to(a.device)
    args = dpo_config(a, dtype, steps)
    times, losses, started = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            started.append(time.perf_counter())

        def on_step_end(self, *args, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started[-1])

        def on_log(self, _args, _state, _control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
                         callbacks=[Timer()])
    first = trainer.train_dataset[0]
    if (first["prompt_ids"], first["chosen_ids"], first["rejected_ids"]) != pairs_of(a)[0]:
        raise RuntimeError("TRL's tokens are not our pairs'")  # the comparison would not be like for like
    trainer.train()
    return times[2:], losses


def dpo_config(a, dtype, steps: int):
    """TRL's settings matching ours: constant lr 1e-4 (ours has no schedule in this loop), no
    clipping, no weight decay, the batch in order, nothing logged or saved but the loss."""
    from trl import DPOConfig

    return DPOConfig(output_dir=a.out, per_device_train_batch_size=a.pairs, max_steps=steps, learning_rate=1e-4,
                     lr_scheduler_type="constant", weight_decay=0.0, beta=0.1, max_length=None, report_to=[],
                     logging_steps=1, save_strategy="no", use_cpu=a.device == "cpu", bf16=dtype == torch.bfloat16,
                     dataloader_num_workers=0, seed=0, max_grad_norm=0.0, disable_tqdm=True)


def worker(a) -> None:
    """In a fresh process: one peer's steps, timed; prints a JSON line."""
    dtype = getattr(torch, a.dtype)
    if a.worker == "trl":
        import datasets, peft, transformers, trl  # noqa: F401,E401  (libraries aren't the workload)
    else:
        import finetune.trainer  # noqa: F401
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = peak_rss_bytes()
    times, losses = (ours_steps if a.worker == "ours" else trl_steps)(a, dtype, a.runs + 2)
    peak = torch.cuda.max_memory_allocated() if a.device == "cuda" else peak_rss_bytes()
    tokens = 2 * a.pairs * (a.prompt + a.answer)
    print(json.dumps({"tok_s": [round(tokens / t, 1) for t in times], "losses": losses, "peak_bytes": peak,
                      "baseline_bytes": 0 if a.device == "cuda" else baseline}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="base weights and autocast of both peers (default float32)")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (default 2: 4 sequences)")
    p.add_argument("--prompt", type=int, default=96, help="prompt tokens, bos included (default 96)")
    p.add_argument("--answer", type=int, default=32, help="tokens of each answer, eos included (default 32)")
    p.add_argument("--runs", type=int, default=5, help="timed steps per process after 2 warm-up steps (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per peer, alternating (default 2)")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    common_args = ["--device", a.device, "--dtype", a.dtype, "--pairs", str(a.pairs), "--prompt", str(a.prompt),
                   "--answer", str(a.answer), "--runs", str(a.runs)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(write_hf_checkpoint(Path(tmp) / "hf"))
        for _ in range(a.rounds):  # peers take turns, so a slow spell of the machine hits both
            for impl in ("ours", "trl"):
                got = run_fresh(["bench/dpo.py", "--worker", impl, "--ckpt", ckpt, "--out", str(Path(tmp) / "trl"),
                                 *common_args])
                got["above_baseline_bytes"] = got["peak_bytes"] - got["baseline_bytes"]
                pooled = results.setdefault(impl, got)
                if pooled is not got:
                    pooled["tok_s"] += got["tok_s"]
                    for key in ("peak_bytes", "above_baseline_bytes"):
                        pooled[key] = max(pooled[key], got[key])

    gib = 2 ** 30
    ours, trl = results["ours"], results["trl"]
    summary = {"ours_tok_s": round(median(ours["tok_s"]), 1), "trl_tok_s": round(median(trl["tok_s"]), 1),
               "ours_peak_gib": round(ours["peak_bytes"] / gib, 3), "trl_peak_gib": round(trl["peak_bytes"] / gib, 3),
               "ours_peak_above_baseline_gib": round(ours["above_baseline_bytes"] / gib, 3),
               "trl_peak_above_baseline_gib": round(trl["above_baseline_bytes"] / gib, 3),
               "step1_loss": [round(ours["losses"][0], 5), round(trl["losses"][0], 5)]}
    summary["ratio"] = round(summary["ours_tok_s"] / summary["trl_tok_s"], 2)
    print(f"bench-58M DPO LoRA, {a.pairs} pairs x (prompt {a.prompt} + answer {a.answer}), {a.dtype}, {a.device}, "
          f"{torch.get_num_threads()} threads, median of {a.runs} steps x {a.rounds} rounds")
    print(f"  ours {summary['ours_tok_s']:8.1f} tok/s   trl {summary['trl_tok_s']:8.1f} tok/s   ratio "
          f"{summary['ratio']:.2f}x   peak above baseline: ours {summary['ours_peak_above_baseline_gib']:.3f} GiB, "
          f"trl {summary['trl_peak_above_baseline_gib']:.3f} GiB   step-1 loss {summary['step1_loss']}")
    result = {"workload": "bench-58M", "shape": BENCH_58M, "dtype": a.dtype, "pairs": a.pairs, "prompt": a.prompt,
              "answer": a.answer, "runs": a.runs, "rounds": a.rounds, "summary": summary, "raw": results}
    if a.device == "cuda":
        result["ceilings"] = gpu_ceilings()
    append_row("dpo", result, "bench/dpo.py", a.device)


if __name__ == "__main__":
    main()
