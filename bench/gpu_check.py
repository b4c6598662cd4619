"""Every CUDA claim of the project checked on a real GPU, in one command (docs/gpu.md):

    python bench/gpu_check.py --out DIR            # full: <= 8 minutes on one H100
    python bench/gpu_check.py --quick --out DIR    # <= 3 minutes: fewer paths, runs, steps and layers
    python bench/gpu_check.py --only int4_correct --out DIR    # one check, in this process
    python bench/gpu_check.py --record DIR         # here, after a GPU run: its checks.jsonl into bench/results.jsonl

bench/gpu_prepare.sh builds what the bare GPU machine lacks (wheels, the demo model); bench/gpu_run.sh
installs them there and runs this. `--only NAME --cpu` runs a GPU check's code on the CPU at a
small size: a check of the code before the GPU is lent, never a figure.

Each check runs in its own subprocess (`--only NAME`) with a time limit, so a failure, a crash or
an out-of-memory in one leaves the others running. DIR gets checks.jsonl (the first line: the
versions it ran on; then one line per check: status ok / failed / oom / skipped / timeout, the
last error line, the size an out-of-memory hit, elapsed seconds and the figures), table.txt (the
table printed last) and log.txt (every check's own output).

Without CUDA it says so in one line, runs the CPU subset on tiny configurations (int4 paths
against float64, training in bf16 autocast against float32, placement over "cpu,cpu", batched
against batch-1 greedy decoding) and exits 0 when those pass: the smoke test of
tests/bench/test_gpu_check.py. The exit status is 1 when any check failed, ran out of memory or
ran out of time. A GPU without bf16 (before Ampere) runs the bf16 checks in fp16, saying so.
"""
import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from common import ROOT, cuda_times, median  # puts the repo on sys.path

RESULT = "GPU_CHECK_RESULT "  # the child's last stdout line: this prefix, then its JSON

# --- the checks' registry ------------------------------------------------------------------------

CHECKS: dict = {}  # name -> (function, runs on CPU too, time limit in seconds: full, quick)


def check(name: str, cpu: bool, limit: tuple[int, int]):
    def register(fn):
        CHECKS[name] = (fn, cpu, limit)
        return fn
    return register


class CheckFailed(Exception):
    """A result outside its tolerance, or a claim not met: the message says which."""


class Skip(Exception):
    """The check cannot run here (a package missing, an op this torch lacks): the message says why."""


