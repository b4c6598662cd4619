"""Peak memory of LoRA training on a 1B-shaped LLaMA with the frozen base held as float32, bf16,
int4 or NF4.

    python bench/memory.py                         # CPU: the four bases, 3.5 minutes on 2 idle cores
    python bench/memory.py --device cuda           # GPU: bf16 autocast, torch.cuda.max_memory_allocated
    python bench/memory.py --keep /tmp/mem1b       # keep the random checkpoint there (reused if present)
    python bench/memory.py --kinds int4,nf4 --targets all-linear --seq 256

Model: TinyLlama-1.1B's shape (dim 2048, 22 layers, 32 heads, 4 KV heads, FFN 5632, vocab 32000)
with random weights (seed 0), written once in our format (params.json + consolidated.00.safetensors,
bf16, 2.0 GiB) tensor by tensor: the writer holds one tensor at a time (at most the 250 MiB float32
draw of the embedding). Every workload reads the same folder; it is removed at the end unless --keep.

Each base is measured in a fresh process (`python bench/memory.py --worker KIND ...`, started by
bench/common.run_fresh so its ru_maxrss is its own) that imports everything, notes its peak RSS
(the baseline), then does what the trainer does (finetune/trainer.py, with TrainConfig's defaults):
llama.loader.load_model (int4: round-to-nearest, group 128, and NF4: bitsandbytes, double
quant, both quantized on load one block at a time), LoRA on the targets (r 8, alpha 16, dropout
0.05, q and v by default), the trainer's AdamW (make_optimizer) on the trainable parameters, and
--steps steps (forward, summed LM loss through TaskModel divided by its token count, backward,
optimizer step) on random tokens, batch 1, --seq long. It prints the peak (CPU: peak RSS minus
the baseline; GPU: max_memory_allocated, which starts at 0), the same after load_model alone, the bytes of the model's
parameters and buffers (NF4's quantization state, about 3% of its packed weights, is not among
them), each step's loss (about ln 32000 = 10.4: a sanity check) and seconds.

Precision follows the trainer's `auto`: float32 compute on CPU, bf16 autocast on GPU. So the
embeddings, norms and output layer of the int4 and NF4 bases are float32 on CPU and bf16 on GPU.
The bf16 base computes in bf16 whatever the device; on a CPU without AVX512-BF16 a bf16 linear's
backward (grad @ W) runs ~200x slower than float32's (2 AVX2 cores: 16 s for one 5632x2048 layer
at seq 128; a whole step would take 10-20 minutes). So on CPU the bf16 base runs 1 step at seq 4
(--bf16-steps, --bf16-seq) beside a float32 run of the same length and steps, its ratio's
reference, and the table says so. The other bases run --steps 2 at --seq 128 on CPU (1024 on GPU).
Two steps are enough: the first creates the optimizer state (a few MiB for LoRA), and later steps
add little (the worker records the peak after each step).

CPU peaks are what a user gets, allocator included: glibc keeps part of what load_model frees (its
bf16 read buffers between 128 KiB and 32 MiB land in the heap once glibc's dynamic mmap threshold
has risen), 0.3-0.7 GiB for the float32 base; MALLOC_MMAP_THRESHOLD_=131072 makes that go away.

Prints a table (weights, peaks in GiB, peak / float32's peak at the same seq, seconds of the last
step) and appends one row to bench/results.jsonl. With --device cuda the GPU's measured ceilings
(copy bandwidth, bf16 matmul rate) are printed and recorded beside the figures.
"""
import argparse
import contextlib
import gc
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, append_row, gpu_ceilings, peak_rss_bytes, run_fresh
from llama.config import ModelArgs
from llama.layers import expected_shapes

SHAPE = ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, vocab_size=32000)
KINDS = ("float32", "bf16", "int4", "nf4")
GIB = 2**30


# --- the checkpoint, written once ------------------------------------------------------------


