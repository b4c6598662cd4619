"""Int4 dequant-matmul against dense matmul in the same run, and the memory of an int4 7B.

    python bench/int4_matmul.py                  # CPU: int4 (bf16 activations) vs float32 dense, M = 1, 7, 64, 256
    python bench/int4_matmul.py --device cuda    # GPU: int4 vs bf16 cuBLAS, M = 1, 16, 256, 1024, plus ceilings
    python bench/int4_matmul.py --memory         # peak memory of a 7B-shaped int4 model vs its bf16 size

Weights are random, in the GPTQ layout with group size 128 (shapes [out, in] = 4096x4096 and
11008x4096, LLaMA-7B's attention and MLP). Each figure is the median of --runs timed calls after
warm-up; the ratio is dense time / int4 time (above 1: int4 is faster). Appends one JSON row per
mode to bench/results.jsonl.
"""
import argparse
import json
from typing import Optional

import torch

from common import append_row, gpu_ceilings, median, peak_rss_bytes, run_fresh  # puts the repo on sys.path
from common import timed as common_timed
from quant.kernels import choose_path, int4_matmul
from quant.pack import group_index, pack

SHAPES = [(4096, 4096), (11008, 4096)]  # (out, in)


def random_int4(out_features: int, in_features: int, group_size: int = 128, device="cpu"):
    groups = in_features // group_size
    w = pack(torch.randint(0, 16, (out_features, in_features)), torch.randint(1, 16, (groups, out_features)),
             torch.rand(groups, out_features) * 0.01 + 0.001, group_index(in_features, group_size))
    return type(w)(*(t.to(device) for t in w.tensors().values()))


def timed(fn, runs: int, sync) -> float:
    """Median seconds of fn() over `runs` calls after 3 warm-up calls."""
    return median(common_timed(fn, runs, warmup=3, sync=sync))


def bench_speed(device: str, runs: int) -> dict:
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ms = [1, 16, 256, 1024] if cuda else [1, 7, 64, 256]
    act = torch.bfloat16  # the int4 CPU op is fast with bf16 activations only; on GPU bf16 is the norm
    dense_dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    torch.manual_seed(0)
    for out_features, in_features in SHAPES:
        w = random_int4(out_features, in_features, device=device)
        dense = torch.randn(out_features, in_features, device=device, dtype=dense_dtype)
        for m in ms:
            x = torch.randn(m, in_features, device=device)
            xa, xd = x.to(act), x.to(dense_dtype)
            t_int4 = timed(lambda: int4_matmul(xa, w), runs, sync)
            t_dense = timed(lambda: xd @ dense.t(), runs, sync)
            row = {"out": out_features, "in": in_features, "m": m, "path": choose_path(xa, w),
                   "int4_ms": round(t_int4 * 1e3, 3), f"dense_{str(dense_dtype)[6:]}_ms": round(t_dense * 1e3, 3),
                   "ratio": round(t_dense / t_int4, 2)}
            if not cuda and m == 1:  # the float32-activation int4 path, for the record
                row["int4_fp32_act_ms"] = round(timed(lambda: int4_matmul(x, w), runs, sync) * 1e3, 3)
            rows.append(row)
            print(f"{out_features:>6}x{in_features:<5} M={m:<5} {row['path']:<9} int4 {row['int4_ms']:8.3f} ms   "
                  f"dense {str(dense_dtype)[6:]} {t_dense * 1e3:8.3f} ms   dense/int4 {row['ratio']:.2f}x")
    result = {"rows": rows}
    if cuda:
        result["ceilings"] = gpu_ceilings()
        print("ceilings:", result["ceilings"])
    return result