class Ctx:
    """What a check gets: where it runs, how big, and where to leave scratch files (shared by the
    checks of one run, never under --out: at most 8 files come back from a GPU machine)."""

    def __init__(self, a):
        self.quick, self.work = a.quick, Path(a.work)
        self.cuda = torch.cuda.is_available() and not a.cpu
        self.device = "cuda" if self.cuda else "cpu"
        self.size = "setup"  # what the check is building or running: an out-of-memory names it
        self.notes: list[str] = []
        self.half = torch.bfloat16
        if self.cuda and torch.cuda.get_device_capability() < (8, 0):  # is_bf16_supported() counts emulation
            self.half = torch.float16
            self.note(f"{torch.cuda.get_device_name()} has no native bf16: the bf16 checks run in fp16")

    def at(self, size: str) -> None:
        self.size = size
        print(f"-- {size}", flush=True)

    def note(self, line: str) -> None:
        self.notes.append(line)
        print(line, flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def shared(self, name: str, build) -> Path:
        """work/name, built once by build(folder) for all the checks of a run; written under a
        temporary name and renamed, so a check killed halfway leaves nothing half-built."""
        final = self.work / name
        if not final.exists():
            tmp = self.work / f".{name}.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            tmp.rename(final)
        return final


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64, on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


# --- int4 kernels ----------------------------------------------------------------------------------

# (in K, out N, group size, act-order): K = 200 is not a multiple of its group size 64
INT4_CASES = [(200, 96, 64, False), (1024, 512, 128, False), (512, 256, 128, True)]
INT4_MS = (1, 7, 64, 256)
# A half-precision path passes when its error against float64 is within 1.5x that of a dense
# matmul in the same dtype on the same inputs (cuBLAS, or the CPU's), plus a little: both round
# the weight and the inputs the same way, so an error beyond that is the kernel's own.
HALF_FACTOR, HALF_SLACK = 1.5, 5e-4
FLOAT32_TOL = 1e-5  # float32 paths: float32 rounding gives ~3e-7 (tests/quant/test_kernels.py)


def int4_case_error(path: str, w, w64, x: torch.Tensor, g: torch.Tensor) -> tuple[float, float, float, float]:
    """(forward error, its dense bound, input-gradient error, its dense bound) of one path.
    x [M, K] and g [M, N] (the gradient of the output) are in the activations' dtype."""
    from quant.kernels import int4_matmul

    xg = x.clone().requires_grad_(True)
    y = int4_matmul(xg, w, path=path)
    y.backward(g)
    if not (torch.isfinite(y).all() and torch.isfinite(xg.grad).all()):
        return float("inf"), 0.0, float("inf"), 0.0
    w64d = w64.to(x.device)
    err, err_grad = rel(y, x.double() @ w64d.t()), rel(xg.grad, g.double() @ w64d)
    if x.dtype == torch.float32:
        return err, FLOAT32_TOL, err_grad, FLOAT32_TOL
    wd = w64d.to(x.dtype)
    bound = HALF_FACTOR * rel(x @ wd.t(), x.double() @ w64d.t()) + HALF_SLACK
    bound_grad = HALF_FACTOR * rel(g @ wd, g.double() @ w64d) + HALF_SLACK
    return err, bound, err_grad, bound_grad


@check("int4_correct", cpu=True, limit=(120, 90))
def int4_correct(ctx: Ctx) -> dict:
    """Every int4 path this device offers (quant.kernels.available_paths) against float64, forward
    and input gradient, M = 1, 7, 64, 256, K a multiple of the group size or not, act-order."""
    from quant.kernels import available_paths, cpu_int4_supported
    from tests.utils import random_layer  # the tests' own packer and float64 dequantization

    paths = available_paths(ctx.device)
    dtypes = [torch.float16, ctx.half] if ctx.cuda else [torch.float32, torch.bfloat16]
    dtypes = list(dict.fromkeys(dtypes))
    worst, failures, n = {}, [], 0
    gen = torch.Generator().manual_seed(0)
    for k, nn, gs, act in INT4_CASES:
        _, _, w, w64 = random_layer(k, nn, gs, act, seed=k)
        w = type(w)(*(t.to(ctx.device) for t in w.tensors().values()))
        for dtype in dtypes:
            for m in INT4_MS:
                ctx.at(f"K={k} N={nn} g={gs}{' act-order' if act else ''} {str(dtype)[6:]} M={m}")
                x = torch.randn(m, k, generator=gen).to(ctx.device, dtype)
                g = torch.randn(m, nn, generator=gen).to(ctx.device, dtype)
                for path in paths:
                    if path == "cpu_int4" and not cpu_int4_supported(w):  # whole groups in order only
                        continue
                    err, bound, err_g, bound_g = int4_case_error(path, w, w64, x, g)
                    n += 1
                    key = f"{path} {str(dtype)[6:]}"
                    worst[key] = max(worst.get(key, 0.0), round(err / bound, 3), round(err_g / bound_g, 3))
                    if err > bound or err_g > bound_g:
                        failures.append(f"{path} {str(dtype)[6:]} K={k} g={gs} M={m}: forward {err:.2e} (bound "
                                        f"{bound:.2e}), input grad {err_g:.2e} (bound {bound_g:.2e})")
    result = {"paths": paths, "dtypes": [str(d)[6:] for d in dtypes], "cases": n,
              "worst_error_over_bound": worst, "failures": failures}
    if failures:
        raise CheckFailed(f"{len(failures)} of {n} cases out of tolerance, first: {failures[0]}", result)
    return result


def torch_int4pack(w, dtype: torch.dtype):
    """PyTorch's own CUDA int4 GEMM (`_weight_int4pack_mm`, tinygemm) on our weight, as a peer:
    the weight as its packed [N, K/2] bytes (even feature in the high nibble), our scales and zeros
    as its (q - 8) * scale + zero (the same table its CPU twin takes: quant.kernels builds it).
    Returns fn(x) -> y, or raises Skip where this torch or GPU lacks it."""
    from quant import kernels
    from quant.pack import unpack_rows

    if not w.qweight.is_cuda or torch.cuda.get_device_capability() < (8, 0):
        raise Skip("no _weight_int4pack_mm for this torch / GPU")
    size = kernels.contiguous_groups(w)
    if size not in (32, 64, 128, 256) or w.in_features % 128:
        raise Skip("_weight_int4pack_mm needs whole groups of 32-256 and K % 128 == 0")
    q = unpack_rows(w.qweight).t().to(torch.int32)  # [N, K], 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous(), 8)
    scales_and_zeros, group = kernels.cpu_int4_scales_and_zeros(w, dtype)
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_and_zeros)


SPEED_SHAPES = [(4096, 4096), (11008, 4096), (8192, 8192)]  # [out, in]: LLaMA-7B attention, MLP; 65B attention
SPEED_MS = (1, 16, 256)
CLAIM_M1 = 3.0  # README: int4 GEMV at M = 1 at least 3x bf16 cuBLAS ...
CLAIM_M256 = 0.95  # ... and no slower at M >= 256 (5% for the noise of two timings)


