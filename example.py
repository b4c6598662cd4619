"""Generate text with a LLaMA checkpoint (Meta, HF or ours), on one process or tensor-parallel:

    python example.py --ckpt_dir ckpts/tiny --prompt "The red cat"
    python example.py --ckpt_dir ckpts/7B_int4 --quant int4 --dtype bfloat16 --prompt "The red cat"
    torchrun --nproc_per_node 2 example.py --ckpt_dir ckpts/7B_fs2 --tokenizer_path ckpts/tokenizer.model

A single prompt streams as it is generated; several are batched (left-padded). Only rank 0 prints.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from llama.errors import LlamaInputError

ROOT = Path(__file__).resolve().parent
DEMO_CKPT = ROOT / "ckpts" / "demo"
DEMO_ADAPTER = ROOT / "runs" / "demo" / "adapter"
DEMO_QUESTIONS = ROOT / "data" / "demo" / "eval.jsonl"
DEFAULT_PROMPTS = ["The quick robot", "What is 12 plus 30?"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", help=f"checkpoint folder (default: the demo model at {DEMO_CKPT}, if built)")
    p.add_argument("--tokenizer_path", help="tokenizer.model (sentencepiece or Llama-3 tiktoken) or tokenizer.json, kind read from the content (default: tokenizer.model, then tokenizer.json, in ckpt_dir or its parent)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat the flag for a batch")
    p.add_argument("--prompts_file", help="text file with one prompt per line (with --chat: one user message per line)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat format of the tokenizer: Llama-2 ([INST]) or Llama-3 (header tokens, <|eot_id|>)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature; 0 means greedy (default 0.6)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling: keep the smallest set of tokens with this mass (default 0.9)")
    p.add_argument("--top_k", type=int, default=None, help="keep only the k most likely tokens before top-p (default: off)")
    p.add_argument("--max_seq_len", type=int, default=512, help="prompt + generation length the KV cache holds (default 512)")
    p.add_argument("--max_gen_len", type=int, default=64, help="most tokens to generate per prompt (default 64)")
    p.add_argument("--max_batch_size", type=int, default=4, help="prompts generated together; more are run in chunks (default 4)")
    p.add_argument("--dtype", default="auto",
                   help="float32, bfloat16, float16, or auto (default): bfloat16 on a GPU and on a CPU with "
                        "AVX512-BF16 or AMX, float32 on other CPUs")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: OMP_NUM_THREADS if set, else one per core)")
    p.add_argument("--quant", choices=("none", "int4", "nf4"), default="none",
                   help="base weights: int4 (a GPTQ folder from `python -m quant`, or float weights rounded to "
                        "nearest on load), nf4 (bitsandbytes), none (as stored; default)")
    p.add_argument("--group_size", type=int, default=128,
                   help="--quant int4 on a float checkpoint: input features per scale, -1 per channel (default 128)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: this rank's GPU if any, else cpu)")
    p.add_argument("--devices", default=None,
                   help="spread layers over devices in one process: cuda:0,cuda:1 or auto (all GPUs, by free memory)")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=("default", "max"),
                   help="compile the one-token decode step with torch.compile: 15-50 s once, then ~1.4x faster "
                        "tokens on CPU; --compile max also freezes the weights into the graph so that inductor "
                        "picks its own GEMM kernels per shape: ~1 min once and a second copy of the weights, "
                        "then ~1.3x faster again on CPU")
    p.add_argument("--seed", type=int, default=1, help="sampling seed, the same on every rank (default 1)")
    p.add_argument("--adapter", help="LoRA or prompt-tuning adapter folder written by ft_main.py (its out_dir/adapter); "
                   "prompts are wrapped in the template it was trained with (default with the demo: runs/demo/adapter)")
    p.add_argument("--raw", action="store_true", help="with --adapter: send prompts as they are, without its template")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise LlamaInputError(f"{path}: prompts file not found")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    return prompts or DEFAULT_PROMPTS


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.ckpt_dir is None:
        from finetune.demo import demo_model_built

        if not demo_model_built(DEMO_CKPT):
            print(
                f"error: no --ckpt_dir given and no demo model at {DEMO_CKPT}.\n"
                "Run `python ft_main.py` first (it builds and fine-tunes the demo), or point --ckpt_dir "
                "at a LLaMA checkpoint (`python -m llama.tiny --out ckpts/tiny` makes a tiny random one).",
                file=sys.stderr,
            )
            return 2
        args.ckpt_dir = str(DEMO_CKPT)
        if args.adapter is None and (DEMO_ADAPTER / "adapter_config.json").is_file():
            args.adapter = str(DEMO_ADAPTER)
            if not args.prompt and not args.prompts_file:  # the first few held-out demo questions
                rows = DEMO_QUESTIONS.read_text().splitlines()[:4]
                args.prompt = [json.loads(row)["instruction"] for row in rows]

    from finetune.data import prompt_for
    from llama.generation import Llama  # after argument parsing, so --help is instant
    from llama.cpu_kind import auto_dtype
    from llama.threads import set_threads
    from llama.distributed import shutdown_model_parallel
    import quant  # noqa: F401  (registers the int4/NF4 formats and quantizers)

    try:
        prompts = read_prompts(args)
        threads = set_threads(args.threads)
        generator = Llama.build(
            args.ckpt_dir, args.tokenizer_path, max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size,
            dtype=args.dtype, device=args.device, seed=args.seed, devices=args.devices,
            quant=args.quant, group_size=args.group_size, compile=args.compile,
        )
        device = next(generator.model.parameters()).device
        if args.dtype == "auto":
            dtype, why = auto_dtype(device)
            cpu = f"; {threads} CPU thread{'s' if threads != 1 else ''}" if device.type == "cpu" else ""
            say(f"dtype auto: {str(dtype).removeprefix('torch.')} ({why}){cpu}")
        template = None
        if args.adapter:
            template = use_adapter(generator, args.adapter, args.max_batch_size, args.max_seq_len)
            if template in ("llama2-chat", "llama3-chat") and not args.raw:  # chat formats, not text templates:
                args.chat, template = True, None  # the prompt is wrapped once, by the chat format
            say(f"adapter {args.adapter}" + (f" (prompts wrapped in its {template} template)" if template and not args.raw else ""))
        wrap = (lambda p: p) if template is None or args.raw else (lambda p: prompt_for(template, p))  # noqa: E731
        sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_gen_len=args.max_gen_len)
        if len(prompts) == 1:  # stream the answer as it comes
            say(prompts[0], end="", flush=True)
            stream = lambda text: say(text, end="", flush=True)  # noqa: E731
            complete(generator, [wrap(p) for p in prompts], args.chat, sampling, stream)
            say("\n")
            return 0
        for start in range(0, len(prompts), args.max_batch_size):
            batch = prompts[start:start + args.max_batch_size]
            for prompt, answer in zip(batch, complete(generator, [wrap(p) for p in batch], args.chat, sampling)):
                say(f"{prompt}\n> {answer}\n\n==================================\n")
        return 0
    except LlamaInputError as e:
        prefix = f"rank {rank}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"error: {prefix}{e}", file=sys.stderr)
        return 2
    finally:
        shutdown_model_parallel()


def use_adapter(generator, adapter_dir: str, max_batch_size: int, max_seq_len: int):
    """Put a saved LoRA or prompt-tuning adapter on the generator's model. Returns the prompt
    template it was trained with, if any."""
    from finetune.adapters import load_adapter, read_adapter

    config, ours = read_adapter(adapter_dir)
    if ours.get("task") in ("cls", "regression", "rm"):
        raise LlamaInputError(f"{adapter_dir}: a {ours['task']} adapter scores text; example.py generates text")
    generator.model.clear_caches()
    generator.model = load_adapter(generator.model, adapter_dir)
    generator.model.setup_caches(max_batch_size, max_seq_len)  # prompt tuning needs room for its tokens
    return ours.get("template") if ours.get("task", "sft") == "sft" else None


def complete(generator, prompts, chat: bool, sampling: dict, on_text=None) -> list[str]:
    if chat:
        dialogs = [[{"role": "user", "content": p}] for p in prompts]
        results = generator.chat_completion(dialogs, on_text=on_text, **sampling)
        return [r["generation"]["content"] for r in results]
    return [r["generation"] for r in generator.text_completion(prompts, on_text=on_text, **sampling)]


if __name__ == "__main__":
    sys.exit(main())
