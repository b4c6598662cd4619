"""Reshard a LLaMA checkpoint for tensor parallelism, merge shards back, or cut layer-wise stages.

    python split_model.py --n 4 --ckpt_dir ckpts/7B                 # -> ckpts/7B_fs4/consolidated.0{0..3}.safetensors
    python split_model.py --n 2 --ckpt_dir ckpts/7B --format pth    # Meta's .pth shards, for Meta's own tools
    python split_model.py --n 1 --ckpt_dir ckpts/7B_fs4 --out ckpts/7B_merged
    python split_model.py --n 3 --ckpt_dir ckpts/7B --mode layers   # -> ckpts/7B_stages3/stage.0{0..2}.safetensors

Reads any checkpoint `example.py` loads (Meta consolidated.NN.pth with any shard count, HF
config.json + safetensors/bin, ours) or a stage folder this tool wrote. Writes params.json,
tokenizer.model (when the source folder has one) and a split.json manifest (source, mode, n,
format, every file's sha256 and size; stage layer ranges), last. Tensors stream through in row
blocks: memory stays far below one output file whatever the model size.
"""
import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, required=True,
                   help="number of output files: tensor-parallel shards (1 merges), or stages with --mode layers")
    p.add_argument("--ckpt_dir", required=True,
                   help="checkpoint folder to read: Meta (params.json + consolidated.NN.pth), HF (config.json + "
                        "weights), ours (params.json + consolidated.NN.safetensors), or a stage folder")
    p.add_argument("--out", help="output folder (default: CKPT_DIR_fsN, or CKPT_DIR_stagesN with --mode layers)")
    p.add_argument("--mode", choices=["tp", "layers"], default="tp",
                   help="tp (default): N shards in Meta's fairscale layout (wq wk wv w1 w3 output split on dim 0, "
                        "wo w2 and tok_embeddings on dim 1, norms replicated), for torchrun --nproc_per_node N; "
                        "layers: N stage.NN.safetensors files, contiguous whole layers balanced by bytes, embedding "
                        "in the first, norm and output in the last")
    p.add_argument("--format", choices=["safetensors", "pth"], default="safetensors",
                   help="shard file format for --mode tp: consolidated.NN.safetensors (default) or "
                        "consolidated.NN.pth (torch.save'd dicts, for Meta's own tools)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint already in the output folder, kept until the new one is complete "
                        "(without it the split refuses; re-running the very same split is a no-op)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # after parsing (llama imports torch), so --help is instant
    from llama.errors import report_errors
    from split.reshard import default_out

    out = args.out or default_out(args.ckpt_dir, args.mode, args.n)
    return report_errors(lambda: run(args, out), out)


def run(args: argparse.Namespace, out) -> int:
    """The split itself (bad input raises LlamaInputError, which `main` reports)."""
    from split.reshard import split_checkpoint

    out, manifest = split_checkpoint(args.ckpt_dir, args.n, out, args.mode, args.format, args.overwrite,
                                     progress=not args.quiet)
    if manifest is None:
        print(f"{out}/ already holds this split (split.json matches); nothing to do. Pass --overwrite to redo it.")
        return 0
    what = "stage files" if args.mode == "layers" else "shard(s)"
    total = sum(f["bytes"] for f in manifest["files"])
    print(f"wrote {args.n} {what} to {out}/ ({total / 1e9:.2f} GB), manifest {out}/split.json")
    if args.mode == "tp":
        print(f"run: torchrun --nproc_per_node {args.n} example.py --ckpt_dir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
