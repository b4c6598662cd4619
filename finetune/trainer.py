"""The fine-tuning loop, one code path for 1..N processes: `train` reads top to bottom as setup,
the step, then logging, evaluation and checkpoints, each a named function below.

World layout: a checkpoint split into T shards trains tensor-parallel over groups of T ranks
(fairscale); the W / T groups are data-parallel (DDP). One process may instead spread layers over
several devices (`devices`). Trainable parameters and optimizer state are float32; the frozen
base stays in `dtype`; matmuls run under bf16/fp16 autocast (fp16 with loss scaling).

Each optimizer step's loss is the mean over every target token (or sample) of the step, across
micro-batches and data-parallel ranks, so N processes with batch b follow the same trajectory as
one process with batch N*b, and gradient accumulation changes nothing but memory.
"""
import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import quant  # noqa: F401  (registers the int4 and NF4 bases and GPTQ folders with the loader)
from llama.cpu_kind import auto_dtype, gpu_native_bf16
from llama.distributed import data_parallel_group, model_parallel_rank, setup_model_parallel
from llama.errors import LlamaInputError
from llama.export import export
from llama.files import atomic_write_bytes, check_parent, save_safetensors
from llama.formats import detect_format, n_shards, read_model_args, save_checkpoint
from llama.generation import parse_dtype
from llama.loader import load_model
from llama.placement import device_shares, place_layers, resolve_devices
from llama.threads import set_threads
from llama.tokenizers import Tokenizer, check_vocab, find_tokenizer, tokenizer_file_name
from finetune.adapters import attach, fold_adapter, save_trained
from finetune.config import TrainConfig
from finetune.data import PAIR_TASKS, DataConfig, Example, collate, load_examples, micro_batch, pack, resolve_template
from finetune.evaluate import all_reduce_sum, eval_metrics, exact_match, reference_logps
from finetune.heads import TaskModel
from finetune.methods import Method, get_method
from finetune.plot import plot_losses
from finetune.sharding import ddp, fsdp_task_model, gradient_sync, is_sharded
from finetune.state import checkpoints, load_state, save_state
from finetune.stopping import StopSignals, TrainingInterrupted


class TrainingDiverged(RuntimeError):
    pass


class CheckpointWriteFailed(OSError):
    """A checkpoint could not be written (a full disk); the message says what is kept."""


def on_gpu(device) -> bool:
    return str(device).startswith("cuda")


@functools.lru_cache(maxsize=None)
def gpu_has_bf16(device: str) -> bool:
    """Native bf16 (compute capability 8.0, Ampere, or later; torch.cuda.is_bf16_supported also
    counts slow emulation). Without it `auto` takes fp16, said once per device."""
    if gpu_native_bf16(device):
        return True
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {torch.cuda.get_device_name(torch.device(device))} has no native bf16: dtype and precision "
              f"'auto' take float16 (fp16 autocast with loss scaling) instead", file=sys.stderr)
    return False


def base_dtype(dtype: str, device, trains_base: bool = False) -> tuple[torch.dtype, str]:
    """The config's dtype, with auto resolved for the device the model runs on, and why (words
    for the run's first lines): on a GPU bfloat16, or float16 where it has no native bf16; on a CPU
    llama.cpu_kind.auto_dtype (bfloat16 with AVX512-BF16 or AMX, float32 otherwise), but float32
    for a method that trains the base's own weights, which train in float32 anyway: loading them
    as bf16 would only round them."""
    if dtype != "auto":
        return parse_dtype(dtype), "as set"
    if on_gpu(device):
        return (torch.bfloat16, "a GPU") if gpu_has_bf16(str(device)) else (torch.float16, "a GPU without native bf16")
    if trains_base:
        return torch.float32, "its trained weights are float32 whatever the base dtype"
    return auto_dtype(device)