@check("int4_speed", cpu=False, limit=(150, 90))
def int4_speed(ctx: Ctx) -> dict:
    """int4 (the chosen path, and each CUDA path in full mode) against bf16 torch.mm and torch's
    _weight_int4pack_mm: CUDA events, warm-up, median of >= 20, the L2 flushed before each call."""
    from common import timed
    from int4_matmul import random_int4_linear
    from quant.kernels import available_paths, choose_path, int4_matmul

    runs = 20 if ctx.quick else 50
    dtype, rows, claims = ctx.half, [], []
    # `--only int4_speed --cpu` runs it on small shapes with a host clock: a check of this code, not a figure
    times = cuda_times if ctx.cuda else lambda fn, n: timed(fn, 3, warmup=1)
    for out_f, in_f in SPEED_SHAPES if ctx.cuda else [(256, 512)]:
        ctx.at(f"{out_f}x{in_f} int4 and {str(dtype)[6:]}")
        w = random_int4_linear(out_f, in_f, ctx.device).int4()
        dense = torch.randn(out_f, in_f, device=ctx.device, dtype=dtype)
        dense_t = dense.t()
        try:
            peer, peer_err = torch_int4pack(w, dtype), None
            peer(torch.randn(1, in_f, device=ctx.device, dtype=dtype))  # refuses here, if it refuses
        except Skip as e:
            peer, peer_err = None, str(e)
        except RuntimeError as e:  # the op exists but refuses (a dtype, a build without it)
            peer, peer_err = None, str(e).splitlines()[0]
        for m in SPEED_MS:
            ctx.at(f"{out_f}x{in_f} M={m}")
            x = torch.randn(m, in_f, device=ctx.device, dtype=dtype)
            chosen = choose_path(x, w)
            paths = [chosen] if ctx.quick else [p for p in available_paths(ctx.device) if p != "reference"]
            ms = {f"int4 {p}": median(times(lambda: int4_matmul(x, w, path=p), runs)) * 1e3 for p in paths}
            ms["dense"] = median(times(lambda: torch.mm(x, dense_t), runs)) * 1e3
            row = {"out": out_f, "in": in_f, "m": m, "path": chosen, **{k: round(v, 4) for k, v in ms.items()}}
            if peer is not None:
                row["torch_int4pack_err"] = round(rel(peer(x), int4_matmul(x.double(), w, path="reference")), 5)
                row["torch_int4pack"] = round(median(times(lambda: peer(x), runs)) * 1e3, 4)
            row["dense_over_int4"] = round(ms["dense"] / ms[f"int4 {chosen}"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if m == 1:
                claims.append((f"M=1 {out_f}x{in_f}: int4 >= {CLAIM_M1}x bf16", row["dense_over_int4"] >= CLAIM_M1,
                               row["dense_over_int4"]))
            if m >= 256:
                claims.append((f"M={m} {out_f}x{in_f}: int4 no slower than bf16", row["dense_over_int4"] >= CLAIM_M256,
                               row["dense_over_int4"]))
    result = {"dtype": str(dtype)[6:], "runs": runs, "rows": rows, "torch_int4pack": peer_err or "timed",
              "claims": [{"claim": c, "met": ok, "dense_over_int4": v} for c, ok, v in claims]}
    unmet = [f"{c} (got {v}x)" for c, ok, v in claims if not ok]
    if unmet and ctx.cuda:
        raise CheckFailed(f"claim not met: {unmet[0]}" + (f" (+{len(unmet) - 1} more)" if len(unmet) > 1 else ""), result)
    return result


# --- memory ---------------------------------------------------------------------------------------

SHAPE_7B = dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)
SHAPE_TINY = dict(dim=256, n_layers=2, n_heads=4, vocab_size=512)
CLAIM_MEMORY = 0.3  # README: an int4 7B takes at most 0.3x the memory of the bf16 one


def bf16_model(shape: dict, device: str, dtype: torch.dtype):
    """The same shape in `dtype`, random weights, allocated straight in that dtype (meta, then
    to_empty: no float32 copy ever exists)."""
    from llama.config import ModelArgs
    from llama.model import Transformer

    with torch.device("meta"):
        model = Transformer(ModelArgs(**shape)).to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def decode_step(model, device: str) -> None:
    with torch.inference_mode():
        model.setup_caches(1, 64)
        model(torch.zeros(1, 1, dtype=torch.long, device=device))


@check("memory_7b", cpu=True, limit=(150, 120))
def memory_7b(ctx: Ctx) -> dict:
    """A random-weight 7B-shaped model built int4 (bench/int4_matmul.py's builder) and in bf16 on
    the GPU: the ratio of torch.cuda.max_memory_allocated, each after one decode step. On the CPU
    a tiny shape, and the ratio of tensor bytes (RSS is too coarse for a tiny model)."""
    from int4_matmul import build_int4_7b

    shape = SHAPE_7B if ctx.cuda else SHAPE_TINY
    peaks, tensor_bytes = {}, {}
    for kind in ("int4", "bf16"):
        ctx.at(f"{shape['dim']}x{shape['n_layers']} {kind} build and decode step")
        if ctx.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build_int4_7b(ctx.device, shape)[0] if kind == "int4" else bf16_model(shape, ctx.device, ctx.half)
        decode_step(model, ctx.device)
        ctx.sync()
        tensor_bytes[kind] = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        if ctx.cuda:
            peaks[kind] = torch.cuda.max_memory_allocated()
        model.clear_caches()
        del model
    basis = peaks if ctx.cuda else tensor_bytes
    ratio = round(basis["int4"] / basis["bf16"], 3)
    gib = 2 ** 30
    result = {"shape": shape, "peak_gib": {k: round(v / gib, 3) for k, v in peaks.items()},
              "tensor_gib": {k: round(v / gib, 3) for k, v in tensor_bytes.items()},
              "int4_over_bf16": ratio, "basis": "max_memory_allocated" if ctx.cuda else "tensor bytes"}
    if ctx.cuda and ratio > CLAIM_MEMORY:  # the claim is the 7B's: a tiny model's float embeddings weigh more
        raise CheckFailed(f"claim not met: int4 / bf16 memory {ratio} > {CLAIM_MEMORY}", result)
    return result


# --- training -------------------------------------------------------------------------------------

STEPS = {"full": 20, "quick": 10, "cpu": 3}
# Step losses of a run against the same run in float32 on the CPU: max over steps of
# |loss - ref| / ref. Measured on the CPU (autocast against float32, llama.tiny's model, 20 steps,
# lr 3e-3; 2026-12-06, torch 2.13): bf16 at most 2e-4 (full; LoRA 8e-5, prompt 3e-5), fp16 1e-4,
# no step skipped by the loss scaler. bf16 keeps 8 significant bits and fp16 11, but a tiny
# random model's logits are small and the loss near log(vocab), so rounding moves it little. The
# bounds are ~20x those, room for a GPU's own kernels (flash attention, split-K matmuls, fused
# AdamW) summing in other orders. A step lost (skipped by the scaler, or an update gone wrong)
# shifts the later losses by about one step's progress: 4e-3 for LoRA, 3e-2 for full tuning at
# these settings; the record keeps every loss for a closer look. float32 differs from the
# CPU's only by summation order (~1e-6 a step, carried forward by AdamW).
LOSS_TOL = {"bf16": 5e-3, "fp16": 2e-3, "fp32": 1e-4}


def tiny_ckpt(ctx: Ctx) -> Path:
    """llama.tiny's random model (dim 64, 2 layers, GQA) and its sentencepiece tokenizer."""
    from llama.tiny import make_tiny

    return ctx.shared("tiny", make_tiny)


def train_losses(ctx: Ctx, ckpt: Path, **kw) -> list[float]:
    """The loss of every step of finetune.trainer.train on the bundled demo data (tests/utils.py's
    small sft defaults with kw). A run is kept under its settings' name: a later check asking for
    the same run (the float32 CPU reference, a one-device run) reads its losses instead of training
    again."""
    from finetune.trainer import train
    from tests.utils import read_metrics, trainer_config

    steps = STEPS["cpu" if not ctx.cuda else "quick" if ctx.quick else "full"]
    kw = {"method": "lora", **kw, "max_steps": steps}
    name = "_".join(f"{k}-{v}" for k, v in sorted(kw.items())).replace(",", "+").replace(":", "")
    out = ctx.work / "runs" / name
    if not (out / "done").is_file():
        shutil.rmtree(out, ignore_errors=True)
        ctx.at(f"training: {kw}")
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's progress goes to the log
            train(trainer_config(ckpt, out, **kw))
        (out / "done").touch()
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def compare_losses(got: list[float], ref: list[float]) -> float:
    if len(got) != len(ref):
        return float("inf")
    return max(abs(a - b) / abs(b) for a, b in zip(got, ref))


def training_check(ctx: Ctx, method: str) -> dict:
    """method on the tiny model in each precision against float32 on the CPU. On the CPU: bf16
    autocast against float32 (the same comparison, the CPU's bf16)."""
    ckpt = tiny_ckpt(ctx)
    ref = train_losses(ctx, ckpt, method=method, device="cpu", precision="fp32")
    if ctx.cuda:
        half = "bf16" if ctx.half == torch.bfloat16 else "fp16"
        runs = {half: dict(precision=half), "fp16": dict(precision="fp16"), "fp32": dict(precision="fp32")}
        if ctx.quick:  # the 16-bit autocast the GPU runs by default, only
            runs = {half: runs[half]}
    else:
        runs = {"bf16": dict(precision="bf16")}
    result, failures = {"steps": len(ref), "loss_cpu_fp32": [round(v, 5) for v in ref]}, []
    for prec, kw in runs.items():
        got = train_losses(ctx, ckpt, method=method, device=ctx.device, **kw)
        diff = compare_losses(got, ref)
        result[prec] = {"max_rel_diff": round(diff, 5), "tol": LOSS_TOL[prec], "last_loss": round(got[-1], 5)}
        if not diff <= LOSS_TOL[prec]:
            failures.append(f"{prec} on {ctx.device}: step losses differ from float32 CPU by {diff:.2e} "
                            f"> {LOSS_TOL[prec]}")
    if failures:
        raise CheckFailed(failures[0], result)
    return result


@check("train_lora", cpu=True, limit=(120, 90))
def train_lora(ctx: Ctx) -> dict:
    return training_check(ctx, "lora")


@check("train_full", cpu=False, limit=(120, 90))
def train_full(ctx: Ctx) -> dict:
    return training_check(ctx, "full")


@check("train_prompt", cpu=False, limit=(120, 90))
def train_prompt(ctx: Ctx) -> dict:
    return training_check(ctx, "prompt")


# A 1B-shaped model: TinyLlama-1.1B's blocks (dim 2048, hidden 5632, 22 layers; 32 heads, no GQA
# here), with the demo tokenizer's vocabulary (a 32000-token one would need a real tokenizer; the
# blocks are what int4 and NF4 change).
SHAPE_1B = dict(dim=2048, n_heads=32, n_layers=22)


def ckpt_1b(ctx: Ctx) -> Path:
    from common import write_random_checkpoint
    from llama.tiny import train_tokenizer

    def build(folder: Path) -> None:
        train_tokenizer(folder / "tokenizer.model", vocab_size=512)
        import sentencepiece as spm

        vocab = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).vocab_size()
        if ctx.cuda:
            n_layers = SHAPE_1B["n_layers"] if not ctx.quick else 4
            write_random_checkpoint(folder, 0, SHAPE_1B["dim"], SHAPE_1B["n_heads"], vocab, n_layers=n_layers)
        else:  # `--only train_int4_1b --cpu`: the same code on a small shape, a check of this code, not a figure
            write_random_checkpoint(folder, 0, 256, 4, vocab, n_layers=2)

    return ctx.shared("1b", build)


