"""The fine-tuning loop, one code path for 1..N processes.

World layout: a checkpoint split into T shards trains tensor-parallel over groups of T ranks
(fairscale); the W / T groups are data-parallel (DDP). One process may instead spread layers over
several devices (`devices`). Trainable parameters and optimizer state are float32; the frozen
base stays in `dtype`; matmuls run under bf16/fp16 autocast (fp16 with loss scaling).

Each optimizer step's loss is the mean over every target token (or sample) of the step, across
micro-batches and data-parallel ranks, so N processes with batch b follow the same trajectory as
one process with batch N*b, and gradient accumulation changes nothing but memory.
"""
import contextlib
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from llama.checkpoint import detect_format, read_model_args, save_checkpoint, shard_files
from llama.errors import LlamaInputError
from llama.files import atomic_write_bytes
from llama.generation import check_vocab, find_tokenizer, parse_dtype
from llama.parallel import (data_parallel_group, device_shares, model_parallel_rank, place_layers,
                            resolve_devices, setup_model_parallel)
from llama.tokenizer import Tokenizer
from finetune.adapters import attach, merged_state_dict, save_adapter
from finetune.config import TrainConfig
from finetune.data import DataConfig, collate, load_examples, micro_batch, pack
from finetune.evaluate import all_reduce_sum, eval_metrics, exact_match
from finetune.plot import plot_losses
from finetune.state import checkpoints, load_state, save_state
from quant.checkpoint import load_base


class TrainingDiverged(RuntimeError):
    pass


def on_gpu(device) -> bool:
    return str(device).startswith("cuda")


def base_dtype(dtype: str, device) -> torch.dtype:
    """The config's dtype, with auto resolved for the device the model runs on."""
    if dtype == "auto":
        return torch.bfloat16 if on_gpu(device) else torch.float32
    return parse_dtype(dtype)


