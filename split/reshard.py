"""Tensor-parallel resharding: any checkpoint -> N shards in Meta's fairscale layout.

The split rule is the core's one layer table, `llama.layers` (column-parallel wq wk wv w1 w3
output on dim 0, row-parallel wo w2 on dim 1, tok_embeddings on dim 1, norms replicated), the
same table the loader merges with and tensor-parallel ranks load by. Shard j of a split tensor is
`torch.chunk(t, n, dim)[j]`; N = 1 merges. M -> N works for any M and N the shapes allow.

`split_checkpoint` is the one entry point, for both modes (`--mode layers`: split/stages.py).
"""
from pathlib import Path
from typing import Optional

from llama.errors import LlamaInputError
from llama.formats import Checkpoint
from llama.layers import WEIGHTS, size_name, split_dim
from split.output import OutFile, Piece, check_output, write_split
from split.source import file_records, open_source

MODES = ("tp", "layers")
FORMATS = ("safetensors", "pth")


def split_dims(args) -> dict:
    """Recorded in split.json: the split dim of each split weight, by its key without the layer prefix."""
    return {w.meta.removeprefix("layers.{}."): w.tp_dim(args) for w in WEIGHTS if w.tp_dim(args) is not None}


def check_divisible(src: Checkpoint, n: int) -> None:
    """Every split dim, and the heads (a rank holds whole heads), must divide by n."""
    args = src.args
    for what, size in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads)):
        if size % n:
            raise LlamaInputError(f"--n {n}: {what} {size} does not divide by {n} (each rank needs whole heads)")
    for key, t in src.tensors.items():
        dim = split_dim(key, args)
        if dim is not None and t.shape[dim] % n:
            what = size_name(key, dim)
            if "layers." not in key:  # the embedding and output: say which side of the table it is
                what += f" ({key} {'rows' if dim == 0 else 'columns'})"
            raise LlamaInputError(f"--n {n}: {what} {t.shape[dim]} does not divide by {n} (tensor {key}, shape {t.shape})")


def plan_tp(src: Checkpoint, n: int, fmt: str) -> list[OutFile]:
    """consolidated.00 .. consolidated.{n-1}: the chunks of every split tensor, every norm whole."""
    check_divisible(src, n)
    ext = "safetensors" if fmt == "safetensors" else "pth"
    files = [OutFile(f"consolidated.{j:02d}.{ext}") for j in range(n)]
    for key, t in src.tensors.items():
        dim = split_dim(key, src.args) if n > 1 else None
        for j, f in enumerate(files):
            if dim is None:
                f.pieces.append(Piece(key, t))
            else:
                size = t.shape[dim] // n
                f.pieces.append(Piece(key, t, dim, j * size, (j + 1) * size))
    return files


def default_out(ckpt_dir, mode: str, n: int) -> Path:
    d = Path(ckpt_dir)
    return d.parent / f"{d.name}_{'fs' if mode == 'tp' else 'stages'}{n}"


def split_checkpoint(ckpt_dir, n: int, out=None, mode: str = "tp", fmt: str = "safetensors",
                     overwrite: bool = False, progress: bool = True) -> tuple[Path, Optional[dict]]:
    """Split `ckpt_dir` into n tensor-parallel shards (mode 'tp') or n layer-wise stage files
    (mode 'layers'). Every check runs before anything is written. Returns the output folder and
    the manifest written (None when the folder already held exactly this split)."""
    from split.stages import plan_layers  # stages builds on this module's planning

    if mode not in MODES:
        raise LlamaInputError(f"--mode {mode!r}: choose from {', '.join(MODES)}")
    if fmt not in FORMATS:
        raise LlamaInputError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LlamaInputError(f"--n must be a positive integer, got {n!r}")
    if mode == "layers" and fmt != "safetensors":
        raise LlamaInputError("--mode layers writes stage.NN.safetensors files only; drop --format pth")
    src = open_source(ckpt_dir)
    try:
        if mode == "tp":
            files, extra = plan_tp(src, n, fmt), {"split_dims": split_dims(src.args)}
        else:
            files, extra = plan_layers(src, n)
        out = Path(out) if out is not None else default_out(ckpt_dir, mode, n)
        request = {
            "tool": "split_model.py", "source": str(src.dir.resolve()), "source_format": src.format,
            "source_files": file_records(src), "mode": mode, "n": n, "format": fmt,
        }
        if not check_output(out, src, request, files, overwrite):
            return out, None
        return out, write_split(src, files, out, fmt, request, extra, overwrite, progress)
    finally:
        src.close()