@contextlib.contextmanager
def counting_int4_paths():
    """Count the calls of each int4 path (quant.kernels.PATHS, looked up at every call) meanwhile:
    a training step's rows (micro batch x sequence) take dequant + cuBLAS, the Triton kernel
    serves <= 16 rows (decoding, and the exact-match generation), and the record says which ran."""
    from collections import Counter

    from quant import kernels

    taken, saved = Counter(), dict(kernels.PATHS)

    def counted(name, fn):
        def run(x, w):
            taken[name] += 1
            return fn(x, w)
        return run

    kernels.PATHS.update({name: counted(name, fn) for name, fn in saved.items()})
    try:
        yield taken
    finally:
        kernels.PATHS.update(saved)


def quantized_training(ctx: Ctx, quant: str) -> dict:
    """LoRA (every linear) on a 1B-shaped base quantized on load, 10 steps (--quick: 5, on 4 of the
    22 layers) of packed plain text (task pt, 4 x 512 tokens a step) through finetune.trainer.train:
    tokens/s (median of the steps after the first), peak memory (max_memory_allocated) beside
    finetune.plan's estimate for the same config."""
    from finetune.config import TrainConfig
    from finetune.plan import Devices, plan, resolve
    from finetune.trainer import train
    from llama.formats import read_model_args
    from tests.utils import read_metrics

    ckpt = ckpt_1b(ctx)
    out = ctx.work / "runs" / f"{quant}_1b"
    shutil.rmtree(out, ignore_errors=True)
    precision = "bf16" if ctx.half == torch.bfloat16 else "fp16"
    cfg = TrainConfig(ckpt_dir=str(ckpt), out_dir=str(out), device=ctx.device, quant=quant, method="lora",
                      lora_targets=["all-linear"], lora_dropout=0.0, task="pt", packing=True,
                      cutoff_len=512 if ctx.cuda else 64, micro_batch_size=4,
                      max_steps=2 if not ctx.cuda else 5 if ctx.quick else 10,
                      warmup_steps=0, lr=1e-4, eval_split=0.01, seed=0,
                      dtype=str(ctx.half)[6:] if ctx.cuda else "float32", precision=precision if ctx.cuda else "fp32",
                      train_file=str(ROOT / "data" / "demo" / "pretrain.jsonl")).check()
    args = read_model_args(ckpt)
    ctx.at(f"{quant} LoRA on {args.n_layers} layers x dim {args.dim}")
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    with contextlib.redirect_stdout(sys.stderr), counting_int4_paths() as taken:
        train(cfg)
    gib = 2 ** 30
    devices = Devices("cuda", 1, torch.cuda.get_device_properties(0).total_memory) if ctx.cuda else Devices("cpu", 1, 1 << 40)
    estimate = plan(resolve(cfg, args, devices, "auto", quant))[0]
    tok_s = [r["tokens_per_s"] for r in read_metrics(out) if "tokens_per_s" in r][1:]
    result = {"shape": {"dim": args.dim, "n_layers": args.n_layers, "vocab": args.vocab_size}, "int4_paths": dict(taken),
              "tokens_per_step": cfg.micro_batch_size * cfg.cutoff_len, "tok_s_median": round(median(tok_s), 1),
              "plan_total_gib": round(estimate.total / gib, 3),
              "plan_without_overhead_gib": round((estimate.total - estimate.overhead) / gib, 3)}
    if ctx.cuda:
        result.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / gib, 3),
                      peak_reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 3))
    return result