def train(cfg: TrainConfig) -> dict:
    """Run cfg to the end (or resume it). Returns the final metrics (identical on every rank)."""
    run = setup(cfg)
    results = {}
    if run.match_set and run.start == 0:
        results["exact_match_before"] = match_rate(run, "before")
    if run.cfg.task in PAIR_TASKS and run.start == 0 and run.eval_items:  # where preference training starts from
        results["preference_accuracy_before"] = preference_rate(run, "before")
    bar = tqdm(range(run.start, run.total_steps), initial=run.start, total=run.total_steps, disable=run.rank != 0,
               desc="fine-tuning", dynamic_ncols=True, file=sys.stdout, mininterval=0.5 if sys.stdout.isatty() else 30)
    with StopSignals() as stop:
        for step in bar:
            record = train_step(run, step)
            # refresh=False: the bar redraws on its own interval, with its count (an immediate redraw
            # here would show the count tqdm has not yet stored: 0/N throughout)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            signum = stop.agreed(run.device)
            results.update(after_step(run, step + 1, record, save_now=bool(signum)))
            if signum:
                bar.close()
                raise interrupted(run, step + 1, signum)
    bar.close()
    if run.start >= run.total_steps and run.eval_items:  # resumed a finished run: report its metrics again
        results.update(evaluate(run))
    write_outputs(run)
    if run.match_set:
        results["exact_match_after"] = match_rate(run, "after")
    if run.cfg.task in PAIR_TASKS and run.eval_items:  # the last step's eval has it
        results["preference_accuracy_after"] = preference_rate(run, "after", results)
    if run.rank == 0:
        plot_losses(run.out_dir / "loss.png", *read_losses(run.metrics_path, PLOTTED_ACCURACY.get(run.cfg.task)))
    return results


# --- setup -------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a run holds from setup to the end."""
    cfg: TrainConfig
    method: Method
    rank: int
    world: int
    tp: int  # tensor-parallel ranks per model copy
    dp: int  # data-parallel copies
    dp_rank: int
    dp_group: object
    device: str
    dtype: torch.dtype  # of the frozen base
    tokenizer: Tokenizer
    task_model: TaskModel
    rows: list  # training rows (examples, or packed lists of them)
    eval_items: list
    label_names: list
    global_batch: int
    per_epoch: int  # micro-batches per epoch: len(rows) // global_batch
    total_steps: int
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    scaler: Optional[torch.amp.GradScaler] = None
    amp_dtype: Optional[torch.dtype] = None
    wrapped: torch.nn.Module = None  # the task model, or DDP around it
    named: dict = field(default_factory=dict)  # trainable parameters by name
    start: int = 0  # the step to continue from
    match_set: list = field(default_factory=list)  # eval samples for exact match

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def say(self, *args, **kw) -> None:
        if self.rank == 0:
            print(*args, **kw)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.amp_dtype)


