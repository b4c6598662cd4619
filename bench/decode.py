"""Batch-1 greedy decoding of bench-58M: tokens/s of ours (eager, and with the decode step
compiled: Llama(compile=True)) against HF `generate`, and against llama.cpp on the same weights
when `llama_cpp` and `gguf` are importable.

    python bench/decode.py                       # CPU, float32: 128 new tokens after a 16-token prompt, 5 runs
    python bench/decode.py --device cuda         # GPU, bf16 (llama.cpp skipped), with the GPU's ceilings
    python bench/decode.py --runs 9 --new 256    # more runs, longer generations

Every peer loads one random float32 checkpoint (HF folder, seed 0, written to a temp folder; llama.cpp
gets a float32 GGUF of the same tensors, written by our exporter, llama/export/gguf.py). A run is one
whole generate call, prompt included, and tokens/s = new tokens / its wall time; each figure is the
median of --runs runs after one warm-up, the peers taking turns run by run.
HF is kept from stopping at its eos with min_new_tokens, ours and llama.cpp by never reading eos.
The greedy tokens of ours and HF are compared as a check that both decode the same model. Appends
one row to bench/results.jsonl.
"""
import argparse
import importlib.util
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from common import BENCH_58M, append_row, gpu_ceilings, median, timed, write_hf_checkpoint

from llama.export import export  # noqa: E402  (common puts the repo on sys.path)
from llama.formats import read_model_args  # noqa: E402
from llama.loader import load_model  # noqa: E402
from llama.generation import Llama  # noqa: E402


def ours(ckpt: Path, prompt: list[int], new: int, dtype, device: str, compile: bool = False):
    args = read_model_args(ckpt)
    model = load_model(ckpt, args, dtype, device).eval()
    model.setup_caches(1, len(prompt) + new)
    # generate reads only pad_id, eos_id and stop_ids of a tokenizer; no stop id: it never stops early
    llama = Llama(model, SimpleNamespace(pad_id=0, eos_id=-1, stop_ids=frozenset()), len(prompt) + new, 1,
                  compile=compile)
    return lambda: llama.generate([prompt], new, temperature=0)[0]


def hf(ckpt: Path, prompt: list[int], new: int, dtype, device: str):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    ids = torch.tensor([prompt], device=device)

    def run():
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 attention_mask=torch.ones_like(ids), pad_token_id=0)
        return out[0, len(prompt):].tolist()
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


def llama_cpp(ckpt: Path, prompt: list[int], new: int, threads: int):
    from llama_cpp import Llama as LlamaCpp

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
                return out
    return run


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights and activations of ours and HF (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--runs", type=int, default=5, help="timed generate calls per peer; the median counts (default 5)")
    p.add_argument("--new", type=int, default=128, help="tokens generated per call (default 128)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even if it is importable")
    p.add_argument("--no-compile", action="store_true",
                   help="skip 'ours compiled' (Llama(compile=True): the decode step through torch.compile, "
                        "compiled during the warm-up, 20-50 s)")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device == "cuda" else "float32"))
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    prompt = torch.randint(3, BENCH_58M["vocab_size"], (a.prompt,), generator=torch.Generator().manual_seed(1)).tolist()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_hf_checkpoint(Path(tmp))
        peers = {"ours": ours(ckpt, prompt, a.new, dtype, a.device)}
        if not a.no_compile:
            peers["ours compiled"] = ours(ckpt, prompt, a.new, dtype, a.device, compile=True)
        peers["hf"] = hf(ckpt, prompt, a.new, dtype, a.device)
        if a.device == "cpu" and not a.no_llama_cpp:
            if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf"):
                peers["llama.cpp f32"] = llama_cpp(ckpt, prompt, a.new, torch.get_num_threads())
            else:
                print("llama.cpp: skipped (pip install llama-cpp-python gguf to include it)")
        tokens = {name: run() for name, run in peers.items()}  # also each peer's warm-up
        tok_s = {name: [] for name in peers}
        for _ in range(a.runs):  # peers take turns, so a slow spell of the machine hits all of them
            for name, run in peers.items():
                tok_s[name].append(round(a.new / timed(run, 1, warmup=0, sync=sync)[0], 2))

    result = {"workload": "bench-58M", "shape": BENCH_58M, "dtype": str(dtype)[6:], "prompt_tokens": a.prompt,
              "new_tokens": a.new, "runs": a.runs, "tok_s": tok_s,
              "tok_s_median": {k: round(median(v), 2) for k, v in tok_s.items()},
              "greedy_tokens_same_as_ours": {k: same_prefix(tokens["ours"], v) for k, v in tokens.items() if k != "ours"}}
    med = result["tok_s_median"]
    ours_names = [k for k in med if k.startswith("ours")]
    result["ratios"] = {f"{o}/{k}": round(med[o] / v, 2) for o in ours_names for k, v in med.items() if k not in ours_names}
    if a.device == "cuda":
        result["ceilings"] = gpu_ceilings()
    print(f"bench-58M batch-1 greedy decode, {a.new} tokens after {a.prompt}, {result['dtype']}, "
          f"{torch.get_num_threads()} threads, median of {a.runs}")
    for name, v in med.items():
        same = "" if name == "ours" else f"   same greedy prefix {result['greedy_tokens_same_as_ours'][name]}/{a.new}"
        ratios = "".join(f"   {o}/{name} {med[o] / v:.2f}x" for o in ours_names if name not in ours_names)
        print(f"  {name:<14} {v:8.1f} tok/s{ratios}{same}")
    if "ceilings" in result:
        print("  ceilings:", result["ceilings"])
    append_row("decode", result, "bench/decode.py", a.device)


if __name__ == "__main__":
    main()
