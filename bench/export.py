"""python -m llama.export on a large random checkpoint: wall time and peak RSS of the export process,
set against the largest tensor (the exporters stream one tensor at a time) and the output.

    python bench/export.py                          # ~1.1 GB bf16 checkpoint -> hf, gguf f16, gguf q8_0, pth
    python bench/export.py --gb 4 --formats hf:auto # one format only

The source (ours: params.json + consolidated.00.safetensors, LLaMA-7B shapes scaled down in width)
is generated tensor by tensor, with a sentencepiece tokenizer of its vocabulary trained on random
words beside it (every format writes the tokenizer; GGUF needs one). Each run is a fresh `python -m llama.export` process measured by a
small launcher (bench/common.run_measured); the output is removed between runs. The baseline is a
process that only imports torch and the exporters. Appends one JSON row per format to
bench/results.jsonl.
"""
import argparse
import json
import os
import random
import statistics
import string
import sys
from pathlib import Path

from common import add_source_args, append_row, measured_runs, random_source, run_measured


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A sentencepiece BPE model of exactly vocab_size pieces, trained on random words (seconds)."""
    from llama.tiny import train_tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(40000)]
    train_tokenizer(path, vocab_size, lines=[" ".join(rng.choice(words) for _ in range(12)) for _ in range(60000)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--formats", default="hf:auto,gguf:f16,gguf:q8_0,pth:auto",
                   help="comma-separated format:outtype pairs (default hf:auto,gguf:f16,gguf:q8_0,pth:auto)")
    a = p.parse_args(argv)

    with random_source(a, "bench_export_", lambda src: write_tokenizer(src / "tokenizer.model", a.vocab)) as (work, src):
        params = json.loads((src / "params.json").read_text())
        src_bytes = (src / "consolidated.00.safetensors").stat().st_size
        largest = 2 * a.vocab * a.dim  # the embedding (and output) in bf16
        _, baseline, _ = run_measured([sys.executable, "-c", "import torch, llama.export, quant"])
        rows = []
        for pair in a.formats.split(","):
            fmt, outtype = pair.split(":")
            out = work / ("out.gguf" if fmt == "gguf" else "out")
            cmd = [sys.executable, "-m", "llama.export", "--ckpt_dir", str(src), "--format", fmt, "--out", str(out),
                   "--outtype", outtype, "--quiet"]
            walls, rss = measured_runs(cmd, a.runs, out, f"export {fmt} {outtype}")
            out_bytes = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*"))
            above = statistics.median(rss) - baseline
            row = append_row("export", {
                "source_bytes": src_bytes, "params": params, "format": fmt, "outtype": outtype, "runs": a.runs,
                "wall_s_median": round(statistics.median(walls), 3), "wall_s": [round(w, 3) for w in walls],
                "peak_rss_mib_median": round(statistics.median(rss), 1), "peak_rss_mib": [round(r, 1) for r in rss],
                "baseline_rss_mib": round(baseline, 1), "largest_tensor_bytes": largest, "output_bytes": out_bytes,
                "above_baseline_over_largest_tensor": round(above * 2**20 / largest, 2),
                "above_baseline_over_output": round(above * 2**20 / out_bytes, 3),
                "page_cache": "warm (source just written)",
                "export_cmd": " ".join(["python"] + cmd[1:]),
            }, "bench/export.py")
            rows.append(row)
        print(f"\nsource {src_bytes / 2**20:.0f} MiB bf16, largest tensor {largest / 2**20:.0f} MiB, "
              f"import-only RSS {baseline:.0f} MiB, {os.cpu_count()} CPUs")
        print(f"{'format':>12} {'wall s':>8} {'peak RSS MiB':>13} {'above base MiB':>15} {'/largest tensor':>16} "
              f"{'output MiB':>11} {'/output':>8}")
        for r in rows:
            print(f"{r['format'] + ':' + r['outtype']:>12} {r['wall_s_median']:>8.2f} {r['peak_rss_mib_median']:>13.0f} "
                  f"{r['peak_rss_mib_median'] - baseline:>15.0f} {r['above_baseline_over_largest_tensor']:>16.2f} "
                  f"{r['output_bytes'] / 2**20:>11.0f} {r['above_baseline_over_output']:>8.3f}")
        print(f"medians of {a.runs} runs; appended to bench/results.jsonl")


if __name__ == "__main__":
    main()
