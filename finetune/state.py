"""Resumable training state on disk.

out_dir/checkpoints/step_000120/ holds, per rank, rank{r}.safetensors (trainable parameters, the
optimizer's tensors, RNG states) and rank{r}.json (everything else: optimizer skeleton, scheduler,
loss scaler, step), plus the exported adapter in adapter/; an FSDP run's trainable weights and
optimizer state are in sharded/ (torch.distributed.checkpoint: each rank writes its shards). Ranks
write into step_000120.partial/;
rank 0 renames it once every rank is done, and renames a checkpoint to step_N.discard before
deleting it, so a kill at any moment leaves only whole checkpoints under their final names.
"""
import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from safetensors.torch import load_file

from llama.errors import LlamaInputError
from llama.files import atomic_write_bytes, fsync_dir, save_safetensors

STEP_DIR = re.compile(r"step_(\d{6,})")
SHARDED = "sharded"  # an FSDP run's torch.distributed.checkpoint folder inside a checkpoint
SHARDED_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading: not strict about the frozen weights left out above. On one rank (torchrun with a world
# of one) torch's strict check counted them as missing and refused every resume; the trained
# weights are still checked, by dcp.load, which fails on any key of the run that the checkpoint lacks.
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def flatten(obj, tensors: dict, prefix: str):
    """Nested dicts/lists with tensors -> a JSON-able skeleton; tensors move into `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten(k, tensors, f"{prefix}.k{i}"), flatten(v, tensors, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    return obj


def unflatten(skeleton, tensors: dict):
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [unflatten(v, tensors) for v in skeleton["__list__"]]
    return skeleton


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first."""
    root = Path(out_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and STEP_DIR.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_state(out_dir, step: int, rank: int, params: dict, optimizer, scheduler, scaler, keep_last: int,
               write_extra=None, sharded=None) -> Path:
    """Write step's checkpoint (every rank calls this), then drop all but the last keep_last.
    write_extra(folder) adds more files (the exported adapter) before the folder is renamed.
    sharded: an FSDP-sharded model, whose trainable weights and AdamW state go through
    torch.distributed.checkpoint instead (sharded/: each rank writes its shards)."""
    root = Path(out_dir) / "checkpoints"
    final, partial = root / f"step_{step:06d}", root / f"step_{step:06d}.partial"
    if rank == 0:
        for leftover in (partial, *root.glob("step_*.discard")):  # left by a run killed mid-write or mid-delete
            shutil.rmtree(leftover, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    tensors = {f"param.{k}": v for k, v in params.items()} if sharded is None else {}
    if sharded is not None:
        dcp.save(sharded_state(sharded, optimizer), checkpoint_id=partial / SHARDED)
    skeleton = {
        "step": step,
        "optimizer": flatten(optimizer.state_dict(), tensors, "optim") if sharded is None else None,
        "scheduler": scheduler.state_dict(),
        "scaler": flatten(scaler.state_dict(), tensors, "scaler") if scaler is not None else None,
        "rng": flatten(rng_state(), tensors, "rng"),
    }
    save_safetensors({k: v.detach().cpu() for k, v in tensors.items()}, partial / f"rank{rank}.safetensors")
    atomic_write_bytes(partial / f"rank{rank}.json", json.dumps(skeleton).encode())
    if write_extra is not None:
        write_extra(partial / "adapter")
    _barrier()
    if rank == 0:
        if final.exists():  # the same step saved again (by a run resumed from an older checkpoint)
            discard(final)
        partial.rename(final)
        fsync_dir(root)
        for old in checkpoints(out_dir)[:-keep_last]:
            discard(old)
    _barrier()
    return final


def discard(folder: Path) -> None:
    """Remove a checkpoint, first renaming it out of the checkpoints' names: a kill (or a second
    Ctrl-C) halfway through deleting it must not leave a half folder that resume would take."""
    doomed = folder.with_name(f"{folder.name}.discard")
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    fsync_dir(folder.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def sharded_state(model, optimizer) -> dict:
    """An FSDP model's trainable weights and its optimizer's state, as DTensor shards for
    torch.distributed.checkpoint (the frozen base is read from the base checkpoint again)."""
    weights, moments = get_state_dict(model, optimizer, options=SHARDED_OPTIONS)
    return {"model": weights, "optimizer": moments}


def load_state(folder, rank: int, params: dict, optimizer, scheduler, scaler, sharded=None) -> int:
    """Restore what save_state wrote for this rank; returns the step to continue from."""
    folder = Path(folder)
    files = folder / f"rank{rank}.safetensors", folder / f"rank{rank}.json"
    for f in files:
        if not f.is_file():
            raise LlamaInputError(f"{folder}: no {f.name}; was this checkpoint written with a different number of processes?")
    tensors = load_file(str(files[0]))
    skeleton = json.loads(files[1].read_text())
    if sharded is not None:
        if skeleton["optimizer"] is not None or not (folder / SHARDED).is_dir():
            raise LlamaInputError(f"{folder}: not written by a sharding = 'fsdp' run")
        state = sharded_state(sharded, optimizer)
        try:
            dcp.load(state, checkpoint_id=folder / SHARDED)
        except Exception as e:  # DCP wraps the cause (a missing or misshapen tensor) in its own error
            raise LlamaInputError(f"{folder / SHARDED}: does not fit this run ({str(e).splitlines()[0]})") from None
        set_state_dict(sharded, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=LOAD_OPTIONS)
        params = {}
    elif skeleton["optimizer"] is None:
        raise LlamaInputError(f"{folder}: written by a sharding = 'fsdp' run; resume it with sharding = 'fsdp'")
    with torch.no_grad():
        for name, p in params.items():
            saved = tensors.get(f"param.{name}")
            if saved is None:
                raise LlamaInputError(f"{folder}: has no {name}, which this run trains (saved with another method, "
                                      "lora_targets or task?)")
            if saved.shape != p.shape:
                raise LlamaInputError(f"{folder}: {name} is {tuple(saved.shape)} in the checkpoint but "
                                      f"{tuple(p.shape)} in this run")
            p.copy_(saved)
    if sharded is None:
        optimizer.load_state_dict(unflatten(skeleton["optimizer"], tensors))
    scheduler.load_state_dict(skeleton["scheduler"])
    if scaler is not None and skeleton["scaler"] is not None:
        scaler.load_state_dict(unflatten(skeleton["scaler"], tensors))
    set_rng_state(unflatten(skeleton["rng"], tensors))
    return skeleton["step"]