@check("train_int4_1b", cpu=False, limit=(180, 120))
def train_int4_1b(ctx: Ctx) -> dict:
    from quant.kernels import triton_available

    if not triton_available():
        raise Skip("triton not installed: int4 would take the dequant path only")
    return quantized_training(ctx, "int4")


@check("train_nf4_1b", cpu=False, limit=(180, 120))
def train_nf4_1b(ctx: Ctx) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Skip("bitsandbytes not installed (bench/gpu_prepare.sh brings its wheel)") from None
    return quantized_training(ctx, "nf4")


# --- inference ------------------------------------------------------------------------------------

BATCH_PROMPTS = ["The red fox lives in the", "What color is the banana?", "Where does the owl live?",
                 "A swan is", "The green frog", "In the orchard there is a", "The whale lives", "hi"]


def demo_or_tiny(ctx: Ctx) -> Path:
    """The demo model (finetune.demo; bench/gpu_prepare.sh builds it before the GPU run) on a
    GPU; llama.tiny's on the CPU, where building the demo would take minutes."""
    if not ctx.cuda:
        return tiny_ckpt(ctx)
    from finetune.demo import MODEL_DIR, ensure_demo_model

    if not (MODEL_DIR / "params.json").is_file():
        ctx.note(f"no demo model at {MODEL_DIR}: building it here (bench/gpu_prepare.sh builds it beforehand)")
    with contextlib.redirect_stdout(sys.stderr):
        return ensure_demo_model()


