"""What the benchmarks share: the bench-58M workload, timing, fresh measuring processes, the GPU's
measured ceilings, and the row appended to bench/results.jsonl."""
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results.jsonl"

from llama.cpu_kind import cpu_description  # noqa: E402  (the CPU's model and flags, in every row)

# The fixed CPU workload of issue 6: LLaMA-shaped, 58M parameters, random weights (seed 0).
BENCH_58M = {"dim": 512, "n_layers": 8, "n_heads": 8, "vocab_size": 32000, "hidden_dim": 1376}

# run argv[1:] as a grandchild: Python starts subprocesses with vfork, and a vforked child's
# ru_maxrss starts at its parent's peak, so each measuring process is started from a small launcher
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def model_shapes(dim: int, n_layers: int, vocab: int, multiple_of: int = 256) -> dict:
    hidden = multiple_of * -(-int(2 * 4 * dim / 3) // multiple_of)
    shapes = {"tok_embeddings.weight": (vocab, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (dim, dim), p + "attention.wk.weight": (dim, dim),
            p + "attention.wv.weight": (dim, dim), p + "attention.wo.weight": (dim, dim),
            p + "feed_forward.w1.weight": (hidden, dim), p + "feed_forward.w2.weight": (dim, hidden),
            p + "feed_forward.w3.weight": (hidden, dim),
            p + "attention_norm.weight": (dim,), p + "ffn_norm.weight": (dim,),
        })
    shapes.update({"norm.weight": (dim,), "output.weight": (vocab, dim)})
    return shapes


def nbytes(shape, itemsize=2) -> int:
    n = itemsize
    for s in shape:
        n *= s
    return n


def write_random_checkpoint(out: Path, gb: float, dim: int, n_heads: int, vocab: int,
                            n_layers: Optional[int] = None) -> tuple[dict, int]:
    """params.json + consolidated.00.safetensors of at least `gb` GB of random bf16 weights (LLaMA-7B
    shapes scaled down in width), or of exactly `n_layers` blocks when given, written one tensor at
    a time (header first: every shape is known up front), never held whole. Returns (params, bytes)."""
    if n_layers is None:
        per_layer = sum(nbytes(s) for k, s in model_shapes(dim, 1, vocab).items() if k.startswith("layers."))
        fixed = nbytes((vocab, dim)) * 2 + nbytes((dim,))
        n_layers = max(1, -(-(int(gb * 1e9) - fixed) // per_layer))
    shapes = model_shapes(dim, n_layers, vocab)
    out.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for key, shape in shapes.items():
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes(shape)]}
        offset += nbytes(shape)
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    g = torch.Generator().manual_seed(0)
    with open(out / "consolidated.00.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, shape in shapes.items():
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            f.write(t.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
            del t
    params = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab, multiple_of=256, norm_eps=1e-5)
    (out / "params.json").write_text(json.dumps(params))
    return params, offset


# A child started with vfork (as subprocess does) inherits its parent's peak RSS in ru_maxrss, and
# this process has held large tensors; so each measured command runs under a small launcher whose
# own peak is a few MB, and reports RUSAGE_CHILDREN of the one process it ran, and its wall time.
WALL_LAUNCHER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
wall = time.perf_counter() - start
print(json.dumps({"rc": rc, "wall": wall, "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def run_measured(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one command (split_model.py, an export), run
    under WALL_WALL_LAUNCHER."""
    report = subprocess.run([sys.executable, "-c", WALL_LAUNCHER, *cmd], cwd=ROOT, capture_output=True, text=True, check=True)
    r = json.loads(report.stdout)
    return r["wall"], r["maxrss_kib"] / 1024, r["rc"]  # ru_maxrss is in KiB on Linux


def add_source_args(p) -> None:
    """The options of the benchmarks that run a command on a large random checkpoint
    (write_random_checkpoint): its size and shape, the runs, and where it lives."""
    p.add_argument("--gb", type=float, default=1.1, help="source checkpoint size in GB (default 1.1)")
    p.add_argument("--runs", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--dim", type=int, default=2048, help="model width (default 2048)")
    p.add_argument("--n_heads", type=int, default=16, help="attention heads (default 16)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (default 32000)")
    p.add_argument("--workdir", help="where to put the checkpoints (default: a temp folder, removed after)")


@contextlib.contextmanager
def random_source(a, prefix: str, write_extra=None):
    """Yield (work folder, source checkpoint) for add_source_args' options `a`: the checkpoint is
    generated on first use (write_extra(src) adds files beside it); a temp work folder is removed
    after."""
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix=prefix))
    try:
        src = work / "src"
        if not (src / "params.json").is_file():
            print(f"generating a {a.gb} GB random checkpoint in {src} ...", flush=True)
            write_random_checkpoint(src, a.gb, a.dim, a.n_heads, a.vocab)
            if write_extra is not None:
                write_extra(src)
        yield work, src
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


def measured_runs(cmd: list[str], runs: int, out: Path, label: str) -> tuple[list[float], list[float]]:
    """(wall seconds, peak RSS MiB) of `runs` fresh runs of cmd (run_measured), removing its
    output `out` (a file or folder) before each; stops with the command line if one fails."""
    walls, rss = [], []
    for i in range(runs):
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        wall, peak, rc = run_measured(cmd)
        if rc != 0:
            sys.exit(f"{label} failed with exit code {rc}: {' '.join(cmd)}")
        walls.append(wall)
        rss.append(peak)
        print(f"{label} run {i + 1}: {wall:.2f} s, peak RSS {peak:.0f} MiB", flush=True)
    return walls, rss


def hf_config(shape: dict = BENCH_58M):
    """transformers.LlamaConfig of a model shape given in our names."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape["dim"], num_hidden_layers=shape["n_layers"],
                       num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_heads"],
                       intermediate_size=shape["hidden_dim"], vocab_size=shape["vocab_size"],
                       max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)


def write_hf_checkpoint(out_dir: Path, shape: dict = BENCH_58M, seed: int = 0) -> Path:
    """An HF folder (config.json + model.safetensors, float32) with random weights drawn by
    transformers' own init from `seed`: the one set of weights every peer then loads."""
    from transformers import LlamaForCausalLM

    if not (out_dir / "config.json").is_file():
        torch.manual_seed(seed)
        LlamaForCausalLM(hf_config(shape)).save_pretrained(out_dir)
    return out_dir


def timed(fn, runs: int, warmup: int = 2, sync=lambda: None) -> list[float]:
    """Seconds of each of `runs` calls of fn(), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def cuda_times(fn, runs: int = 20, warmup: int = 5, flush_bytes: int = 256 << 20) -> list[float]:
    """Seconds of each of `runs` calls of fn() on the current GPU, timed with CUDA events after
    `warmup` untimed calls. Before each call (outside the timed region) a 256 MB write flushes the
    L2 cache: a 4096x4096 int4 weight is 8 MB and H100's L2 50 MB, so without it every call after
    the first would read its weight from the cache, which a decode step through 32 layers never does."""
    flush = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def median(values) -> float:
    return statistics.median(values)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_fresh(args: list[str], timeout: float = 600) -> dict:
    """Run `python <args>` in a fresh process (through the launcher) and parse the JSON object it
    prints on its last line of stdout."""
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_ceilings() -> dict:
    """The GPU's measured device-to-device copy bandwidth and bf16 matmul rate: what its figures
    are bounded by."""
    sync = torch.cuda.synchronize
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t_copy = median(timed(lambda: b.copy_(a), 10, 3, sync))
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_mm = median(timed(lambda: x @ x, 10, 3, sync))
    return {"device_name": torch.cuda.get_device_name(), "copy_gb_s": round(2 * a.numel() / t_copy / 1e9, 1),
            "bf16_matmul_tflops": round(2 * 8192 ** 3 / t_mm / 1e12, 1)}


def cpu_bandwidth(nbytes: int = 1 << 30) -> dict:
    """This CPU's memory bandwidth in GB/s with torch's threads: reading a float32 tensor of nbytes
    (a sum, as decoding reads every weight once per token) and copying it (read + write). The
    median of 7 passes after 2; nbytes well past the caches."""
    x = torch.ones(nbytes // 4)
    y = torch.empty_like(x)
    read = median(timed(lambda: x.sum(), 7, 2))
    copy = median(timed(lambda: y.copy_(x), 7, 2))
    return {"read_gb_s": round(nbytes / read / 1e9, 1), "copy_gb_s": round(2 * nbytes / copy / 1e9, 1)}


def append_row(bench: str, result: dict, script: str, device: str = "cpu") -> dict:
    """Append one JSON row (what ran, where, and the result) to bench/results.jsonl."""
    row = {"bench": bench, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "device": device,
           "cpu": cpu_description(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
           "load_avg": [round(x, 2) for x in os.getloadavg()], **result,  # other work on the machine, when shared
           "cmd": " ".join(["python", script, *sys.argv[1:]])}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row
