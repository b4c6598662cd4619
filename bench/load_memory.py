"""Peak resident memory of loading a checkpoint, as a multiple of its size on disk.

    python bench/load_memory.py --size_mb 1000 --format ours --repeats 3

Writes a random float32 checkpoint of about --size_mb (tensor by tensor, so the writer never holds
two copies), then for each repeat starts a fresh process that imports torch, notes its RSS
(the baseline), runs `llama.loader.load_model`, and reads the peak RSS (ru_maxrss):

    load_only_ratio = (peak after load_model - baseline) / bytes on disk
    peak_rss_ratio  = the same after also reading every weight once

The second is the one that counts: Meta `.pth` files are mmapped, so load_model itself touches
almost nothing and the weights are paged in (and show up in RSS) when first used. The medians
over the repeats are printed and appended as a JSON row to bench/results.jsonl.

Python starts subprocesses with vfork, and a vforked child's ru_maxrss starts at the *parent's*
peak; each measuring process is therefore started from a small launcher process, so its
ru_maxrss is its own (checked against /proc/self/status VmHWM where there is one).
"""
import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results.jsonl"
FORMATS = ("ours", "meta", "hf")
MB = 2**20
VOCAB = 32000
HEAD_DIM = 64

# run argv[1:] as a grandchild, so that its ru_maxrss doesn't start at our caller's peak
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


# --- choosing a model of the wanted size -----------------------------------------------------


