"""Loading a checkpoint costs about its size in resident memory, not a multiple of it.

For each format (ours: safetensors, meta: .pth, hf: safetensors with HF names and permuted q/k)
a ~150 MB float32 checkpoint is written, then a fresh process (see bench/load_memory.py) loads it
with `load_model`, reads every weight once, and reports its peak RSS above the post-import
baseline. The three processes run side by side; each measures only itself.
"""
import importlib.util

import pytest

from tests.utils import ROOT

SIZE_MB = 150
MAX_RATIO = 1.3
FORMATS = ("ours", "meta", "hf")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_load_memory", ROOT / "bench" / "load_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def measurements(tmp_path_factory) -> dict:
    bench = _bench()
    root = tmp_path_factory.mktemp("load_memory")
    ckpts = {fmt: root / fmt for fmt in FORMATS}
    for fmt, d in ckpts.items():
        bench.write_checkpoint(d, SIZE_MB, fmt)
    procs = {fmt: bench.start_measurement(d) for fmt, d in ckpts.items()}
    return {fmt: bench.finish_measurement(procs[fmt], ckpts[fmt], timeout=300) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_peak_rss_of_loading_is_about_the_size_on_disk(measurements, fmt):
    m = measurements[fmt]
    size_mb = m["disk_bytes"] / 2**20
    assert abs(size_mb - SIZE_MB) < 0.1 * SIZE_MB, size_mb
    # the weights are the file (float32 in, float32 out): the ratio is against what was loaded
    assert abs(4 * m["n_params"] - m["disk_bytes"]) < 0.01 * m["disk_bytes"]
    detail = f"{fmt}: {m}"
    # loaded and every weight read once: at least the weights are resident (the measurement sees
    # them), and not much more (no second copy, no dtype round trip, no leaked temporaries)
    assert 0.9 < m["peak_rss_ratio"] < MAX_RATIO, detail
    assert m["load_only_ratio"] < MAX_RATIO, detail
    if fmt != "meta":  # read into memory by load_model itself; meta .pth is mmapped, paged in on use
        assert m["load_only_ratio"] > 0.9, detail
