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

from common import RESULTS, ROOT, run_measured, write_random_checkpoint


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
            write_random_checkpoint(src, a.gb, a.dim, a.n_heads, a.vocab)
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
            wall, peak, rc = run_measured(cmd)
            if rc != 0:
                sys.exit(f"split_model.py failed with exit code {rc}: {' '.join(cmd)}")
            walls.append(wall)
            rss.append(peak)
            print(f"run {i + 1}: {wall:.2f} s, peak RSS {peak:.0f} MiB", flush=True)
        # what the split process holds before touching a tensor: the interpreter, torch, our modules
        _, baseline, _ = run_measured([sys.executable, "-c", "import torch, llama.formats, split.reshard"])
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