def setup(cfg: TrainConfig) -> Run:
    """Processes, the data, the base model with the method attached, the optimizer, and the state
    of the last checkpoint when resuming. Bad settings and data are refused before the model loads."""
    check_out_dir(Path(cfg.out_dir))
    set_threads(cfg.threads or None)
    shards = n_shards(cfg.ckpt_dir)
    held = detect_format(cfg.ckpt_dir).quant  # a folder of quantized weights loads as such, frozen
    if held and get_method(cfg.method).trains_base:
        raise LlamaInputError(f"{cfg.ckpt_dir}: holds {held} weights, which stay frozen: method {cfg.method} "
                              f"trains the base; use lora or prompt")
    if held and cfg.init_adapter:
        raise LlamaInputError(f"{cfg.ckpt_dir}: holds {held} weights, into which init_adapter can't be folded: fold it "
                              f"into the float model first (python -m llama.export --adapter)")
    devices = resolve_devices(cfg.devices) if cfg.devices else None
    rank, world, device = setup_model_parallel("cpu" if devices else (cfg.device or None),
                                               tensor_parallel=shards if shards > 1 else 1)
    tp = shards if world > 1 and shards > 1 else 1
    dp, dp_rank = world // tp, rank // tp

    args = read_model_args(cfg.ckpt_dir)
    tokenizer = Tokenizer(cfg.tokenizer_path or find_tokenizer(cfg.ckpt_dir))
    check_vocab(args, tokenizer)
    cfg.template = resolve_template(cfg.template, tokenizer)  # saved with the adapter as resolved
    train_items, eval_items, label_names = load_data(cfg, tokenizer)
    rows = pack(train_items, cfg.cutoff_len) if cfg.packing else train_items

    dtype, why = base_dtype(cfg.dtype, (devices or [device])[0], get_method(cfg.method).trains_base)
    fsdp = cfg.sharding == "fsdp" and dist.is_initialized()  # under torchrun, one process included
    if fsdp:
        if cfg.cpu_offload and not on_gpu(device):
            raise LlamaInputError("cpu_offload moves FSDP's shards off the GPU; this run is on the CPU already")
        if tp > 1:
            raise LlamaInputError(f"{cfg.ckpt_dir}: {shards} tensor-parallel shards; sharding = 'fsdp' reads one "
                                  f"whole checkpoint (merge it with split_model.py --n 1)")
        task_model = fsdp_task_model(cfg, args, tokenizer, dtype, device, amp_dtype(cfg, device))
    else:
        model = load_model(cfg.ckpt_dir, args, dtype, device, model_parallel_rank(), tp,
                           quant=cfg.quant, group_size=cfg.quant_group_size)
        if cfg.init_adapter:
            fold_adapter(model, cfg.init_adapter)
        if devices:
            place_layers(model, devices, device_shares(devices))
            device = devices[0]
        torch.manual_seed(cfg.seed)  # the same adapter init on every rank
        task_model = attach(model, cfg, tokenizer, num_labels=len(label_names))
    task_model.transformer.checkpoint_layers = cfg.grad_checkpointing
    task_model.train()
    torch.manual_seed(cfg.seed + dp_rank)  # dropout: same on tensor-parallel peers, fresh per data shard

    global_batch = cfg.micro_batch_size * dp
    per_epoch = len(rows) // global_batch
    if per_epoch == 0:
        raise LlamaInputError(f"{len(rows)} training rows cannot fill one batch of {global_batch} "
                              f"(micro_batch_size {cfg.micro_batch_size} x {dp} data-parallel processes)")
    total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs / cfg.grad_accum))
    run = Run(cfg, get_method(cfg.method), rank, world, tp, dp, dp_rank, data_parallel_group(), device, dtype, tokenizer,
              task_model, rows, eval_items, label_names, global_batch, per_epoch, total_steps)
    setup_optimizer(run)
    if cfg.task == "dpo" and cfg.precompute_ref:
        precompute_reference(run)  # before resume: the reference is the model as it starts
    resume(run)
    if cfg.dtype == "auto":
        threads = torch.get_num_threads()
        cpu = f"; {threads} CPU thread{'s' if threads != 1 else ''}" if not on_gpu(device) else ""
        run.say(f"dtype auto: {str(dtype).removeprefix('torch.')} base ({why}){cpu}")
    run.say(f"training {sum(p.numel() for p in run.named.values()):,} parameters ({cfg.method}, {cfg.task}) on "
            f"{world} process(es): tensor-parallel {tp} x data-parallel {dp}{' (fsdp)' if is_sharded(task_model) else ''}; "
            f"{len(rows)} rows, {total_steps} steps")
    run.match_set = eval_items[: cfg.exact_match_samples] if cfg.task == "sft" else []
    return run


