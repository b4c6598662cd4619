"""python -m quant: quantize a float LLaMA checkpoint to int4 (GPTQ layout), block by block.

    python -m quant --ckpt_dir ckpts/7B --method gptq --group_size 128 --act_order \\
        --calib data/calib.txt --out ckpts/7B_int4
"""
import argparse
import sys

from llama.errors import LlamaInputError, report_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quant", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt_dir", required=True, help="float checkpoint folder (Meta, HF or ours)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty): an HF GPTQ folder")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq",
                   help="gptq: error-compensating, needs --calib; rtn: round to nearest, no data")
    p.add_argument("--group_size", type=int, default=128,
                   help="input features sharing one scale and zero; must divide every layer's input width; -1: per channel")
    p.add_argument("--act_order", action="store_true", help="GPTQ: quantize columns by decreasing input energy (g_idx unordered)")
    p.add_argument("--sym", action="store_true", help="symmetric quantization (zero point fixed at 8)")
    p.add_argument("--calib", help="GPTQ calibration text file (plain text; windows are taken evenly across it)")
    p.add_argument("--n_samples", type=int, default=128, help="GPTQ calibration windows")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, as a fraction of the mean Hessian diagonal")
    p.add_argument("--device", default="cpu", help="where each block and the calibration activations are processed (cuda for 7B and up)")
    p.add_argument("--tokenizer_path", help="tokenizer.model or tokenizer.json (default: in ckpt_dir or its parent); copied to --out")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    return report_errors(lambda: run(a), a.out)


def run(a: argparse.Namespace) -> int:
    """Check everything, quantize, write the folder; bad input raises LlamaInputError."""
    from llama.files import check_new_output
    from llama.formats import read_model_args
    from llama.tokenizers import Tokenizer, check_vocab, find_tokenizer
    from quant.checkpoint import save_int4
    from quant.gptq import calibration_tokens, quantize_checkpoint

    if a.group_size != -1 and a.group_size < 1:
        raise LlamaInputError(f"--group_size must be positive or -1, got {a.group_size}")
    if a.method == "gptq" and not a.calib:
        raise LlamaInputError("--method gptq needs --calib FILE (or use --method rtn)")
    if a.method == "rtn" and a.act_order:
        raise LlamaInputError("--act_order is a GPTQ option (round-to-nearest has no column order)")
    if a.n_samples < 1 or a.seq_len < 2:
        raise LlamaInputError(f"--n_samples must be at least 1 and --seq_len at least 2, got {a.n_samples} and {a.seq_len}")
    args = read_model_args(a.ckpt_dir)  # a missing or malformed folder is reported before anything else
    check_new_output(a.out)
    tokenizer_path = a.tokenizer_path
    if tokenizer_path is None:
        try:
            tokenizer_path = find_tokenizer(a.ckpt_dir)
        except LlamaInputError:
            if a.method == "gptq":
                raise
    calib = None
    if tokenizer_path is not None:  # checked even where only copied along (rtn): it goes with the weights
        tokenizer = Tokenizer(tokenizer_path)
        check_vocab(args, tokenizer)
        if a.method == "gptq":
            calib = calibration_tokens(a.calib, tokenizer, a.n_samples, a.seq_len)
    model, stats = quantize_checkpoint(a.ckpt_dir, a.method, a.group_size, a.act_order, a.sym, calib, a.damp,
                                       device=a.device)
    quant = {"group_size": a.group_size, "desc_act": a.act_order, "sym": a.sym, "damp_percent": a.damp}
    out = save_int4(model, a.out, quant, tokenizer_path)
    if stats:
        worst = max(stats, key=stats.get)
        print(f"relative output error on calibration inputs: mean {sum(stats.values()) / len(stats):.2e}, "
              f"worst {stats[worst]:.2e} ({worst})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
