"""split_model.py on a large random checkpoint: wall time and peak RSS of the split process.

    python bench/split.py                      # ~1.1 GB bf16 checkpoint, --n 4, safetensors, 3 runs
    python bench/split.py --gb 4 --source pth  # a Meta-style .pth source (mmapped while splitting)

The source checkpoint (params.json + consolidated.00.safetensors, random bf16 weights, LLaMA-7B
shapes scaled down in width) is generated tensor by tensor, never held whole. Each run is a fresh
`python split_model.py` subprocess whose own peak RSS (ru_maxrss) is read by a small launcher
process; the output folder is removed between runs. The source stays in the page cache (warm reads). Appends one
JSON row to bench/results.jsonl.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.jsonl"


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


def generate(out: Path, gb: float, dim: int, n_heads: int, vocab: int) -> tuple[dict, int]:
    """params.json + consolidated.00.safetensors of at least `gb` GB, written one tensor at a time
    (header first: every shape is known up front)."""
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
# this process has held large tensors; so each split runs under a small launcher whose own peak is
# a few MB, and reports RUSAGE_CHILDREN of the one split process it ran.
LAUNCHER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
wall = time.perf_counter() - start
print(json.dumps({"rc": rc, "wall": wall, "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def run_split(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one split_model.py process."""
    report = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], cwd=ROOT, capture_output=True, text=True, check=True)
    r = json.loads(report.stdout)
    return r["wall"], r["maxrss_kib"] / 1024, r["rc"]  # ru_maxrss is in KiB on Linux


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.1, help="source checkpoint size in GB (default 1.1)")
    p.add_argument("--n", type=int, default=4, help="shards to split into (default 4)")
    p.add_argument("--format", choices=["safetensors", "pth"], default="safetensors", help="output format")
    p.add_argument("--source", choices=["safetensors", "pth"], default="safetensors",
                   help="source format: ours (safetensors, default) or Meta .pth (converted from it first)")
    p.add_argument("--runs", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--dim", type=int, default=2048, help="model width (default 2048)")
    p.add_argument("--n_heads", type=int, default=16, help="attention heads (default 16)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (default 32000)")
    p.add_argument("--workdir", help="where to put the checkpoints (default: a temp folder, removed after)")
    a = p.parse_args(argv)

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_split_"))
    try:
        src = work / "src"
        if not (src / "params.json").is_file():
            print(f"generating a {a.gb} GB random checkpoint in {src} ...", flush=True)
            generate(src, a.gb, a.dim, a.n_heads, a.vocab)
        if a.source == "pth":
            pth = work / "src_pth"
            if not (pth / "params.json").is_file():
                subprocess.run([sys.executable, "split_model.py", "--n", "1", "--ckpt_dir", str(src), "--out", str(pth),
                                "--format", "pth", "--quiet"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            src = pth
        params = json.loads((src / "params.json").read_text())
        src_bytes = sum(f.stat().st_size for f in src.glob("consolidated.*"))
        out = work / "out"
        cmd = [sys.executable, "split_model.py", "--n", str(a.n), "--ckpt_dir", str(src), "--out", str(out),
               "--format", a.format, "--quiet"]
        walls, rss = [], []
        for i in range(a.runs):
            shutil.rmtree(out, ignore_errors=True)
            wall, peak, rc = run_split(cmd)
            if rc != 0:
                sys.exit(f"split_model.py failed with exit code {rc}: {' '.join(cmd)}")
            walls.append(wall)
            rss.append(peak)
            print(f"run {i + 1}: {wall:.2f} s, peak RSS {peak:.0f} MiB", flush=True)
        # what the split process holds before touching a tensor: the interpreter, torch, our modules
        _, baseline, _ = run_split([sys.executable, "-c", "import torch, llama.formats, split.reshard"])
        largest = max(f.stat().st_size for f in out.glob("consolidated.*"))
        row = {
            "bench": "split", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "source_format": a.source, "source_bytes": src_bytes, "dtype": "bfloat16", "params": params,
            "n": a.n, "format": a.format, "runs": a.runs,
            "wall_s_median": round(statistics.median(walls), 3), "wall_s": [round(w, 3) for w in walls],
            "peak_rss_mib_median": round(statistics.median(rss), 1), "peak_rss_mib": [round(r, 1) for r in rss],
            "baseline_rss_mib": round(baseline, 1),
            "largest_output_bytes": largest,
            "rss_over_largest_output": round(statistics.median(rss) * 2**20 / largest, 3),
            "throughput_gb_s": round(src_bytes / 1e9 / statistics.median(walls), 3),
            "page_cache": "warm (source just written)",
            "cmd": " ".join(["python"] + cmd[1:]),
        }
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
        print()
        print(f"{'source':>16} {'n':>3} {'format':>12} {'wall s (median)':>16} {'peak RSS MiB':>13} {'import-only MiB':>16} "
              f"{'largest out MiB':>16} {'RSS/largest':>12} {'GB/s':>6}")
        print(f"{a.source:>7} {src_bytes / 2**20:>4.0f} MiB {a.n:>3} {a.format:>12} {row['wall_s_median']:>16.2f} "
              f"{row['peak_rss_mib_median']:>13.0f} {baseline:>16.0f} {largest / 2**20:>16.0f} "
              f"{row['rss_over_largest_output']:>12.2f} {row['throughput_gb_s']:>6.2f}")
        print(f"appended to {RESULTS.relative_to(ROOT)}")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