def model_args(size_mb: float):
    """LLaMA-shaped ModelArgs (vocab 32000, head_dim 64, MHA) of about size_mb MiB in float32:
    the widest dim that still gives at least 8 layers (fewer only for very small sizes)."""
    from llama.config import ModelArgs

    target = size_mb * MB / 4  # parameters
    best = None
    for dim in (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 5120, 8192):
        args = ModelArgs(dim=dim, n_layers=1, n_heads=dim // HEAD_DIM, vocab_size=VOCAB, multiple_of=256)
        per_layer = 4 * dim * dim + 3 * dim * args.ffn_hidden_dim + 2 * dim
        fixed = 2 * VOCAB * dim + dim
        n_layers = max(1, round((target - fixed) / per_layer))
        if best is None or n_layers >= 8:
            best = (dim, n_layers)
    dim, n_layers = best
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=dim // HEAD_DIM, vocab_size=VOCAB, multiple_of=256)


# --- writing a random checkpoint, one tensor at a time ---------------------------------------

def _random(shape, gen):
    import torch

    if len(shape) == 1:  # norm weights
        return torch.ones(shape)
    return torch.empty(shape).normal_(std=0.02, generator=gen)


def write_safetensors_streaming(path: Path, shapes: dict, gen) -> None:
    """A float32 safetensors file written tensor by tensor: header first (offsets are known from
    the shapes), then each tensor generated, written and dropped."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 4 * _numel(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for shape in shapes.values():
            f.write(memoryview(_random(shape, gen).numpy()).cast("B"))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_checkpoint(out_dir, size_mb: float, fmt: str, seed: int = 0):
    """A random float32 checkpoint of about size_mb MiB in `fmt` (ours, meta or hf). Returns ModelArgs."""
    import torch

    from llama.layers import expected_shapes, meta_to_hf_key

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = model_args(size_mb)
    shapes = expected_shapes(args)
    gen = torch.Generator().manual_seed(seed)
    if fmt == "ours":
        write_safetensors_streaming(out / "consolidated.00.safetensors", shapes, gen)
        args.write_params_json(out / "params.json")
    elif fmt == "hf":
        write_safetensors_streaming(out / "model.safetensors", {meta_to_hf_key(k): s for k, s in shapes.items()}, gen)
        (out / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
            "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
            "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "max_position_embeddings": 2048, "tie_word_embeddings": False,
        }, indent=2))
    elif fmt == "meta":  # torch.save needs the whole dict: one copy, as Meta's own files were made
        state = {k: _random(s, gen) for k, s in shapes.items()}
        torch.save(state, out / "consolidated.00.pth")
        del state
        args.write_params_json(out / "params.json")
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return args


def weight_bytes(ckpt_dir) -> int:
    return sum(p.stat().st_size for p in Path(ckpt_dir).iterdir() if p.suffix in (".safetensors", ".pth", ".bin"))


# --- measuring, in a fresh process -----------------------------------------------------------


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _vmhwm():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child_measure(ckpt_dir: str) -> dict:
    """Run in the fresh process: baseline after imports, peak after load_model and after touching."""
    import gc

    import torch

    from llama.formats import read_model_args
    from llama.loader import load_model

    gc.collect()
    baseline, maxrss_before = _rss_now(), _maxrss()
    t0 = time.perf_counter()
    model = load_model(ckpt_dir, read_model_args(ckpt_dir))
    load_s = time.perf_counter() - t0
    after_load = _maxrss()
    with torch.no_grad():  # read every weight once, as the first forward pass would
        checksum = sum(float(p.sum()) for p in model.parameters())
    after_touch = _maxrss()
    return {
        "baseline_rss": baseline, "maxrss_before": maxrss_before, "maxrss_after_load": after_load,
        "maxrss_after_touch": after_touch, "vmhwm": _vmhwm(), "load_s": load_s, "checksum": checksum,
        "n_params": sum(p.numel() for p in model.parameters()),
    }


def start_measurement(ckpt_dir) -> subprocess.Popen:
    """Start a fresh (grandchild) process measuring one load of ckpt_dir; see finish_measurement."""
    cmd = [sys.executable, "-c", _LAUNCHER, sys.executable, str(Path(__file__).resolve()), "--_child", str(ckpt_dir)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_measurement(proc: subprocess.Popen, ckpt_dir, timeout: float = 600) -> dict:
    """Wait for the process; return its figures plus the ratios to the size on disk."""
    stdout, stderr = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement of {ckpt_dir} failed ({proc.returncode}):\n{stderr[-3000:]}")
    m = json.loads(stdout.strip().splitlines()[-1])
    size = weight_bytes(ckpt_dir)
    m["disk_bytes"] = size
    m["load_only_ratio"] = (m["maxrss_after_load"] - m["baseline_rss"]) / size
    m["peak_rss_ratio"] = (m["maxrss_after_touch"] - m["baseline_rss"]) / size
    # ru_maxrss must be this process's own peak: VmHWM (own mm only) agrees when it is
    if m["vmhwm"] is not None and abs(m["vmhwm"] - m["maxrss_after_touch"]) > 0.02 * size + 8 * MB:
        raise RuntimeError(f"ru_maxrss {m['maxrss_after_touch']} disagrees with VmHWM {m['vmhwm']}: inherited peak?")
    return m


def measure(ckpt_dir) -> dict:
    return finish_measurement(start_measurement(ckpt_dir), ckpt_dir)


# --- the command line ------------------------------------------------------------------------


def run_format(fmt: str, size_mb: float, repeats: int, workdir: Path, seed: int) -> dict:
    ckpt = workdir / fmt
    t0 = time.perf_counter()
    args = write_checkpoint(ckpt, size_mb, fmt, seed)
    write_s = time.perf_counter() - t0
    runs = [measure(ckpt) for _ in range(repeats)]
    size = runs[0]["disk_bytes"]
    row = {
        "bench": "load_memory",
        "format": fmt,
        "size_mb": round(size / MB, 1),
        "peak_rss_ratio": round(statistics.median(r["peak_rss_ratio"] for r in runs), 4),
        "load_only_ratio": round(statistics.median(r["load_only_ratio"] for r in runs), 4),
        "ratios": [round(r["peak_rss_ratio"], 4) for r in runs],
        "load_s": round(statistics.median(r["load_s"] for r in runs), 3),
        "repeats": repeats,
        "model": {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "vocab_size": args.vocab_size},
        "dtype": "float32",
        "write_s": round(write_s, 1),
        "cmd": "python bench/load_memory.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size_mb", type=float, default=1000, help="checkpoint size to write, MiB of float32 (default 1000)")
    p.add_argument("--format", default="ours", choices=FORMATS + ("all",), help="checkpoint format (default ours)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes to measure; the median is reported (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    p.add_argument("--workdir", help="where to write the checkpoint (default: a temp folder, removed after)")
    p.add_argument("--results", default=str(RESULTS), help="JSONL file to append the row to ('' for none)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        print(json.dumps(child_measure(a._child)))
        return 0
    formats = FORMATS if a.format == "all" else (a.format,)
    with tempfile.TemporaryDirectory(prefix="load_memory_", dir=a.workdir) as tmp:
        for fmt in formats:
            row = run_format(fmt, a.size_mb, a.repeats, Path(tmp), a.seed)
            print(f"{fmt:5s} {row['size_mb']:8.1f} MiB on disk: peak RSS increase = {row['peak_rss_ratio']:.3f} x size "
                  f"(load_model alone {row['load_only_ratio']:.3f} x; runs {row['ratios']}; load {row['load_s']} s)")
            if a.results:
                with open(a.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
            for f in (Path(tmp) / fmt).iterdir():  # free the disk before the next format
                f.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
