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
import statistics
import subprocess
import sys

from common import RESULTS, ROOT, add_source_args, append_row, measured_runs, random_source, run_measured


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--n", type=int, default=4, help="shards to split into (default 4)")
    p.add_argument("--format", choices=["safetensors", "pth"], default="safetensors", help="output format")
    p.add_argument("--source", choices=["safetensors", "pth"], default="safetensors",
                   help="source format: ours (safetensors, default) or Meta .pth (converted from it first)")
    a = p.parse_args(argv)

    with random_source(a, "bench_split_") as (work, src):
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
        walls, rss = measured_runs(cmd, a.runs, out, "split_model.py")
        # what the split process holds before touching a tensor: the interpreter, torch, our modules
        _, baseline, _ = run_measured([sys.executable, "-c", "import torch, llama.formats, split.reshard"])
        largest = max(f.stat().st_size for f in out.glob("consolidated.*"))
        row = append_row("split", {
            "source_format": a.source, "source_bytes": src_bytes, "dtype": "bfloat16", "params": params,
            "n": a.n, "format": a.format, "runs": a.runs,
            "wall_s_median": round(statistics.median(walls), 3), "wall_s": [round(w, 3) for w in walls],
            "peak_rss_mib_median": round(statistics.median(rss), 1), "peak_rss_mib": [round(r, 1) for r in rss],
            "baseline_rss_mib": round(baseline, 1),
            "largest_output_bytes": largest,
            "rss_over_largest_output": round(statistics.median(rss) * 2**20 / largest, 3),
            "throughput_gb_s": round(src_bytes / 1e9 / statistics.median(walls), 3),
            "page_cache": "warm (source just written)",
        }, "bench/split.py")
        print()
        print(f"{'source':>16} {'n':>3} {'format':>12} {'wall s (median)':>16} {'peak RSS MiB':>13} {'import-only MiB':>16} "
              f"{'largest out MiB':>16} {'RSS/largest':>12} {'GB/s':>6}")
        print(f"{a.source:>7} {src_bytes / 2**20:>4.0f} MiB {a.n:>3} {a.format:>12} {row['wall_s_median']:>16.2f} "
              f"{row['peak_rss_mib_median']:>13.0f} {baseline:>16.0f} {largest / 2**20:>16.0f} "
              f"{row['rss_over_largest_output']:>12.2f} {row['throughput_gb_s']:>6.2f}")
        print(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
