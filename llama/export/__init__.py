"""Writers of the formats people deploy with, from any checkpoint we read (optionally with a LoRA
adapter folded in), one tensor at a time: `hf` (a transformers folder), `pth` (Meta's layout,
a params.json Meta's own code accepts) and `gguf` (llama.cpp). A writer is one file registering
`write(source, out, outtype, progress)` under its format name.

    python -m llama.export --ckpt_dir DIR --format hf|gguf|pth --out PATH [--adapter DIR]
"""
from pathlib import Path
from typing import Callable

from llama.errors import LlamaInputError
from llama.export.source import ExportSource, open_export_source
from llama.files import check_new_output

# format name -> (write(source, out, outtype, progress) -> Path, the outtypes it takes)
EXPORTERS: dict[str, tuple[Callable, tuple]] = {}


def register_exporter(name: str, write: Callable, outtypes: tuple) -> None:
    EXPORTERS[name] = (write, outtypes)


def export(ckpt_dir, fmt: str, out, adapter=None, tokenizer_path=None, outtype: str = "auto",
           progress: bool = True) -> Path:
    """Write the checkpoint (with the adapter folded in) as `fmt` at `out`. Every check runs
    before anything is written; the output appears whole (written under a temporary name)."""
    check_request(fmt, out, outtype)
    return write_source(open_export_source(ckpt_dir, adapter, tokenizer_path), fmt, out, outtype, progress)


def check_request(fmt: str, out, outtype: str) -> None:
    """A known format, an outtype it writes, and an output path that holds nothing yet."""
    if fmt not in EXPORTERS:
        raise LlamaInputError(f"--format {fmt!r}: choose from {', '.join(EXPORTERS)}")
    if outtype not in EXPORTERS[fmt][1]:
        raise LlamaInputError(f"--outtype {outtype!r} is not a {fmt} type: choose from {', '.join(EXPORTERS[fmt][1])}")
    check_new_output(out)


def write_source(source: ExportSource, fmt: str, out, outtype: str = "auto", progress: bool = True) -> Path:
    """Write an opened source with the `fmt` exporter (after check_request), then close it."""
    try:
        return EXPORTERS[fmt][0](source, Path(out), outtype, progress)
    finally:
        source.close()


from llama.export import gguf, hf, meta  # noqa: E402,F401  (each registers itself)

__all__ = ["EXPORTERS", "ExportSource", "check_request", "export", "open_export_source", "register_exporter",
           "write_source"]