def write_checkpoint(out: Path, seed: int = 0) -> None:
    """Random bf16 weights (normal, std 0.02; norms 1) in our format, tensor by tensor: the
    safetensors header first (the offsets follow from the shapes), then each tensor drawn in
    float32, rounded to bf16, written and dropped. params.json comes last, so a folder that has
    one is complete."""
    shapes = expected_shapes(SHAPE)
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "consolidated.00.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for shape in shapes.values():
            t = torch.ones(shape) if len(shape) == 1 else torch.empty(shape).normal_(std=0.02, generator=gen)
            f.write(t.to(torch.bfloat16).view(torch.int16).numpy())
    SHAPE.write_params_json(out / "params.json")


@contextlib.contextmanager
def checkpoint_dir(keep: str | None):
    """The checkpoint folder: --keep's (written there unless already complete) or a temp one,
    removed on exit."""
    if keep:
        path = Path(keep)
        if not (path / "params.json").is_file():
            write_checkpoint(path)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        write_checkpoint(Path(tmp))
        yield Path(tmp)


# --- one workload, in a fresh process --------------------------------------------------------


def load_kwargs(kind: str, cuda: bool) -> dict:
    """load_model's dtype and quant for a base kind; what stays float in a quantized base
    (embeddings, norms, output) is in the compute dtype."""
    compute = torch.bfloat16 if cuda else torch.float32
    return {"float32": {"dtype": torch.float32}, "bf16": {"dtype": torch.bfloat16},
            "int4": {"dtype": compute, "quant": "int4", "group_size": 128},
            "nf4": {"dtype": compute, "quant": "nf4"}}[kind]