@check("inference", cpu=True, limit=(240, 150))
def inference(ctx: Ctx) -> dict:
    """example.py on the device (eager, and --compile in full mode); tokens/s of batch-1 greedy
    decoding, eager and compiled (bench/decode.py's never-stopping generator); batch-8 greedy
    outputs equal to each prompt's batch-1 output."""
    from decode import ours as decoder
    from llama.generation import Llama

    ckpt = demo_or_tiny(ctx)
    result = {"ckpt": ckpt.name}
    cli = [[]] if ctx.quick or not ctx.cuda else [[], ["--compile"]]
    for flags in cli:
        ctx.at(f"example.py --device {ctx.device} {' '.join(flags)}")
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "example.py", "--ckpt_dir", str(ckpt), "--device", ctx.device,
                            "--prompt", BATCH_PROMPTS[0], "--temperature", "0", "--max_gen_len", "32", *flags],
                           cwd=ROOT, capture_output=True, text=True, timeout=200)
        print(r.stdout + r.stderr, file=sys.stderr)
        if r.returncode != 0:
            raise CheckFailed(f"example.py {' '.join(flags)} exited {r.returncode}: "
                              f"{(r.stderr.strip().splitlines() or ['?'])[-1]}", result)
        result[f"example.py{' ' + flags[0] if flags else ''}_s"] = round(time.perf_counter() - start, 1)

    from llama.tokenizers import Tokenizer, find_tokenizer

    tokenizer = Tokenizer(find_tokenizer(str(ckpt)))
    prompt, new = tokenizer.encode(BATCH_PROMPTS[0], bos=True, eos=False), 64 if ctx.cuda else 8
    sync = torch.cuda.synchronize if ctx.cuda else (lambda: None)
    tokens = {}
    for compiled in ([False, True] if ctx.cuda else [False]):
        name = "compiled" if compiled else "eager"
        ctx.at(f"batch-1 greedy decode, {name}")
        run = decoder(ckpt, [prompt], new, torch.float32, ctx.device, compile=compiled)
        tokens[name] = run()  # the warm-up (and compilation)
        times = []
        for _ in range(3 if ctx.cuda else 1):
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
        result[f"tok_s_{name}"] = round(new / median(times), 1)
    if "compiled" in tokens:
        result["compiled_same_tokens"] = tokens["compiled"] == tokens["eager"]

    ctx.at("batch 8 against batch 1, greedy")
    llama = Llama.build(str(ckpt), max_seq_len=128, max_batch_size=8, device=ctx.device)
    gen_len = 24 if ctx.cuda else 8
    batch = [r["generation"] for r in llama.text_completion(BATCH_PROMPTS, temperature=0, max_gen_len=gen_len)]
    single = [llama.text_completion([p], temperature=0, max_gen_len=gen_len)[0]["generation"] for p in BATCH_PROMPTS]
    differ = [i for i, (a, b) in enumerate(zip(batch, single)) if a != b]
    result["batch8_equals_batch1"] = not differ
    if differ:
        raise CheckFailed(f"batch-8 greedy output {differ[0]} differs from batch 1: {batch[differ[0]]!r} "
                          f"vs {single[differ[0]]!r}", result)
    return result


# --- placement and distributed ----------------------------------------------------------------------


@check("placement", cpu=True, limit=(120, 90))
def placement(ctx: Ctx) -> dict:
    """LoRA training with devices = "cuda:0,cpu" (layers spread over the GPU and the host; on the
    CPU "cpu,cpu") gives the single-device step losses, in float32."""
    ckpt = tiny_ckpt(ctx)
    devices = "cuda:0,cpu" if ctx.cuda else "cpu,cpu"
    single = train_losses(ctx, ckpt, device=ctx.device, precision="fp32")  # train_lora's run, when it ran
    spread = train_losses(ctx, ckpt, devices=devices, precision="fp32")
    diff = compare_losses(spread, single)
    result = {"devices": devices, "steps": len(single), "max_rel_diff": round(diff, 7), "tol": LOSS_TOL["fp32"]}
    if not diff <= LOSS_TOL["fp32"]:
        raise CheckFailed(f"devices {devices}: losses differ from one device by {diff:.2e}", result)
    return result


def torchrun_ft(ctx: Ctx, out: Path, ckpt: Path, steps: int, sharding: str) -> subprocess.CompletedProcess:
    from tests.utils import DEMO_TRAIN

    flags = ["--ckpt_dir", ckpt, "--out_dir", out, "--device", ctx.device, "--sharding", sharding, "--max_steps", steps,
             "--train_file", DEMO_TRAIN, "--template", "plain", "--cutoff_len", 64, "--micro_batch_size", 8,
             "--save_every", 3, "--keep_last", 5, "--lora_dropout", 0, "--exact_match_samples", 0, "--seed", 0]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        "ft_main.py", *map(str, flags)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    print(r.stdout[-4000:] + r.stderr[-4000:], file=sys.stderr)
    return r


