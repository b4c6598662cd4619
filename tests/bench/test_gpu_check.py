"""bench/gpu_check.py without a GPU: its CPU smoke run (every check that can run on a CPU, tiny
configurations, each in its own subprocess) passes and writes the versions line, one line per
check and the table; and a check's outcome (ok, failed with its last line, out of memory with the
size it was at, skipped with why) is recorded as such."""
import json
import sys

import pytest
import torch

from tests.utils import ROOT, run

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

CPU_CHECKS = [name for name, (_, cpu, _) in gpu_check.CHECKS.items() if cpu]
GPU_ONLY = [name for name, (_, cpu, _) in gpu_check.CHECKS.items() if not cpu]


def test_cpu_smoke_run(tmp_path):
    """`--quick --cpu`: the CPU subset, each check ok (a failing one fails this test), the GPU
    ones skipped as needing CUDA, exit 0; checks.jsonl's first line says what it ran on."""
    assert {"int4_correct", "train_lora", "inference", "placement"} <= set(CPU_CHECKS)
    assert {"int4_speed", "torchrun_nccl", "train_nf4_1b"} <= set(GPU_ONLY)
    result = run([sys.executable, "bench/gpu_check.py", "--quick", "--cpu", "--out", tmp_path], timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.splitlines()[0].endswith(": running the CPU subset on tiny configurations")
    lines = [json.loads(ln) for ln in (tmp_path / "checks.jsonl").read_text().splitlines()]
    v = lines[0]["versions"]
    assert v["torch"] == torch.__version__ and v["cpu_subset"] and v["quick"]
    assert {"python", "cuda", "triton", "bitsandbytes", "fairscale", "gpu", "date"} <= set(v)
    status = {r["check"]: r for r in lines[1:]}
    assert list(status) == list(gpu_check.CHECKS)
    for name in CPU_CHECKS:
        assert status[name]["status"] == "ok", status[name]
        assert status[name]["seconds"] > 0
    for name in GPU_ONLY:
        assert status[name]["status"] == "skipped" and status[name]["error"] == "needs CUDA"
    r = status["int4_correct"]["result"]
    assert r["paths"] == ["reference", "dequant", "cpu_int4"] and r["cases"] > 40 and not r["failures"]
    assert status["inference"]["result"]["batch8_equals_batch1"] is True
    assert status["train_lora"]["result"]["bf16"]["max_rel_diff"] <= gpu_check.LOSS_TOL["bf16"]
    table = (tmp_path / "table.txt").read_text()
    assert all(f"| {name} |" in table for name in gpu_check.CHECKS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checks.jsonl", "log.txt", "table.txt"]  # <= 8 files back


def child(monkeypatch, capsys, tmp_path, fn) -> dict:
    """run_child on a stand-in check; its result line."""
    monkeypatch.setitem(gpu_check.CHECKS, "fake", (fn, True, (10, 10)))
    args = gpu_check.argparse.Namespace(only="fake", quick=True, cpu=True, work=str(tmp_path), out=str(tmp_path))
    assert gpu_check.run_child(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(gpu_check.RESULT)
    return json.loads(last[len(gpu_check.RESULT):])


def test_outcomes_are_recorded(monkeypatch, capsys, tmp_path):
    def oom(ctx):
        ctx.at("7B bf16 build")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 13.50 GiB")

    def crash(ctx):
        raise RuntimeError("first line\nthe last line says most")

    def unmet(ctx):
        raise gpu_check.CheckFailed("claim not met: 2.1x < 3x", {"ratio": 2.1})

    def skip(ctx):
        raise gpu_check.Skip("bitsandbytes not installed")

    r = child(monkeypatch, capsys, tmp_path, oom)
    assert r["status"] == "oom" and r["size"] == "7B bf16 build" and "13.50 GiB" in r["error"]
    r = child(monkeypatch, capsys, tmp_path, crash)
    assert r["status"] == "failed" and r["error"] == "RuntimeError: the last line says most"
    r = child(monkeypatch, capsys, tmp_path, unmet)
    assert r["status"] == "failed" and r["error"] == "claim not met: 2.1x < 3x" and r["result"] == {"ratio": 2.1}
    r = child(monkeypatch, capsys, tmp_path, skip)
    assert r["status"] == "skipped" and r["error"] == "bitsandbytes not installed"
    r = child(monkeypatch, capsys, tmp_path, lambda ctx: {"figure": 1})
    assert r == {"check": "fake", "status": "ok", "result": {"figure": 1}}


def test_table_says_what_failed_and_where():
    records = [{"versions": {"quick": False, "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0",
                             "triton": "3.6.0", "bitsandbytes": None, "fairscale": "0.4.13", "python": "3.12.3",
                             "date": "D"}},
               {"check": "memory_7b", "status": "oom", "size": "7B bf16 build", "error": "CUDA out of memory", "seconds": 3.0},
               {"check": "train_nf4_1b", "status": "skipped", "error": "bitsandbytes not installed", "seconds": 0.5}]
    table = gpu_check.format_table(records, 10.0)
    assert table.splitlines()[0].startswith("gpu_check on NVIDIA H100 80GB HBM3: torch 2.11.0+cu130, CUDA 13.0")
    assert "| memory_7b | oom | 3.0 | CUDA out of memory [at 7B bf16 build] |" in table
    assert "| train_nf4_1b | skipped | 0.5 | bitsandbytes not installed |" in table


def test_record_appends_one_row(tmp_path, monkeypatch):
    """--record DIR: a GPU run's checks.jsonl (fetched from the device) becomes one results row."""
    import common

    records = [{"versions": {"date": "2026-12-06T03:00:00Z", "host": "gpu-1", "gpu": "NVIDIA H100 80GB HBM3",
                             "torch": "2.11.0+cu130", "quick": True}},
               {"check": "int4_correct", "status": "ok", "seconds": 12.0, "result": {"cases": 144}}]
    (tmp_path / "checks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = tmp_path / "results.jsonl"
    results.write_text('{"bench": "earlier"}\n')
    monkeypatch.setattr(common, "RESULTS", results)
    assert gpu_check.main(["--record", str(tmp_path)]) == 0
    rows = [json.loads(ln) for ln in results.read_text().splitlines()]
    assert rows[0] == {"bench": "earlier"} and len(rows) == 2
    assert rows[1]["bench"] == "gpu_check" and rows[1]["device"] == "NVIDIA H100 80GB HBM3"
    assert rows[1]["torch"] == "2.11.0+cu130" and rows[1]["checks"] == records[1:]
    assert rows[1]["cmd"] == "bash bench/gpu_run.sh --quick"


FAKE_CHILD = """
import json, subprocess, sys, time
name = sys.argv[sys.argv.index("--only") + 1]
if name == "hang":  # a check stuck with a process of its own (torchrun's worker, say)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(sys.argv[sys.argv.index("--work") + 1] + "/sleeper.pid", "w").write(str(sleeper.pid))
    time.sleep(120)
if name == "crash":  # dies without a result line
    sys.exit("Fatal Python error: Segmentation fault")
print("GPU_CHECK_RESULT " + json.dumps({"check": name, "status": "ok", "result": {}}))
"""


def test_a_hang_or_a_crash_leaves_the_other_checks_running(tmp_path, monkeypatch):
    """run_all: a check past its limit is killed with its own child processes and recorded as a
    timeout, one that dies without a result as failed with its last line, and the next still runs."""
    import os
    import time

    fake = tmp_path / "fake_child.py"
    fake.write_text(FAKE_CHILD)
    monkeypatch.setattr(gpu_check, "__file__", str(fake))
    monkeypatch.setattr(gpu_check, "CHECKS", {name: (None, True, (3, 3)) for name in ("hang", "crash", "fine")})
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    assert gpu_check.main(["--out", str(out), "--cpu", "--work", str(work)]) == 1
    lines = [json.loads(ln) for ln in (out / "checks.jsonl").read_text().splitlines()]
    status = {r["check"]: r for r in lines[1:]}
    assert status["hang"]["status"] == "timeout" and status["hang"]["error"] == "timed out after 3 s"
    assert status["crash"]["status"] == "failed" and status["crash"]["error"] == "exit 1: Fatal Python error: Segmentation fault"
    assert status["fine"]["status"] == "ok"
    sleeper = int((work / "sleeper.pid").read_text())
    for _ in range(50):  # SIGKILL went to the hung check's whole process group
        try:
            os.kill(sleeper, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the hung check's child {sleeper} still runs")