def random_int4_linear(out_features: int, in_features: int, device, group_size: int = 128):
    """An Int4Linear [out, in] of random words (group 128), drawn straight into its buffers on
    `device`: no float or int64 temporaries, so a 7B's worth or an 8192x8192 layer builds in
    moments on a GPU."""
    from quant.linear import Int4Linear

    layer = Int4Linear(in_features, out_features, in_features // group_size, group_size, device=device)
    for t in (layer.qweight, layer.qzeros):
        t.random_(-2 ** 31, 2 ** 31 - 1)
    layer.scales.uniform_(0.001, 0.01)
    layer.g_idx.copy_(group_index(in_features, group_size))
    return layer


def build_int4_7b(device: str, shape: Optional[dict] = None):
    """LLaMA-7B shapes (or `shape`) with Int4Linear blocks (random int4 weights, group 128) and
    bf16 embeddings, norms and output, built without ever holding a float copy of a block."""
    from llama.config import ModelArgs
    from llama.model import Transformer
    from llama.loader import block_linears, replace_module
    from quant.linear import Int4Linear

    args = ModelArgs(**(shape or dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)))
    with torch.device("meta"):
        model = Transformer(args)

    for block in model.layers:
        for name, linear in block_linears(block).items():
            replace_module(block, name, random_int4_linear(*linear.weight.shape, device))
    for m in model.modules():  # what is left on meta: embeddings, norms, output
        if any(p.is_meta for p in m.parameters(recurse=False)):
            m.to_empty(device=device, recurse=False)
    model.to(torch.bfloat16)  # before touching the float32 pages, so they never count
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # touch every page so it counts
    n_params = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Int4Linear))
    n_params += sum(p.numel() for p in model.parameters())
    return model, n_params


def memory_child(device: str) -> None:
    """Runs in a fresh process: prints peak memory of building (and running one bf16 decode step
    of) the int4 7B, minus the process's memory before building. A tiny model is built and run
    first, so that the modules it imports and the library code it pages in (~0.15 GB, not the
    model's) are in the baseline."""
    cuda = device == "cuda"

    def decode_step(model, seq_len: int) -> None:
        with torch.inference_mode():
            model.setup_caches(1, seq_len)
            model(torch.zeros(1, 1, dtype=torch.long, device=device))

    tiny, _ = build_int4_7b(device, dict(dim=256, n_layers=1, n_heads=2, vocab_size=256))
    decode_step(tiny, 8)
    del tiny
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = peak_rss_bytes()

    def peak() -> int:
        return torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes() - before

    model, n_params = build_int4_7b(device)
    built = peak()
    tensor_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    decode_step(model, 64)
    print(json.dumps({"n_params": n_params, "bf16_bytes": 2 * n_params, "tensor_bytes": tensor_bytes, "built_bytes": built,
                      "after_decode_step_bytes": peak()}))


def bench_memory(device: str) -> dict:
    r = run_fresh(["bench/int4_matmul.py", "--memory-child", "--device", device])
    r["tensors_over_bf16"] = round(r["tensor_bytes"] / r["bf16_bytes"], 3)
    r["built_over_bf16"] = round(r["built_bytes"] / r["bf16_bytes"], 3)
    r["after_decode_over_bf16"] = round(r["after_decode_step_bytes"] / r["bf16_bytes"], 3)
    gib = 2 ** 30
    print(f"7B-shaped: {r['n_params'] / 1e9:.2f} B params, bf16 size {r['bf16_bytes'] / gib:.2f} GiB; int4 tensors "
          f"{r['tensor_bytes'] / gib:.2f} GiB ({r['tensors_over_bf16']:.3f}x); peak memory building: "
          f"{r['built_bytes'] / gib:.2f} GiB ({r['built_over_bf16']:.3f}x), after one decode step "
          f"{r['after_decode_step_bytes'] / gib:.2f} GiB ({r['after_decode_over_bf16']:.3f}x)")
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--runs", type=int, default=7, help="timed calls per figure; the median is reported (default 7)")
    p.add_argument("--memory", action="store_true", help="measure the int4 7B's peak memory instead of matmul speed")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_child:
        return memory_child(a.device)
    result = bench_memory(a.device) if a.memory else bench_speed(a.device, a.runs)
    append_row("int4_memory" if a.memory else "int4_matmul", {"runs": a.runs, **result}, "bench/int4_matmul.py", a.device)


if __name__ == "__main__":
    main()