@check("torchrun_nccl", cpu=False, limit=(240, 150))
def torchrun_nccl(ctx: Ctx) -> dict:
    """ft_main.py under `torchrun --nproc_per_node 1` (a process group of one: nccl), with DDP and
    with FSDP2 (sharding = "fsdp"): 3 steps, then the same command with 6 steps resumes from the
    step-3 checkpoint and completes."""
    from tests.utils import read_metrics

    ckpt = tiny_ckpt(ctx)
    result = {}
    for sharding in (["ddp", "fsdp"] if not ctx.quick else ["fsdp"]):
        out = ctx.work / "runs" / f"torchrun_{sharding}"
        shutil.rmtree(out, ignore_errors=True)
        for steps in (3, 6):
            ctx.at(f"torchrun 1 rank, sharding {sharding}, {steps} steps")
            r = torchrun_ft(ctx, out, ckpt, steps, sharding)
            if r.returncode != 0:
                raise CheckFailed(f"{sharding}, {steps} steps: exit {r.returncode}: "
                                  f"{(r.stderr.strip().splitlines() or ['?'])[-1]}", result)
        log = r.stdout + r.stderr
        resumed = "resumed from" in log and "at step 3" in log
        logged = [m["step"] for m in read_metrics(out) if "loss" in m]
        result[sharding] = {"group": "initializing model parallel with size 1" in log, "resumed": resumed,
                            "steps_logged": logged}
        if not resumed or logged != [1, 2, 3, 4, 5, 6]:
            raise CheckFailed(f"{sharding}: the 6-step run did not resume from step 3 (steps logged {logged})", result)
    return result


# --- running the checks -------------------------------------------------------------------------------


