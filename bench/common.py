"""What the benchmarks share: the bench-58M workload, timing, fresh measuring processes, the GPU's
measured ceilings, and the row appended to bench/results.jsonl."""
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results.jsonl"

# The fixed CPU workload of issue 6: LLaMA-shaped, 58M parameters, random weights (seed 0).
BENCH_58M = {"dim": 512, "n_layers": 8, "n_heads": 8, "vocab_size": 32000, "hidden_dim": 1376}

# run argv[1:] as a grandchild: Python starts subprocesses with vfork, and a vforked child's
# ru_maxrss starts at its parent's peak, so each measuring process is started from a small launcher
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


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


def cpu_description() -> str:
    """The CPU's model name and the vector extensions that change our figures, from /proc/cpuinfo
    (Linux): e.g. 'AMD EPYC: avx2 avx512f avx512_bf16'. bf16 matmuls, for one, are ~10x slower
    without avx512_bf16 or amx_bf16."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    found = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}: {' '.join(found)}" if found else model


def append_row(bench: str, result: dict, script: str, device: str = "cpu") -> dict:
    """Append one JSON row (what ran, where, and the result) to bench/results.jsonl."""
    row = {"bench": bench, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "device": device,
           "cpu": cpu_description(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, **result,
           "cmd": " ".join(["python", script, *sys.argv[1:]])}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row