def check_out_dir(out_dir: Path) -> None:
    """Refuse an out_dir that is a file, or lies under one, before any work is done."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LlamaInputError(f"out_dir {out_dir} is a file: give a folder (it is created if missing)")
    check_parent(out_dir, "out_dir")


def load_data(cfg: TrainConfig, tokenizer: Tokenizer) -> tuple[list[Example], list[Example], list[str]]:
    """(training examples, eval examples, class names): eval_file, or a fixed held-out slice."""
    data_cfg = DataConfig(cfg.task, cfg.template, cfg.train_on_prompt, cfg.cutoff_len, cfg.strict, tuple(cfg.label_names))
    train_items, label_names = load_examples(cfg.train_file, tokenizer, data_cfg)
    if cfg.eval_file:
        eval_items, _ = load_examples(cfg.eval_file, tokenizer, replace(data_cfg, label_names=tuple(label_names)))
        return train_items, eval_items, label_names
    n_eval = max(1, int(len(train_items) * cfg.eval_split)) if len(train_items) > 1 else 0
    held = set(torch.randperm(len(train_items), generator=torch.Generator().manual_seed(cfg.seed))[:n_eval].tolist())
    eval_items = [train_items[i] for i in sorted(held)]
    return [ex for i, ex in enumerate(train_items) if i not in held], eval_items, label_names


def setup_optimizer(run: Run) -> None:
    """AdamW on the trainable parameters, the warmup + cosine schedule, precision (autocast and,
    for fp16, loss scaling) and DDP over the data-parallel copies."""
    cfg, task_model = run.cfg, run.task_model
    run.named = {n: p for n, p in task_model.named_parameters() if p.requires_grad}
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else math.ceil(run.total_steps * cfg.warmup_ratio)
    run.optimizer = make_optimizer(list(run.named.values()), cfg)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, lambda s: lr_factor(s, warmup, run.total_steps, cfg.min_lr_ratio))
    run.amp_dtype = amp_dtype(cfg, run.device)
    run.scaler = torch.amp.GradScaler(torch.device(run.device).type) if run.amp_dtype == torch.float16 else None
    run.wrapped = task_model if run.dp == 1 or is_sharded(task_model) else ddp(task_model, run.dp_group)


def amp_dtype(cfg: TrainConfig, device) -> Optional[torch.dtype]:
    """The autocast dtype of `precision` (auto: bf16 on GPU, none on CPU)."""
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16" if gpu_has_bf16(str(device)) else "fp16") if on_gpu(device) else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def resume(run: Run) -> None:
    """Continue from the last checkpoint (resume = auto), a named one, or none; metrics logged
    past the checkpoint's step are dropped (they will be logged again)."""
    cfg = run.cfg
    found = checkpoints(run.out_dir) if cfg.resume == "auto" else [] if cfg.resume == "none" else [Path(cfg.resume)]
    if found:
        base = trained_base(found[-1])
        other_base = base is not None and Path(base).resolve() != Path(cfg.ckpt_dir).resolve()
        try:
            run.start = load_state(found[-1], run.rank, run.named, run.optimizer, run.scheduler, run.scaler,
                                   sharded=run.task_model if is_sharded(run.task_model) else None)
        except LlamaInputError as e:
            if other_base:  # the likely cause, in the user's terms
                raise LlamaInputError(f"{e}; it was trained on base {base}, not ckpt_dir {cfg.ckpt_dir}") from None
            raise
        if other_base and run.rank == 0:
            print(f"warning: {found[-1]} was trained on base {base}; resuming it on ckpt_dir {cfg.ckpt_dir}",
                  file=sys.stderr)
        run.say(f"resumed from {found[-1]} at step {run.start}")
    if run.rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(run.metrics_path, run.start)


def trained_base(checkpoint: Path) -> Optional[str]:
    """The base model a checkpoint was trained on, as its run's finetune.json recorded it."""
    settings = checkpoint / "adapter" / "finetune.json"
    return json.loads(settings.read_text()).get("base_model") if settings.is_file() else None


# --- the step ----------------------------------------------------------------------------------


