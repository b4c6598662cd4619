"""python -m llama.export: write a checkpoint (with a LoRA adapter folded in) as an HF folder, a
GGUF file for llama.cpp, or Meta's .pth layout.

    python -m llama.export --ckpt_dir ckpts/7B --format hf --out exports/7B-hf
    python -m llama.export --ckpt_dir ckpts/8B --adapter runs/x/adapter --format gguf --out x.gguf --outtype q8_0
"""
import argparse
import sys

from llama.errors import report_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", required=True,
                   help="any checkpoint we read: Meta .pth (any shard count), ours, HF, or a GPTQ int4 folder (dequantized)")
    p.add_argument("--format", required=True, choices=("hf", "gguf", "pth"),
                   help="hf: a transformers folder; gguf: one llama.cpp file; pth: Meta's consolidated.00.pth + params.json")
    p.add_argument("--out", required=True, help="the folder (hf, pth) or file (gguf) to write; must not exist yet")
    p.add_argument("--adapter", help="a LoRA adapter folder (PEFT format) to fold into the weights")
    p.add_argument("--tokenizer_path", help="tokenizer.model or tokenizer.json (default: beside the weights, or in "
                                            "the parent folder)")
    p.add_argument("--outtype", default="auto", choices=("auto", "f32", "f16", "bf16", "q8_0", "q4_0"),
                   help="tensor type: auto keeps the stored float type (gguf: f16, or f32 for a float32 model); "
                        "q8_0 and q4_0 are gguf only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    from llama.export import export

    def run() -> int:
        out = export(a.ckpt_dir, a.format, a.out, a.adapter, a.tokenizer_path, a.outtype, progress=not a.quiet)
        print(f"wrote {out}")
        return 0

    return report_errors(run, a.out)


if __name__ == "__main__":
    sys.exit(main())
