"""What this CPU is, for the choices that depend on it: its model name, the vector extensions
that change our figures, and whether it runs bfloat16 matmuls natively (which `dtype = "auto"`
follows)."""
import platform
from typing import Optional

import torch

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the extensions that change our figures
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # either runs bf16 matmuls in hardware (AMX first: the faster)
# torch's own checks (torch.cpu), which see the CPU where /proc/cpuinfo does not (other systems)
_TORCH_CHECKS = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
                 "avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}  # AMX tiles come with AMX-BF16 on every CPU that has them


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def cpu_flags() -> set[str]:
    """The FLAGS this CPU has, from /proc/cpuinfo (Linux) and torch's capability checks."""
    lines = _cpuinfo()
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    for flag, check in _TORCH_CHECKS.items():
        if getattr(torch.cpu, check, lambda: False)():
            flags.add(flag)
    return {f for f in FLAGS if f in flags}


def cpu_model() -> str:
    lines = _cpuinfo()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or "unknown")


def cpu_description() -> str:
    """e.g. 'Intel(R) Xeon(R) Processor: avx2 avx512f avx512_bf16 amx_bf16'."""
    found = [f for f in FLAGS if f in cpu_flags()]
    return f"{cpu_model()}: {' '.join(found)}" if found else cpu_model()


def native_bf16() -> Optional[str]:
    """The flag by which this CPU runs bf16 matmuls natively (amx_bf16 or avx512_bf16), or None.
    Without either, PyTorch's bf16 matmuls ran ~10x slower than float32 (forward) on an AVX2 CPU;
    with AMX, bf16 LoRA training ran 1.7x float32 (docs/benchmarks.md)."""
    flags = cpu_flags()
    return next((f for f in BF16_FLAGS if f in flags), None)


def gpu_native_bf16(device) -> bool:
    """Whether the GPU `device` runs bf16 natively: compute capability 8.0 (Ampere) or later
    (torch.cuda.is_bf16_supported also counts slow emulation). True where no GPU can be asked (a
    config resolved ahead, a plan): bf16 is the GPU default."""
    return not torch.cuda.is_available() or torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)


def auto_dtype(device) -> tuple[torch.dtype, str]:
    """What `dtype = "auto"` means on `device`, and why, in words for the run's first lines:
    bfloat16 on a GPU that runs it natively (float16 on older ones) and on a CPU that does,
    float32 on other CPUs."""
    if str(device).startswith("cuda"):
        if gpu_native_bf16(device):
            return torch.bfloat16, "a GPU"
        return torch.float16, "a GPU without native bf16 (compute capability below 8.0)"
    flag = native_bf16()
    if flag:
        return torch.bfloat16, f"this CPU runs bf16 natively: {flag}"
    return torch.float32, "this CPU has no avx512_bf16 or amx_bf16: bf16 matmuls would run slower than float32"