def versions() -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except Exception:  # missing, or broken on this machine: say so rather than stop
            return None

    v = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
         "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         **{name: version(name) for name in ("triton", "bitsandbytes", "fairscale", "transformers")}}
    v["gpu"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        v.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                 capability=".".join(map(str, torch.cuda.get_device_capability())))
        try:  # a tuple in recent torch, an int in older ones
            nccl = torch.cuda.nccl.version()
            v["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception as e:  # a build without NCCL: the torchrun check will say more
            v["nccl"] = f"unavailable ({type(e).__name__})"
    return v


def run_child(a) -> int:
    """--only NAME: run one check here; its result is the last stdout line."""
    ctx = Ctx(a)
    fn = CHECKS[a.only][0]
    out = {"check": a.only}
    try:
        out.update(status="ok", result=fn(ctx))
    except Skip as e:
        out.update(status="skipped", error=str(e))
    except torch.cuda.OutOfMemoryError as e:
        traceback.print_exc()
        out.update(status="oom", size=ctx.size, error=str(e).splitlines()[0])
    except CheckFailed as e:
        out.update(status="failed", error=str(e.args[0]), result=e.args[1] if len(e.args) > 1 else None)
    except Exception as e:  # any crash of the code under check: recorded, the other checks still run
        traceback.print_exc()
        line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        oom = "out of memory" in str(e).lower()  # raised as a RuntimeError by some (bitsandbytes, NCCL)
        out.update(status="oom" if oom else "failed", size=ctx.size, error=f"{type(e).__name__}: {line}")
    if ctx.notes:
        out["notes"] = ctx.notes
    print(RESULT + json.dumps(out), flush=True)
    return 0


def run_all(a) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not a.cpu
    if not cuda:
        why = "--cpu" if torch.cuda.is_available() else \
            f"no CUDA device (torch {torch.__version__}{', a CPU-only build' if not torch.version.cuda else ''})"
        print(f"{why}: running the CPU subset on tiny configurations")
    elif torch.cuda.get_device_capability() < (8, 0):
        print(f"{torch.cuda.get_device_name()} has no native bf16: bf16 checks fall back to fp16")
    v = {**versions(), "quick": a.quick, "cpu_subset": not cuda}
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("date", "host")))
    names = [n for n in CHECKS if not a.checks or n in a.checks]
    budget = a.budget or (180 if a.quick else 480)
    start = time.perf_counter()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    records = [{"versions": v}]
    with open(out / "log.txt", "w") as log:
        for name in names:
            fn, cpu_ok, limit = CHECKS[name]
            if not cuda and not cpu_ok:
                records.append({"check": name, "status": "skipped", "error": "needs CUDA", "seconds": 0.0})
                continue
            left = budget - (time.perf_counter() - start)
            if left < 10:
                records.append({"check": name, "status": "skipped", "seconds": 0.0,
                                "error": f"over the time budget of {budget} s"})
                print(f"{name}: skipped, over the time budget", flush=True)
                continue
            timeout = min(limit[1] if a.quick else limit[0], left)
            cmd = [sys.executable, __file__, "--only", name, "--out", str(out), "--work", str(work)]
            cmd += ["--quick"] * a.quick + ["--cpu"] * a.cpu
            t0 = time.perf_counter()
            # its own session: on a timeout the whole group goes (torchrun's workers, example.py), so
            # nothing left behind holds GPU memory through the next checks
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
            try:
                stdout, stderr = p.communicate(timeout=timeout)
                lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT)]
                rec = json.loads(lines[-1][len(RESULT):]) if lines else {
                    "check": name, "status": "failed",
                    "error": f"exit {p.returncode}: " + ((stderr.strip().splitlines() or ["no output"])[-1])}
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                stdout, stderr = p.communicate()
                sizes = [ln[3:] for ln in stdout.splitlines() if ln.startswith("-- ")]
                rec = {"check": name, "status": "timeout", "size": sizes[-1] if sizes else None,
                       "error": f"timed out after {timeout:.0f} s"}
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            log.write(f"===== {name}: {rec['status']} in {rec['seconds']} s\n{stdout}\n{stderr}\n")
            log.flush()
            records.append(rec)
            print(f"[{time.perf_counter() - start:6.1f} s] {name}: {rec['status']} in {rec['seconds']} s"
                  + (f" ({rec['error']})" if rec.get("error") else ""), flush=True)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    with open(out / "checks.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    table = format_table(records, time.perf_counter() - start)
    (out / "table.txt").write_text(table + "\n")
    print(table)
    bad = [r for r in records[1:] if r["status"] in ("failed", "oom", "timeout")]
    return 1 if bad else 0


def summary(rec: dict) -> str:
    """The one figure of a check that says most, for the table."""
    r = rec.get("result") or {}
    name = rec["check"]
    if rec["status"] != "ok":
        return (rec.get("error") or "") + (f" [at {rec['size']}]" if rec.get("size") and rec["status"] != "failed" else "")
    if name == "int4_correct":
        return f"{r['cases']} cases, worst error/bound {max(r['worst_error_over_bound'].values()):.2f}"
    if name == "int4_speed":
        m1 = [row["dense_over_int4"] for row in r["rows"] if row["m"] == 1]
        big = [row["dense_over_int4"] for row in r["rows"] if row["m"] >= 256]
        return f"bf16/int4 at M=1 {min(m1)}-{max(m1)}x, at M=256 {min(big)}-{max(big)}x"
    if name == "memory_7b":
        shape = f"dim {r['shape']['dim']} x {r['shape']['n_layers']} layers"
        return f"{shape}: int4/bf16 {r['int4_over_bf16']} ({r['basis']})" + \
            ("" if r["basis"] == "max_memory_allocated" else "; the 0.3 claim is the 7B's, on a GPU")
    if name.startswith("train_") and "tok_s_median" in r:
        paths = f"; int4 paths {r['int4_paths']}" if r.get("int4_paths") else ""
        return (f"{r['tok_s_median']} tok/s, peak {r.get('peak_allocated_gib')} GiB "
                f"(plan {r['plan_without_overhead_gib']} + overhead = {r['plan_total_gib']}){paths}")
    if name.startswith("train_"):
        return ", ".join(f"{k} {v['max_rel_diff']:.1e} (tol {v['tol']})" for k, v in r.items() if isinstance(v, dict))
    if name == "inference":
        comp = f", compiled {r['tok_s_compiled']}" if "tok_s_compiled" in r else ""
        return f"eager {r['tok_s_eager']} tok/s{comp}; batch 8 = batch 1: {r['batch8_equals_batch1']}"
    if name == "placement":
        return f"{r['devices']}: max diff {r['max_rel_diff']:.1e}"
    if name == "torchrun_nccl":
        return ", ".join(f"{k}: resumed {v['resumed']}" for k, v in r.items())
    return ""


def format_table(records: list[dict], elapsed: float) -> str:
    v = records[0]["versions"]
    head = (f"gpu_check{' --quick' if v['quick'] else ''} on {v['gpu'] or 'CPU (no CUDA)'}: torch {v['torch']}, "
            f"CUDA {v['cuda']}, triton {v['triton']}, bitsandbytes {v['bitsandbytes']}, fairscale {v['fairscale']}, "
            f"python {v['python']}, {v['date']}; {elapsed:.0f} s in all")
    lines = [head, "", "| check | status | s | result |", "| --- | --- | --- | --- |"]
    for r in records[1:]:
        lines.append(f"| {r['check']} | {r['status']} | {r['seconds']} | {summary(r).replace('|', '/')} |")
    return "\n".join(lines)


def record(folder: Path) -> int:
    """Append a GPU run's checks.jsonl (fetched from the device) to bench/results.jsonl as one row."""
    from common import RESULTS

    lines = [json.loads(ln) for ln in (folder / "checks.jsonl").read_text().splitlines() if ln.strip()]
    v = lines[0]["versions"]
    row = {"bench": "gpu_check", "date": v["date"], "host": v["host"], "device": v["gpu"] or "cpu",
           "torch": v["torch"], "versions": v, "checks": lines[1:], "cmd": "bash bench/gpu_run.sh" + " --quick" * v["quick"]}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"appended the {v['gpu'] or 'CPU'} run of {v['date']} to {RESULTS}; its table ({folder / 'table.txt'}) "
          f"goes into docs/gpu.md")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for checks.jsonl, table.txt and log.txt")
    p.add_argument("--record", metavar="DIR", help="append DIR/checks.jsonl (a GPU run's) to bench/results.jsonl")
    p.add_argument("--quick", action="store_true", help="fewer sizes and steps: <= 3 minutes on one H100")
    p.add_argument("--cpu", action="store_true", help="run the CPU subset even where CUDA is present")
    p.add_argument("--checks", nargs="+", choices=list(CHECKS), help="run only these (default: all)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all checks; the ones that would start past it are skipped (default 480, quick 180)")
    p.add_argument("--only", choices=list(CHECKS), help=argparse.SUPPRESS)  # one check, in this process
    p.add_argument("--work", help=argparse.SUPPRESS)  # scratch shared by the checks of one run
    a = p.parse_args(argv)
    if a.record:
        return record(Path(a.record))
    if not a.out:
        p.error("--out DIR is required")
    if a.only:
        if not a.work:
            a.work = tempfile.mkdtemp(prefix="gpu_check_")
        return run_child(a)
    return run_all(a)


if __name__ == "__main__":
    sys.exit(main())