def train_step(run: Run, step: int) -> dict:
    """One optimizer step over grad_accum micro-batches per rank. Its loss is the mean over every
    target of the step, on every rank; a non-finite loss stops the run before anything is saved."""
    cfg, device = run.cfg, run.device
    t0 = time.perf_counter()
    batches = [collate(micro_batch(run.rows, run.global_batch, step * cfg.grad_accum + i, cfg.seed, cfg.shuffle,
                                   run.dp_rank, run.dp), run.tokenizer.pad_id, cfg.task) for i in range(cfg.grad_accum)]
    # normalise by the whole step's count of targets, over all micro-batches and ranks
    local_count = sum(target_count(b, cfg.task) for b in batches)
    local_tokens = sum(int((b["tokens"] != run.tokenizer.pad_id).sum()) for b in batches)
    step_count, step_tokens = all_reduce_sum([local_count, local_tokens], run.dp_group, device)
    loss_sum, metric_sums = 0.0, {}
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        last = i == len(batches) - 1
        with gradient_sync(run.wrapped, last or run.dp == 1):
            with run.autocast():
                loss, _, extra = run.wrapped(**batch)
            # DDP and FSDP average gradients over ranks; undo that so the step's loss is a plain mean
            scaled = loss * (run.dp / max(step_count, 1.0))
            (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        loss_sum += loss.item()
        if isinstance(extra, dict):  # rm, dpo: metric sums over the micro-batch's pairs (one device sync)
            for name, value in zip(extra, torch.stack(list(extra.values())).tolist()):
                metric_sums[name] = metric_sums.get(name, 0.0) + value
    # the metrics are means over the step's pairs, as the loss: summed over ranks, then divided
    sums = all_reduce_sum([loss_sum, *metric_sums.values()], run.dp_group, device)
    step_loss = sums[0] / max(step_count, 1.0)
    metrics = {name: v / max(step_count, 1.0) for name, v in zip(metric_sums, sums[1:])}
    if not math.isfinite(step_loss):
        last_good = checkpoints(run.out_dir)
        raise TrainingDiverged(f"loss is {step_loss} at step {step + 1}; nothing saved over "
                               f"{last_good[-1] if last_good else 'any checkpoint (none yet)'}")
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    grad_norm = clip_grad_norm(list(run.named.values()), cfg.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    if not math.isfinite(grad_norm):
        # fp16 overflow: the norm is global, so every rank skips alike (a GradScaler looks only at
        # its own rank's shards, and tensor-parallel peers would drift apart)
        if run.scaler:
            run.scaler.update(run.scaler.get_scale() * run.scaler.get_backoff_factor())
    elif run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": step_tokens / (time.perf_counter() - t0),
            "metrics": metrics}


# --- logging, evaluation, checkpoints ----------------------------------------------------------


def after_step(run: Run, done: int, record: dict, save_now: bool = False) -> dict:
    """Log step `done` (1-based), evaluate and checkpoint when due (or save_now). Returns any eval
    metrics."""
    cfg, results = run.cfg, {}
    last = done == run.total_steps
    if done % cfg.log_every == 0 or last:
        log(run, {"step": done, "loss": record["loss"], "lr": record["lr"], "grad_norm": record["grad_norm"],
                  "epoch": done * cfg.grad_accum / run.per_epoch, "tokens_per_s": record["tokens_per_s"],
                  **record.get("metrics", {})})
    if (cfg.eval_every and done % cfg.eval_every == 0) or last:
        results = evaluate(run)
        if results:
            log(run, {"step": done, **results})
            if run.rank == 0:
                tqdm.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    if (cfg.save_every and done % cfg.save_every == 0) or last or save_now:
        save(run, done)
    return results


def save(run: Run, done: int) -> None:
    """Checkpoint step `done`. A failed write (a full disk) stops the run: the checkpoints already
    saved stay whole (the new one was being written in a .partial folder that resume ignores)."""
    cfg = run.cfg
    try:
        folder = save_state(run.out_dir, done, run.rank, run.named, run.optimizer, run.scheduler, run.scaler,
                            cfg.keep_last, lambda f: save_trained(run.task_model, cfg, f, run.label_names),
                            sharded=run.task_model if is_sharded(run.task_model) else None)
    except OSError as e:
        last_good = checkpoints(run.out_dir)
        kept = f"{last_good[-1]} is the last whole checkpoint" if last_good else "no checkpoint was saved before"
        raise CheckpointWriteFailed(f"could not save step {done}'s checkpoint ({e.strerror or e}); {kept}; "
                                    f"free space and run the same command again to resume") from e
    if run.rank == 0:
        tqdm.write(f"saved {folder}")


def interrupted(run: Run, done: int, signum: int) -> TrainingInterrupted:
    """The one line to stop with, once step `done`'s checkpoint is saved after a signal."""
    folder = checkpoints(run.out_dir)[-1]
    again = "run the same command again to resume (resume = auto)" if run.cfg.resume == "auto" else \
        f"run again with --resume {folder} to resume"
    return TrainingInterrupted(f"interrupted by {signal.Signals(signum).name} at step {done}: saved {folder}; {again}",
                               signum)


def log(run: Run, record: dict) -> None:
    if run.rank == 0:
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def evaluate(run: Run) -> dict:
    if not run.eval_items:
        return {}
    return eval_metrics(run.task_model, run.eval_items, run.cfg.micro_batch_size, run.tokenizer.pad_id, run.device,
                        run.autocast, run.dp_rank, run.dp, run.dp_group)


def preference_rate(run: Run, when: str, evaluated: Optional[dict] = None) -> float:
    """The share of eval pairs whose chosen answer the model prefers: the reward model scores it
    higher (rm), or the policy gives it the higher log-prob (dpo: logps/accuracies). From
    `evaluated` (eval metrics of the model as it is now) if given."""
    key = "eval_accuracy" if run.cfg.task == "rm" else "eval_logps/accuracies"
    rate = (evaluated if evaluated and key in evaluated else evaluate(run))[key]
    run.say(f"preference accuracy {when} training: {rate:.1%} of {len(run.eval_items)} eval pairs")
    return rate


REF_LOGPS = "ref_logps.safetensors"


def precompute_reference(run: Run) -> None:
    """DPO's reference log-probs of every training and eval pair, computed once from the model
    as it starts (for full and freeze the only reference there is without a second copy) and
    stored in out_dir/ref_logps.safetensors, which a resumed or repeated run reuses when it was
    made from the same base, settings and pairs (a fingerprint of them), else recomputes."""
    cfg = run.cfg
    path = run.out_dir / REF_LOGPS
    sets = {"train": run.rows, "eval": run.eval_items}
    made_from = [cfg.ckpt_dir, cfg.init_adapter, cfg.quant, cfg.quant_group_size, str(run.dtype), cfg.precision,
                 [[p.prompt, p.chosen, p.rejected] for items in sets.values() for p in items]]
    fingerprint = hashlib.sha256(json.dumps(made_from).encode()).hexdigest()
    tables = None
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fingerprint:
                tables = {name: f.get_tensor(name) for name in f.keys()}
        run.say(f"reference log-probs: {'reusing' if tables else 'recomputing (base, settings or data changed)'} {path}")
    if tables is None:
        tables = {name: reference_logps(run.task_model, items, cfg.micro_batch_size, run.tokenizer.pad_id, run.device,
                                        run.autocast, run.dp_rank, run.dp, run.dp_group)
                  for name, items in sets.items() if items}
        if run.rank == 0:
            run.out_dir.mkdir(parents=True, exist_ok=True)
            save_safetensors(tables, path, metadata={"fingerprint": fingerprint})
        run.say(f"reference log-probs of {sum(map(len, sets.values()))} pairs computed once: {path}")
    for name, items in sets.items():
        for pair, (chosen, rejected) in zip(items, tables[name].tolist() if items else []):
            pair.ref = (chosen, rejected)


def match_rate(run: Run, when: str) -> float:
    rate = exact_match(run.task_model, run.tokenizer, run.match_set, run.cfg.max_new_tokens, run.cfg.micro_batch_size)
    run.say(f"exact match {when} training: {rate:.1%} of {len(run.match_set)} eval samples")
    return rate


def write_outputs(run: Run) -> None:
    """What the method trained (out_dir/adapter, or out_dir/model as merge_format) and, with
    merge, the base with the method folded in (out_dir/merged, as merge_format)."""
    cfg = run.cfg
    final = run.out_dir / run.method.output_dir
    if run.method.trains_base:
        write_model(run, final, lambda folder: save_trained(run.task_model, cfg, folder, run.label_names))
    else:
        save_trained(run.task_model, cfg, final, run.label_names)
    run.say(f"wrote {final}")
    if cfg.merge and run.method.can_merge:
        transformer = run.task_model.transformer

        def save_merged(folder):
            if run.rank < run.tp:  # one writer per tensor-parallel shard
                merged = run.method.merged_state_dict(transformer, run.dtype)
                save_checkpoint(transformer, folder, merged, rank=model_parallel_rank())

        write_model(run, run.out_dir / "merged", save_merged)
        run.say(f"wrote {run.out_dir / 'merged'} (LoRA folded into the base weights)")


def write_model(run: Run, final: Path, save: Callable) -> None:
    """save(folder) writes the model in our format (each tensor-parallel rank its shard). For
    merge_format ours it writes `final`; for the others a staging folder that rank 0 then exports
    tensor by tensor (llama.export) to `final`, which replaces any older one only when complete.
    The tokenizer goes beside it either way."""
    fmt = run.cfg.merge_format
    stage = final if fmt == "ours" else final.with_name(f".{final.name}.ours")
    if run.rank == 0 and stage.exists() and stage != final:
        shutil.rmtree(stage)
    _barrier()
    save(stage)
    _barrier()
    if run.rank == 0:
        if fmt == "ours":
            shutil.copyfile(run.tokenizer.path, final / tokenizer_file_name(run.tokenizer.path))
        else:
            fresh = final.with_name(f".{final.name}.new")
            shutil.rmtree(fresh, ignore_errors=True)
            export(stage, fmt, fresh / "model.gguf" if fmt == "gguf" else fresh, tokenizer_path=run.tokenizer.path,
                   progress=False)
            for extra in ("finetune.json", "score.safetensors"):  # our settings and a score head, beside the model
                if (stage / extra).is_file():
                    shutil.copyfile(stage / extra, fresh / extra)
            old = final.with_name(f".{final.name}.old")
            if final.exists():
                os.replace(final, old)
            os.replace(fresh, final)
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(stage)
    _barrier()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --- pieces ------------------------------------------------------------------------------------


def make_optimizer(params: list, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all tensors) where every parameter is a float32 tensor on the
    CPU or a GPU: on bench-58M full fine-tuning its step took a fraction of the foreach one's."""
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor)
                for p in params)
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
    """How many terms the batch's summed loss has: target tokens (LM), samples (cls/regression) or
    pairs (rm/dpo: two rows each)."""
    if task in ("sft", "pt"):
        return int((batch["labels"][:, 1:] != -100).sum())
    if task in PAIR_TASKS:
        return batch["tokens"].shape[0] // 2
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
    squares = {kind: torch.zeros((), device=device) for kind in ("tp", "fsdp", "whole")}
    for p in grads:
        kind = "fsdp" if isinstance(p.grad, DTensor) else "tp" if hasattr(p, "tp_split_dim") else "whole"
        g = p.grad.to_local() if kind == "fsdp" else p.grad
        squares[kind] += g.float().pow(2).sum().to(device)
    if dist.is_initialized() and any(hasattr(p, "tp_split_dim") for p in grads):
        from fairscale.nn.model_parallel.initialize import get_model_parallel_group

        dist.all_reduce(squares["tp"], group=get_model_parallel_group())
    if any(isinstance(p.grad, DTensor) for p in grads):  # FSDP: each rank holds a disjoint shard of every gradient
        dist.all_reduce(squares["fsdp"])
    norm = float(sum(squares.values()).sqrt())
    if max_norm > 0 and norm > max_norm:
        for p in grads:
            p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint's step (they will be logged again)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_bytes(path, "".join(ln + "\n" for ln in lines).encode())


PLOTTED_ACCURACY = {"rm": "eval_accuracy", "dpo": "eval_rewards/accuracies"}  # beside the losses in loss.png


def read_losses(path: Path, accuracy: Optional[str] = None) -> tuple[list, list, list]:
    """(step, value) series of metrics.jsonl: training loss, eval loss, and the metric `accuracy`."""
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    return ([(r["step"], r["loss"]) for r in records if "loss" in r],
            [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
            [(r["step"], r[accuracy]) for r in records if accuracy in r])
