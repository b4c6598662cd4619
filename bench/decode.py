"""Greedy decoding of bench-58M: tokens/s of ours (eager, and with the decode step compiled:
Llama(compile=True), and with the weights frozen into the graph: compile="max") against HF `generate`, and against llama.cpp on the same weights when
`llama_cpp` and `gguf` are importable (batch 1 only).

    python bench/decode.py                       # CPU, float32: batch 1, 128 new tokens after a 16-token prompt, 5 runs
    python bench/decode.py --linear-paths        # also ours with each linear path forced (F.linear, row-block split)
    python bench/decode.py --batch 8 --prefill 256   # 8 left-padded prompts; and prefill tokens/s of 8 x 256
    python bench/decode.py --device cuda         # GPU, bf16 (llama.cpp skipped), with the GPU's ceilings

Every peer loads one random float32 checkpoint (HF folder, seed 0, written to a temp folder; llama.cpp
gets a float32 GGUF of the same tensors, written by our exporter, llama/export/gguf.py). A run is one
whole generate call, prompt included, and tokens/s = batch x new tokens / its wall time; each figure
is the median of --runs runs after one warm-up, the peers taking turns run by run. With --batch B
the prompts have lengths from --prompt down to half of it, left-padded. With --prefill P, a second
part times generate calls of one new token after B prompts of P tokens: prefill tokens/s = B x P /
their wall time.
HF is kept from stopping at its eos with min_new_tokens, ours and llama.cpp by never reading eos.
The greedy tokens of every peer are compared with ours (and, with --batch, ours batched with ours
one prompt at a time) as a check that all decode the same model.

On the CPU it also prints: the memory bandwidth (reading as many bytes as the weights a step reads,
and reading and copying 1 GiB) and each peer's tokens/s as a fraction of the bound the first sets,
batch x bandwidth / the bytes of the weights read per step; and
the path (F.linear or the row-block split, llama/cpu_linear.py) each few-row product shape took on
this machine, with both candidates' times. Appends one row to bench/results.jsonl.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from common import BENCH_58M, append_row, cpu_bandwidth, gpu_ceilings, median, timed, write_hf_checkpoint

from llama.export import export  # noqa: E402  (common puts the repo on sys.path)
from llama.formats import read_model_args  # noqa: E402
from llama.loader import load_model  # noqa: E402
from llama.generation import Llama  # noqa: E402
from llama import cpu_linear  # noqa: E402


def ours(ckpt: Path, prompts: list[list[int]], new: int, dtype, device: str, compile=False,
         linear_path: str = ""):
    """A run of our greedy generate over prompts; linear_path forces llama/cpu_linear.py's path
    (LLAMA_CPU_LINEAR) during the run."""
    args = read_model_args(ckpt)
    model = load_model(ckpt, args, dtype, device).eval()
    longest = max(map(len, prompts)) + new
    model.setup_caches(len(prompts), longest)
    # generate reads only pad_id, eos_id and stop_ids of a tokenizer; no stop id: it never stops early
    llama = Llama(model, SimpleNamespace(pad_id=0, eos_id=-1, stop_ids=frozenset()), longest, len(prompts),
                  compile=compile)

    def run(prompts=prompts, new=new):
        with linear_paths(linear_path):
            return llama.generate(prompts, new, temperature=0)
    run.model = model
    return run


@contextlib.contextmanager
def linear_paths(path: str):
    """LLAMA_CPU_LINEAR=path inside the block (nothing when path is empty)."""
    old = os.environ.get(cpu_linear.ENV)
    if path:
        os.environ[cpu_linear.ENV] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(cpu_linear.ENV, None)
        else:
            os.environ[cpu_linear.ENV] = old


def hf(ckpt: Path, prompts: list[list[int]], new: int, dtype, device: str):
    """A run of HF generate over prompts, left-padded with an attention mask as HF expects."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()

    def run(prompts=prompts, new=new):
        longest = max(map(len, prompts))
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 attention_mask=mask, pad_token_id=0)
        return out[:, longest:].tolist()
    return run


