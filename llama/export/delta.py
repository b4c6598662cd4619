"""Weight deltas, the form Vicuna was released in (FastChat's apply_delta / make_delta): the
released weights minus the base weights, tensor by tensor. `apply` adds a delta to its base,
`make` subtracts a base from a fine-tuned model; either result is written by any exporter, one
tensor of each input in memory at a time. A delta with a larger vocabulary (tokens added in
fine-tuning) extends the base's embedding and output rows with zeros.

    python -m llama.export.delta apply --base ckpts/llama-7b --delta vicuna-7b-delta --out vicuna-7b
    python -m llama.export.delta make --base ckpts/llama-7b --target runs/x/model --out x-delta
"""
import argparse
import sys
from pathlib import Path

import torch

from llama.errors import LlamaInputError, report_errors
from llama.export import EXPORTERS, check_request, write_source
from llama.export.source import ExportSource, open_checked, open_tokenizer
from llama.formats import Checkpoint

# rows a delta may add to its base (a vocabulary extended in fine-tuning)
VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")


class DeltaSource(ExportSource):
    """`ckpt` (the delta to apply, or the target to make a delta of: its config, keys and dtype
    are the output's) plus `sign` times `base`, each tensor summed in float32."""

    def __init__(self, ckpt: Checkpoint, base: Checkpoint, sign: int, tokenizer):
        super().__init__(ckpt, tokenizer, None)
        self.base, self.sign = base, sign

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        out = self.ckpt.read(key).float()
        base = self.base.read(key).float()
        out[: base.shape[0]] += self.sign * base  # rows past the base's vocabulary: the base's are zero
        return out.to(dtype)

    def close(self) -> None:
        self.ckpt.close()
        self.base.close()


def open_delta_source(base_dir, other_dir, sign: int, tokenizer_path=None) -> DeltaSource:
    """Open and check both checkpoints before anything is written: the same tensors, the same
    shapes but for added vocabulary rows."""
    base, other = open_checked(Path(base_dir)), open_checked(Path(other_dir))
    try:
        what = "delta" if sign > 0 else "target"
        extra, missing = other.tensors.keys() - base.tensors.keys(), base.tensors.keys() - other.tensors.keys()
        if extra:
            raise LlamaInputError(f"{other_dir}: the {what} has {min(extra)}, which the base {base_dir} lacks "
                                  f"({other.args.n_layers} layers against {base.args.n_layers})")
        if missing:
            raise LlamaInputError(f"{other_dir}: the {what} lacks {min(missing)}, which the base {base_dir} has")
        for key, t in other.tensors.items():
            b = base.shape(key)
            grown = key in VOCAB_ROWS and b[1:] == t.shape[1:] and b[0] <= t.shape[0]
            if b != t.shape and not grown:
                raise LlamaInputError(f"{other_dir}: {key} is {tuple(t.shape)} in the {what} but {tuple(b)} in the "
                                      f"base {base_dir}: a {what} of another base model?")
        tokenizer = open_tokenizer(other, tokenizer_path) or (open_tokenizer(base) if tokenizer_path is None and
                                                               base.args.vocab_size == other.args.vocab_size else None)
    except BaseException:
        base.close()
        other.close()
        raise
    return DeltaSource(other, base, sign, tokenizer)


def apply_delta(base_dir, delta_dir, out, fmt: str = "hf", outtype: str = "auto", tokenizer_path=None,
                progress: bool = True) -> Path:
    """base + delta, written as `fmt` at `out` (the delta's config and dtype)."""
    check_request(fmt, out, outtype)
    return write_source(open_delta_source(base_dir, delta_dir, +1, tokenizer_path), fmt, out, outtype, progress)


def make_delta(base_dir, target_dir, out, fmt: str = "hf", outtype: str = "auto", tokenizer_path=None,
               progress: bool = True) -> Path:
    """target - base, written as `fmt` at `out` (the target's config and dtype)."""
    check_request(fmt, out, outtype)
    return write_source(open_delta_source(base_dir, target_dir, -1, tokenizer_path), fmt, out, outtype, progress)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama.export.delta", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, other, summary, text in (
            ("apply", "--delta", "base + delta", "the delta folder to add to the base"),
            ("make", "--target", "target - base", "the fine-tuned model to subtract the base from")):
        c = sub.add_parser(name, help=summary)
        c.add_argument("--base", required=True, help="the base checkpoint (any format we read)")
        c.add_argument(other, required=True, dest="other", help=f"{text} (any format we read)")
        c.add_argument("--out", required=True, help="the folder (hf, pth) or file (gguf) to write; must not exist yet")
        c.add_argument("--format", default="hf", choices=sorted(EXPORTERS), help="output format (default hf)")
        c.add_argument("--outtype", default="auto", help="tensor type (default: the delta's or target's own)")
        c.add_argument("--tokenizer_path", help="tokenizer to write beside the result (default: the delta's or "
                                                "target's, else the base's when the vocabularies agree)")
        c.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    run = apply_delta if a.command == "apply" else make_delta

    def body() -> int:
        out = run(a.base, a.other, a.out, a.format, a.outtype, a.tokenizer_path, progress=not a.quiet)
        print(f"wrote {out}")
        return 0

    return report_errors(body, a.out)


if __name__ == "__main__":
    sys.exit(main())
