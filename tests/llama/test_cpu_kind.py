"""llama.cpu_kind: the CPU's flags from /proc/cpuinfo and torch's checks, and dtype auto's choice
(bfloat16 where the CPU runs it natively), with both sources replaced by given ones."""
import pytest
import torch

from llama import cpu_kind
from llama.generation import parse_dtype

CPUINFO = ["processor\t: 0", "model name\t: Some CPU 9000", "flags\t\t: fpu sse2 avx2 fma {extra}", ""]


@pytest.fixture
def cpu(monkeypatch):
    """Make this CPU one whose /proc/cpuinfo flags and torch checks are given."""
    def set_cpu(extra: str = "", torch_says: tuple = ()):
        monkeypatch.setattr(cpu_kind, "_cpuinfo", lambda: [line.format(extra=extra) for line in CPUINFO])
        for flag, check in cpu_kind._TORCH_CHECKS.items():
            monkeypatch.setattr(torch.cpu, check, lambda flag=flag: flag in torch_says, raising=False)
    return set_cpu


@pytest.mark.parametrize("extra, torch_says, flags, native", [
    ("", (), {"avx2"}, None),  # an AVX2-only CPU
    ("avx512f avx512bw", ("avx2", "avx512f"), {"avx2", "avx512f"}, None),
    ("avx512f avx512_bf16", (), {"avx2", "avx512f", "avx512_bf16"}, "avx512_bf16"),  # the AMD EPYC here
    ("avx512f avx512_bf16 amx_bf16 amx_tile", (), {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "amx_bf16"),
    ("", ("avx512_bf16",), {"avx2", "avx512_bf16"}, "avx512_bf16"),  # torch sees what cpuinfo does not
])
def test_flags_and_native_bf16(cpu, extra, torch_says, flags, native):
    cpu(extra, torch_says)
    assert cpu_kind.cpu_flags() == flags
    assert cpu_kind.native_bf16() == native
    dtype, why = cpu_kind.auto_dtype("cpu")
    assert dtype == (torch.bfloat16 if native else torch.float32)
    assert (native or "no avx512_bf16 or amx_bf16") in why
    assert parse_dtype("auto", "cpu") == dtype
    assert cpu_kind.cpu_description() == "Some CPU 9000: " + " ".join(f for f in cpu_kind.FLAGS if f in flags)


def test_a_gpu_is_bfloat16_whatever_the_cpu(cpu):
    cpu()
    assert cpu_kind.auto_dtype("cuda:0") == (torch.bfloat16, "a GPU")
    assert parse_dtype("auto", torch.device("cuda", 1)) == torch.bfloat16


@pytest.mark.parametrize("capability,want", [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_auto_on_a_gpu_without_native_bf16_is_float16(monkeypatch, capability, want):
    """example.py's auto on a GPU older than Ampere (a T4, a V100): float16, as the trainer takes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, why = cpu_kind.auto_dtype("cuda:0")
    assert dtype == want and parse_dtype("auto", "cuda:0") == want
    assert ("without native bf16" in why) == (want == torch.float16)


def test_no_cpuinfo(monkeypatch, cpu):
    cpu()
    monkeypatch.setattr(cpu_kind, "_cpuinfo", lambda: [])
    assert cpu_kind.cpu_flags() == set() and cpu_kind.native_bf16() is None