def placeholder_tokenizer(path: Path, vocab_size: int) -> Path:
    """A GGUF carries a tokenizer and the bench's checkpoint has none (its prompts are random ids,
    never text): a byte-level tokenizer.json of vocab_size ids, the 256 bytes, one merge, bos and
    eos as the last two ids, the ids between unused."""
    from llama.tokenizers.tiktoken_bpe import byte_to_unicode
    from llama.tokenizers.tiktoken_bpe import BOS, EOS, META_PAT

    vocab = {c: b for b, c in byte_to_unicode().items()}
    space = byte_to_unicode()[ord(" ")]
    vocab[space * 2] = 256
    spec = {"model": {"type": "BPE", "ignore_merges": True, "vocab": vocab, "merges": [[space, space]]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": META_PAT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
            "decoder": {"type": "ByteLevel"},
            "added_tokens": [{"id": vocab_size - 2, "content": BOS, "special": True},
                             {"id": vocab_size - 1, "content": EOS, "special": True}]}
    path.write_text(json.dumps(spec))
    return path


def llama_cpp(ckpt: Path, prompts: list[list[int]], new: int, threads: int):
    from llama_cpp import Llama as LlamaCpp

    (prompt,) = prompts  # batch 1: llama-cpp-python's generate takes one sequence
    path = ckpt / "model-f32.gguf"
    if not path.is_file():  # our exporter: the same float32 tensors under llama.cpp's names
        export(ckpt, "gguf", path, tokenizer_path=placeholder_tokenizer(ckpt / "placeholder-tokenizer.json",
                                                                         BENCH_58M["vocab_size"]),
               outtype="f32", progress=False)
    llm = LlamaCpp(str(path), n_ctx=len(prompt) + new, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run():
        out = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == new:
                return [out]
    return run


def same_prefix(a: list[list[int]], b: list[list[int]]) -> int:
    """The shortest common prefix of rows a[i] and b[i]."""
    def one(x, y):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n
    return min(one(x, y) for x, y in zip(a, b))


def step_bytes(model) -> int:
    """Bytes of the weights one decode step reads: all but the embedding table, of which it reads
    a row per sequence."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "tok_embeddings" not in name)


def take_turns(peers: dict, runs: int, count: int, sync) -> dict:
    """{peer: [tokens/s of each run]}, count tokens per run; the peers take turns run by run, so a
    slow spell of the machine hits all of them."""
    tok_s = {name: [] for name in peers}
    for _ in range(runs):
        for name, run in peers.items():
            time.sleep(0.1)  # the last peer's idle threads stop spinning (llama.cpp's, OpenMP's) before this one runs
            tok_s[name].append(round(count / timed(run, 1, warmup=0, sync=sync)[0], 2))
    return tok_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights and activations of ours and HF (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--runs", type=int, default=5, help="timed generate calls per peer; the median counts (default 5)")
    p.add_argument("--new", type=int, default=128, help="tokens generated per call (default 128)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens, of the longest prompt with --batch (default 16)")
    p.add_argument("--batch", type=int, default=1,
                   help="prompts generated together, left-padded (default 1; above 1 llama.cpp is skipped)")
    p.add_argument("--prefill", type=int, default=0,
                   help="also time prefill: one new token after --batch prompts of this many tokens (default 0: skip)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even if it is importable")
    p.add_argument("--no-compile", action="store_true",
                   help="skip 'ours compiled' (Llama(compile=True): the decode step through torch.compile, "
                        "compiled during the warm-up, 20-50 s) and 'ours compiled max' (compile=\"max\": the "
                        "weights frozen into the graph, inductor's GEMM kernels timed per shape, ~1 min)")
    p.add_argument("--linear-paths", action="store_true",
                   help="also run ours (eager) with each linear path forced: LLAMA_CPU_LINEAR=plain (F.linear "
                        "everywhere) and =split (the row-block split wherever it applies)")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device == "cuda" else "float32"))
    cpu = a.device == "cpu"
    sync = torch.cuda.synchronize if not cpu else (lambda: None)
    g = torch.Generator().manual_seed(1)
    lengths = [a.prompt - (i * (a.prompt // 2)) // max(1, a.batch - 1) for i in range(a.batch)]  # prompt .. prompt/2
    prompts = [torch.randint(3, BENCH_58M["vocab_size"], (n,), generator=g).tolist() for n in lengths]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_hf_checkpoint(Path(tmp))
        # each peer warms up (ours: calibrates its linear paths; compiled: compiles) as soon as it
        # is built, before the next exists: no other peer's threads (llama.cpp's) are there to disturb it
        peers, tokens = {}, {}
        builders = {"ours": lambda: ours(ckpt, prompts, a.new, dtype, a.device)}
        if not a.no_compile:
            builders["ours compiled"] = lambda: ours(ckpt, prompts, a.new, dtype, a.device, compile=True)
            builders["ours compiled max"] = lambda: ours(ckpt, prompts, a.new, dtype, a.device, compile="max")
        if a.linear_paths:
            builders["ours F.linear"] = lambda: ours(ckpt, prompts, a.new, dtype, a.device, linear_path="plain")
            builders["ours split"] = lambda: ours(ckpt, prompts, a.new, dtype, a.device, linear_path="split")
        builders["hf"] = lambda: hf(ckpt, prompts, a.new, dtype, a.device)
        if cpu and a.batch == 1 and not a.no_llama_cpp:
            if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf"):
                builders["llama.cpp f32"] = lambda: llama_cpp(ckpt, prompts, a.new, torch.get_num_threads())
            else:
                print("llama.cpp: skipped (pip install llama-cpp-python gguf to include it)")
        for name, build in builders.items():
            peers[name] = build()
            tokens[name] = peers[name]()
        alone = [peers["ours"]([p])[0] for p in prompts] if a.batch > 1 else None
        tok_s = take_turns(peers, a.runs, a.batch * a.new, sync)
        weight_bytes = step_bytes(peers["ours"].model)
        # the bound: reading the weights' bytes once, from wherever they sit (a cache as large as
        # the model holds them); DRAM's own rate from 1 GiB beside it
        bandwidth = {"weights": cpu_bandwidth(weight_bytes), "1GiB": cpu_bandwidth()} if cpu else None

        prefill = None
        if a.prefill:
            long_prompts = torch.randint(3, BENCH_58M["vocab_size"], (a.batch, a.prefill), generator=g).tolist()
            first = {"ours": ours(ckpt, long_prompts, 1, dtype, a.device), "hf": hf(ckpt, long_prompts, 1, dtype, a.device)}
            for run in first.values():
                run()  # warm-up
            prefill = take_turns(first, a.runs, a.batch * a.prefill, sync)

    result = {"workload": "bench-58M", "shape": BENCH_58M, "dtype": str(dtype)[6:], "batch": a.batch,
              "prompt_tokens": lengths, "new_tokens": a.new, "runs": a.runs, "tok_s": tok_s,
              "tok_s_median": {k: round(median(v), 2) for k, v in tok_s.items()},
              "greedy_tokens_same_as_ours": {k: same_prefix(tokens["ours"], v) for k, v in tokens.items() if k != "ours"}}
    if alone is not None:
        result["ours_batched_same_as_ours_alone"] = same_prefix(tokens["ours"], alone)
    med = result["tok_s_median"]
    ours_names = [k for k in med if k.startswith("ours")]
    result["ratios"] = {f"{o}/{k}": round(med[o] / v, 2) for o in ours_names for k, v in med.items() if k not in ours_names}
    if cpu:
        result["bandwidth"] = bandwidth
        result["weight_bytes_per_step"] = weight_bytes
        bound = a.batch * bandwidth["weights"]["read_gb_s"] * 1e9 / weight_bytes
        result["bound_tok_s"] = round(bound, 1)
        result["fraction_of_bound"] = {k: round(v / bound, 3) for k, v in med.items()}
        result["linear_paths"] = [{"rows": r, "out": o, "in": i, "threads": t, "path": c.path, "split_us": c.split_us,
                                   "f_linear_us": c.plain_us} for (r, o, i, t), c in cpu_linear.choices().items()]
    if prefill:
        result["prefill"] = {"batch": a.batch, "tokens": a.prefill, "tok_s": prefill,
                             "tok_s_median": {k: round(median(v), 1) for k, v in prefill.items()}}
        result["prefill"]["ratio"] = round(result["prefill"]["tok_s_median"]["ours"] / result["prefill"]["tok_s_median"]["hf"], 2)
    if not cpu:
        result["ceilings"] = gpu_ceilings()
    print(f"bench-58M greedy decode, batch {a.batch}, {a.new} tokens after {lengths[-1]}-{lengths[0]}, "
          f"{result['dtype']}, {torch.get_num_threads()} threads, median of {a.runs}")
    for name, v in med.items():
        same = "" if name == "ours" else f"   same greedy prefix {result['greedy_tokens_same_as_ours'][name]}/{a.new}"
        ratios = "".join(f"   {o}/{name} {med[o] / v:.2f}x" for o in ours_names if name not in ours_names)
        frac = f"   {result['fraction_of_bound'][name]:.0%} of the bound" if cpu else ""
        print(f"  {name:<14} {v:8.1f} tok/s{frac}{ratios}{same}")
    if alone is not None:
        print(f"  ours batched vs ours one prompt at a time: same greedy prefix {result['ours_batched_same_as_ours_alone']}/{a.new}")
    if cpu:
        print(f"  memory: reading {weight_bytes / 1e6:.0f} MB (the weights a step reads) {bandwidth['weights']['read_gb_s']} "
              f"GB/s: bound {result['bound_tok_s']} tok/s; 1 GiB: read {bandwidth['1GiB']['read_gb_s']} GB/s, "
              f"copy {bandwidth['1GiB']['copy_gb_s']} GB/s")
        for row in result["linear_paths"]:
            print(f"  linear rows {row['rows']} x [{row['out']}, {row['in']}], {row['threads']} threads: {row['path']:<5} "
                  f"(split {row['split_us']} us, F.linear {row['f_linear_us']} us)")
    if prefill:
        pm = result["prefill"]["tok_s_median"]
        print(f"  prefill {a.batch} x {a.prefill}: ours {pm['ours']:.0f} tok/s, hf {pm['hf']:.0f} tok/s, "
              f"ratio {result['prefill']['ratio']:.2f}x")
    if "ceilings" in result:
        print("  ceilings:", result["ceilings"])
    append_row("decode", result, "bench/decode.py", a.device)


if __name__ == "__main__":
    main()