def worker(kind: str, ckpt: str, device: str, seq: int, steps: int, targets: list[str]) -> dict:
    """Load the base, add LoRA and AdamW, train `steps` steps; the figures described at the top."""
    from finetune.config import TrainConfig
    from finetune.heads import TaskModel
    from finetune.methods.lora import apply_lora
    from finetune.trainer import make_optimizer
    import quant  # noqa: F401  (registers int4 and nf4)
    from llama.formats import read_model_args
    from llama.loader import load_model

    if kind == "nf4":
        import bitsandbytes  # noqa: F401  (loaded before the baseline: library code, not training memory)
    cuda = device == "cuda"
    cfg = TrainConfig()
    gc.collect()
    baseline = peak_rss_bytes()

    def peak() -> int:
        return torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes() - baseline

    start = time.perf_counter()
    model = load_model(ckpt, read_model_args(ckpt), device=device, **load_kwargs(kind, cuda))
    load_s = time.perf_counter() - start
    load_peak = peak()
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    apply_lora(model, targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    task_model = TaskModel(model, "pt").train()
    params = [p for p in task_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    tokens = torch.randint(0, SHAPE.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    losses, seconds, peaks = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        with autocast:
            loss, count, _ = task_model(tokens, tokens)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() / count.item())  # .item() waits for the GPU
        seconds.append(time.perf_counter() - start)
        peaks.append(peak())
    return {"kind": kind, "seq": seq, "steps": steps, "trainable_params": sum(p.numel() for p in params),
            "weights_bytes": weights, "load_s": round(load_s, 1), "load_peak_bytes": load_peak,
            "peak_bytes": peaks[-1], "peak_after_step": peaks, "losses": [round(x, 4) for x in losses],
            "s_per_step": [round(s, 2) for s in seconds]}


# --- the parent: plan, run, report -----------------------------------------------------------


def plan(kinds: list[str], seq: int, steps: int, bf16_seq: int, bf16_steps: int) -> list[tuple[str, int, int]]:
    """(kind, seq, steps) of each workload: bf16 at its own length, with a float32 reference of
    the same length and steps when that is not --seq."""
    runs = [(kind, bf16_seq, bf16_steps) if kind == "bf16" else (kind, seq, steps) for kind in kinds]
    if "bf16" in kinds and bf16_seq != seq:
        runs.append(("float32", bf16_seq, bf16_steps))
    return runs


def add_ratios(results: list[dict], seq: int) -> None:
    """peak / the float32 peak at the same seq, and for a shortened bf16 run, why."""
    float32 = {r["seq"]: r for r in results if r["kind"] == "float32"}
    for r in results:
        ref = float32.get(r["seq"])
        r["peak_over_float32"] = round(r["peak_bytes"] / ref["peak_bytes"], 3) if ref else None
        if r["kind"] == "bf16" and r["seq"] != seq:
            r["note"] = f"shortened from seq {seq}: bf16 backward is very slow on CPU (see --help)"


def print_table(results: list[dict]) -> None:
    print(f"{'base':8} {'seq':>5} {'steps':>5} {'weights GiB':>12} {'load peak GiB':>14} {'peak GiB':>9} "
          f"{'peak/float32':>13} {'s/step':>7}  note")
    for r in results:
        ratio = f"{r['peak_over_float32']:.3f}" if r["peak_over_float32"] is not None else "-"
        print(f"{r['kind']:8} {r['seq']:5d} {r['steps']:5d} {r['weights_bytes'] / GIB:12.2f} "
              f"{r['load_peak_bytes'] / GIB:14.2f} {r['peak_bytes'] / GIB:9.2f} {ratio:>13} "
              f"{r['s_per_step'][-1]:7.2f}  {r.get('note', '')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default cpu)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"comma-separated bases to measure, of {', '.join(KINDS)} (default all)")
    p.add_argument("--seq", type=int, help="tokens per training row, batch 1 (default 128 on CPU, 1024 on GPU)")
    p.add_argument("--bf16-seq", type=int,
                   help="tokens per row for the bf16 base (default 4 on CPU, where bf16 backward is very slow; "
                        "--seq on GPU); a float32 run at this length is added as its reference")
    p.add_argument("--steps", type=int, default=2, help="training steps per base; the first creates the optimizer "
                                                        "state (default 2)")
    p.add_argument("--bf16-steps", type=int, help="training steps for the bf16 base (default 1 on CPU, --steps on GPU)")
    p.add_argument("--targets", default="wq,wv", help="LoRA targets: ours (wq) or HF names (q_proj), comma-separated, "
                                                      "or all-linear (default wq,wv)")
    p.add_argument("--keep", metavar="DIR", help="write the random checkpoint to DIR and keep it; reused when DIR "
                                                 "already holds one (default: a temp folder, removed at the end)")
    p.add_argument("--worker", choices=KINDS, help="internal: measure one base in this process and print JSON")
    p.add_argument("--ckpt", help="internal: the checkpoint folder a --worker reads")
    a = p.parse_args()
    cuda = a.device == "cuda"
    seq = a.seq or (1024 if cuda else 128)
    targets = a.targets.split(",")
    if a.worker:
        print(json.dumps(worker(a.worker, a.ckpt, a.device, seq, a.steps, targets)))
        return
    kinds = a.kinds.split(",")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        p.error(f"unknown base kind(s) {', '.join(sorted(unknown))}; choose from {', '.join(KINDS)}")
    start = time.perf_counter()
    with checkpoint_dir(a.keep) as ckpt:
        write_s = time.perf_counter() - start
        results = [run_fresh([__file__, "--worker", kind, "--ckpt", str(ckpt), "--device", a.device, "--seq",
                              str(s), "--steps", str(steps), "--targets", a.targets], timeout=1200)
                   for kind, s, steps in plan(kinds, seq, a.steps, a.bf16_seq or (seq if cuda else 4),
                                              a.bf16_steps or (a.steps if cuda else 1))]
    add_ratios(results, seq)
    print_table(results)
    print(f"checkpoint ready in {write_s:.0f} s; whole run {time.perf_counter() - start:.0f} s")
    ceilings = gpu_ceilings() if cuda else None  # after the workers: this process's GPU memory stays cached
    if ceilings:
        print("ceilings:", ceilings)
    append_row("memory", {"model": {k: getattr(SHAPE, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                                                   "hidden_dim", "vocab_size")},
                          "checkpoint": "ours, bf16, written tensor by tensor", "batch": 1, "seq": seq,
                          "steps": a.steps, "targets": targets, "results": results, "ceilings": ceilings},
               str(Path(__file__).relative_to(ROOT)), a.device)


if __name__ == "__main__":
    main()