def train(cfg: TrainConfig) -> dict:
    """Run cfg to the end (or resume it). Returns the final metrics (identical on every rank)."""
    # --- processes, model, method ------------------------------------------------------------
    shards = 1 if detect_format(cfg.ckpt_dir) == "hf" else len(shard_files(cfg.ckpt_dir))
    devices = resolve_devices(cfg.devices) if cfg.devices else None
    rank, world, device = setup_model_parallel("cpu" if devices else (cfg.device or None),
                                               tensor_parallel=shards if shards > 1 else 1)
    tp = shards if world > 1 and shards > 1 else 1
    dp, dp_rank, dp_group = world // tp, rank // tp, data_parallel_group()
    say = print if rank == 0 else (lambda *a, **k: None)

    args = read_model_args(cfg.ckpt_dir)
    tokenizer = Tokenizer(cfg.tokenizer_path or find_tokenizer(cfg.ckpt_dir))
    check_vocab(args, tokenizer)
    dtype = base_dtype(cfg.dtype, (devices or [device])[0])
    model = load_base(cfg.ckpt_dir, args, dtype, device, model_parallel_rank(), tp,
                      quant=cfg.quant, group_size=cfg.quant_group_size)
    if devices:
        place_layers(model, devices, device_shares(devices))
        device = devices[0]
    model.checkpoint_layers = cfg.grad_checkpointing

    data_cfg = DataConfig(cfg.task, cfg.template, cfg.train_on_prompt, cfg.cutoff_len, cfg.strict, tuple(cfg.label_names))
    train_items, label_names = load_examples(cfg.train_file, tokenizer, data_cfg)
    if cfg.eval_file:
        eval_items, _ = load_examples(cfg.eval_file, tokenizer, replace(data_cfg, label_names=tuple(label_names)))
    else:  # hold out a fixed slice of the training data
        n_eval = max(1, int(len(train_items) * cfg.eval_split)) if len(train_items) > 1 else 0
        held = set(torch.randperm(len(train_items), generator=torch.Generator().manual_seed(cfg.seed))[:n_eval].tolist())
        eval_items = [train_items[i] for i in sorted(held)]
        train_items = [ex for i, ex in enumerate(train_items) if i not in held]
    rows = pack(train_items, cfg.cutoff_len) if cfg.packing else train_items

    torch.manual_seed(cfg.seed)  # the same adapter init on every rank
    task_model = attach(model, cfg, tokenizer, num_labels=len(label_names)).train()
    named = {n: p for n, p in task_model.named_parameters() if p.requires_grad}
    params = list(named.values())
    torch.manual_seed(cfg.seed + dp_rank)  # dropout: same on tensor-parallel peers, fresh per data shard

    global_batch = cfg.micro_batch_size * dp
    per_epoch = len(rows) // global_batch
    if per_epoch == 0:
        raise LlamaInputError(f"{len(rows)} training rows cannot fill one batch of {global_batch} "
                              f"(micro_batch_size {cfg.micro_batch_size} x {dp} data-parallel processes)")
    total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs / cfg.grad_accum))
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else math.ceil(total_steps * cfg.warmup_ratio)

    # --- optimizer, schedule, precision ----------------------------------------------------------
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps, cfg.min_lr_ratio))
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if on_gpu(device) else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    device_type = torch.device(device).type

    def autocast():
        return torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None
    wrapped = task_model
    if dp > 1:  # the frozen base is identical everywhere: don't make DDP broadcast it (int4 weights are buffers)
        frozen = [n for n, p in task_model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in task_model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(task_model, frozen)
        wrapped = DistributedDataParallel(task_model, process_group=dp_group)

    # --- resume ------------------------------------------------------------------------------
    out_dir = Path(cfg.out_dir)
    start = 0
    found = checkpoints(out_dir) if cfg.resume == "auto" else [] if cfg.resume == "none" else [Path(cfg.resume)]
    if found:
        start = load_state(found[-1], rank, named, optimizer, scheduler, scaler)
        say(f"resumed from {found[-1]} at step {start}")
    metrics_path = out_dir / "metrics.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        keep_metrics(metrics_path, start)
    say(f"training {sum(p.numel() for p in params):,} parameters ({cfg.method}, {cfg.task}) on {world} process(es): "
        f"tensor-parallel {tp} x data-parallel {dp}; {len(rows)} rows, {total_steps} steps")

    def log(record: dict) -> None:
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate() -> dict:
        return eval_metrics(task_model, eval_items, cfg.micro_batch_size, tokenizer.pad_id, device, autocast,
                            dp_rank, dp, dp_group) if eval_items else {}

    def save(step: int) -> None:
        state = save_state(out_dir, step, rank, named, optimizer, scheduler, scaler, cfg.keep_last,
                           lambda folder: save_adapter(task_model, cfg, folder, label_names))
        if rank == 0:
            tqdm.write(f"saved {state}")

    match_set = eval_items[: cfg.exact_match_samples] if cfg.task == "sft" else []
    results = {}
    if match_set and start == 0:
        results["exact_match_before"] = exact_match(task_model, tokenizer, match_set, cfg.max_new_tokens, cfg.micro_batch_size)
        say(f"exact match before training: {results['exact_match_before']:.1%} of {len(match_set)} eval samples")

    # --- the loop ----------------------------------------------------------------------------
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="fine-tuning",
               dynamic_ncols=True, file=sys.stdout, mininterval=0.5 if sys.stdout.isatty() else 30)
    for step in bar:
        t0 = time.perf_counter()
        batches = [collate(micro_batch(rows, global_batch, step * cfg.grad_accum + i, cfg.seed, cfg.shuffle, dp_rank, dp),
                           tokenizer.pad_id, cfg.task) for i in range(cfg.grad_accum)]
        # normalise by the whole step's count of targets, over all micro-batches and ranks
        local_count = sum(target_count(b, cfg.task) for b in batches)
        local_tokens = sum(int((b["tokens"] != tokenizer.pad_id).sum()) for b in batches)
        step_count, step_tokens = all_reduce_sum([local_count, local_tokens], dp_group, device)
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or dp == 1 else wrapped.no_sync()
            with sync:
                with autocast():
                    loss, _, _ = wrapped(**batch)
                # DDP averages gradients over ranks; undo that so the step's loss is a plain mean
                scaled = loss * (dp / max(step_count, 1.0))
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.item()
        step_loss = all_reduce_sum([loss_sum], dp_group, device)[0] / max(step_count, 1.0)
        if not math.isfinite(step_loss):
            last_good = checkpoints(out_dir)
            raise TrainingDiverged(f"loss is {step_loss} at step {step + 1}; nothing saved over "
                                   f"{last_good[-1] if last_good else 'any checkpoint (none yet)'}")
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = clip_grad_norm(params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        if not math.isfinite(grad_norm):
            # fp16 overflow: the norm is global, so every rank skips alike (a GradScaler looks only at
            # its own rank's shards, and tensor-parallel peers would drift apart)
            if scaler:
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        elif scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        tokens_per_s = step_tokens / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        if done % cfg.log_every == 0 or done == total_steps:
            log({"step": done, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                 "epoch": done * cfg.grad_accum / per_epoch, "tokens_per_s": tokens_per_s})
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps:
            ev = evaluate()
            if ev:
                log({"step": done, **ev})
                if rank == 0:
                    bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                results.update(ev)
        if (cfg.save_every and done % cfg.save_every == 0) or done == total_steps:
            save(done)
    bar.close()
    if start >= total_steps and eval_items:  # resumed a finished run: report its metrics again
        results.update(evaluate())

    # --- outputs -----------------------------------------------------------------------------
    final = out_dir / ("adapter" if cfg.method in ("lora", "prompt") else "model")
    save_adapter(task_model, cfg, final, label_names)
    say(f"wrote {final}")
    if cfg.merge and cfg.method == "lora":
        transformer = task_model.transformer
        if rank < tp:  # one writer per tensor-parallel shard
            merged = merged_state_dict(transformer, dtype)
            save_checkpoint(transformer, out_dir / "merged", merged, rank=model_parallel_rank())
        say(f"wrote {out_dir / 'merged'} (LoRA folded into the base weights)")
    if match_set:
        results["exact_match_after"] = exact_match(task_model, tokenizer, match_set, cfg.max_new_tokens, cfg.micro_batch_size)
        say(f"exact match after training: {results['exact_match_after']:.1%} of {len(match_set)} eval samples")
    if rank == 0:
        plot_losses(out_dir / "loss.png", *read_losses(metrics_path))
    return results


def make_optimizer(params: list, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all tensors) where every parameter is a float32 tensor on the
    CPU or a GPU: on bench-58M full fine-tuning its step took a fraction of the foreach one's."""
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup from 0, then cosine decay to min_ratio (HF's get_cosine_schedule_with_warmup
    when min_ratio is 0)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def target_count(batch: dict, task: str) -> int:
    """How many terms the batch's summed loss has: target tokens (LM) or samples (cls/regression)."""
    if task in ("sft", "pt"):
        return int((batch["labels"][:, 1:] != -100).sum())
    return batch["labels"].shape[0]


@torch.no_grad()
def clip_grad_norm(params: list, max_norm: float) -> float:
    """The global gradient norm over every rank's share, clipped to max_norm. Parameters split
    across tensor-parallel ranks (tagged tp_split_dim) add their squares over the group;
    replicated ones count once."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    device = grads[0].grad.device
    split = sum((p.grad.float().pow(2).sum().to(device) for p in grads if hasattr(p, "tp_split_dim")), torch.zeros((), device=device))
    whole = sum((p.grad.float().pow(2).sum().to(device) for p in grads if not hasattr(p, "tp_split_dim")), torch.zeros((), device=device))
    if dist.is_initialized() and any(hasattr(p, "tp_split_dim") for p in grads):
        from fairscale.nn.model_parallel.initialize import get_model_parallel_group

        dist.all_reduce(split, group=get_model_parallel_group())
    norm = float((split + whole).sqrt())
    if max_norm > 0 and norm > max_norm:
        for p in grads:
            p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def keep_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint's step (they will be logged again)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_bytes(path, "".join(ln + "\n" for ln in lines).encode())


def read_losses(path: Path) -> tuple[list, list]:
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    return ([(r["step"], r["loss"]) for r in records if "loss" in r],
            [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r])
