"""Our format: Meta's keys and fairscale layout in `consolidated.NN.safetensors` + `params.json`
(what we write: one file per tensor-parallel rank)."""
import contextlib
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llama.files import atomic_path, save_safetensors
from llama.formats.meta import MetaLayout
from llama.formats.tensorfiles import SafetensorsStreamWriter

OURS = MetaLayout("ours", ".safetensors")


def save_checkpoint(model, out_dir, state: Optional[dict] = None, rank: int = 0) -> None:
    """Write a Transformer in our format: params.json + consolidated.{rank:02d}.safetensors holding
    this tensor-parallel rank's slices (every rank calls it). `state` replaces model.state_dict()."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict() if state is None else state, out / f"consolidated.{rank:02d}.safetensors")
    if rank == 0:
        model.args.write_params_json(out / "params.json")


def save_gathered_checkpoint(model, out_dir) -> None:
    """Write a Transformer whose parameters are sharded DTensors (FSDP) whole, in our format
    (params.json + consolidated.00.safetensors): every rank gathers one parameter at a time and
    rank 0 appends it to the file, so no rank holds more than one whole tensor. Every rank calls it."""
    out = Path(out_dir)
    state = model.state_dict()
    writer = dist.get_rank() == 0
    with contextlib.ExitStack() as stack:
        if writer:
            out.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(atomic_path(out / "consolidated.00.safetensors"))
            stream = stack.enter_context(contextlib.closing(SafetensorsStreamWriter(
                tmp, [(key, t.dtype, tuple(t.shape)) for key, t in state.items()])))
        for key, t in state.items():
            whole = t.full_tensor() if isinstance(t, DTensor) else t
            if writer:
                stream.append(key, whole.detach().cpu())
    if writer:
        model.args.write_params_json(out / "params.json")
