"""Resumable training state on disk.

out_dir/checkpoints/step_000120/ holds, per rank, rank{r}.safetensors (trainable parameters, the
optimizer's tensors, RNG states) and rank{r}.json (everything else: optimizer skeleton, scheduler,
loss scaler, step), plus the exported adapter in adapter/. Ranks write into step_000120.partial/;
rank 0 renames it once every rank is done, and renames a checkpoint to step_N.discard before
deleting it, so a kill at any moment leaves only whole checkpoints under their final names.
"""
import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from safetensors.torch import load_file

from llama.errors import LlamaInputError
from llama.files import atomic_write_bytes, fsync_dir, save_safetensors

STEP_DIR = re.compile(r"step_(\d{6,})")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: its shard of an FSDP-sharded DTensor, else the tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def flatten(obj, tensors: dict, prefix: str):
    """Nested dicts/lists with tensors -> a JSON-able skeleton; tensors (this rank's part of
    sharded ones) move into `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = local(obj).detach().cpu().contiguous()
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
               write_extra=None) -> Path:
    """Write step's checkpoint (every rank calls this), then drop all but the last keep_last.
    write_extra(folder) adds more files (the exported adapter) before the folder is renamed."""
    root = Path(out_dir) / "checkpoints"
    final, partial = root / f"step_{step:06d}", root / f"step_{step:06d}.partial"
    if rank == 0:
        for leftover in (partial, *root.glob("step_*.discard")):  # left by a run killed mid-write or mid-delete
            shutil.rmtree(leftover, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    tensors = {f"param.{k}": v for k, v in params.items()}
    skeleton = {
        "step": step,
        "optimizer": flatten(optimizer.state_dict(), tensors, "optim"),
        "scheduler": scheduler.state_dict(),
        "scaler": flatten(scaler.state_dict(), tensors, "scaler") if scaler is not None else None,
        "rng": flatten(rng_state(), tensors, "rng"),
    }
    save_safetensors({k: local(v).detach().cpu() for k, v in tensors.items()}, partial / f"rank{rank}.safetensors")
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


def load_state(folder, rank: int, params: dict, optimizer, scheduler, scaler) -> int:
    """Restore what save_state wrote for this rank; returns the step to continue from."""
    folder = Path(folder)
    files = folder / f"rank{rank}.safetensors", folder / f"rank{rank}.json"
    for f in files:
        if not f.is_file():
            raise LlamaInputError(f"{folder}: no {f.name}; was this checkpoint written with a different number of processes?")
    tensors = load_file(str(files[0]))
    skeleton = json.loads(files[1].read_text())
    with torch.no_grad():
        for name, p in params.items():
            saved = tensors.get(f"param.{name}")
            if saved is None:
                raise LlamaInputError(f"{folder}: has no {name}, which this run trains (saved with another method, "
                                      "lora_targets or task?)")
            if saved.shape != local(p).shape:
                raise LlamaInputError(f"{folder}: {name} is {tuple(saved.shape)} in the checkpoint but "
                                      f"{tuple(local(p).shape)} in this run")
            local(p).copy_(saved)
    optimizer.load_state_dict(unflatten(skeleton["optimizer"], tensors))
    for p, state in optimizer.state.items():  # each rank saved its shards of a sharded parameter's moments
        if isinstance(p, DTensor):
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == local(p).shape:
                    state[key] = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False)
    scheduler.load_state_dict(skeleton["scheduler"])
    if scaler is not None and skeleton["scaler"] is not None:
        scaler.load_state_dict(unflatten(skeleton["scaler"], tensors))
    set_rng_state(unflatten(skeleton["rng"], tensors))
    return skeleton["step"]
