"""Process groups: torchrun's ranks, fairscale's tensor-parallel groups and the data-parallel
groups across them."""
import os
import sys

import torch
import torch.distributed as dist

from llama.errors import LlamaInputError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_torchrun() -> bool:
    """Started by torchrun (which sets TORCHELASTIC_RUN_ID), with its rendezvous to join."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "MASTER_ADDR" in os.environ


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, in one line, before anything is loaded on it."""
    try:
        d = torch.device(device)
    except RuntimeError:
        raise LlamaInputError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise LlamaInputError(f"device {device} asked for but no GPU is visible (torch {torch.__version__}"
                                  f"{'' if torch.version.cuda else ', a CPU-only build'}): use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise LlamaInputError(f"device {device} asked for but only {torch.cuda.device_count()} GPU(s) are visible")


def setup_model_parallel(device: str | None = None, tensor_parallel: int | None = None) -> tuple[int, int, str]:
    """Under torchrun, start the process group (nccl on GPU, gloo on CPU) and fairscale's model
    parallel state: groups of `tensor_parallel` consecutive ranks (default: all of them) each hold
    one copy of the model split across them; the copies are data-parallel. One process under
    torchrun starts its group too (a world of one: the same code path as N ranks, collectives
    included); one started without torchrun starts none.

    Returns (rank, world_size, device)."""
    n = world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and (n > 1 or under_torchrun()):  # a process group needs the rank's own GPU, by index
        device = f"cuda:{local_rank}"
    check_device(device)
    if n == 1 and not under_torchrun():
        return 0, 1, device
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    from fairscale.nn.model_parallel import initialize as fs_init

    if not fs_init.model_parallel_is_initialized():
        tp = tensor_parallel or n
        if n % tp:
            raise LlamaInputError(f"{n} processes cannot form groups of {tp} tensor-parallel ranks")
        fs_init.initialize_model_parallel(tp)
    return dist.get_rank(), n, device


def shutdown_model_parallel() -> None:
    """Tear the process groups down once every rank is done: gloo aborts a process that leaves
    (or destroys its groups) while a peer still has collectives in flight.

    Called from a `finally` while an exception propagates (this rank failed), it leaves at once:
    a barrier there would wait for peers that are blocked in another collective, all of them
    hanging until the 30-minute collective timeout. Leaving closes this rank's connections, so
    the peers' collectives fail within seconds, and torchrun stops every rank, reporting this
    one's error first."""
    if sys.exc_info()[0] is not None:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def model_parallel_size() -> int:
    """The tensor-parallel degree: fairscale's group size once set up, else 1."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    from fairscale.nn.model_parallel import initialize as fs_init

    if not fs_init.model_parallel_is_initialized():
        return 1
    return fs_init.get_model_parallel_world_size()


def data_parallel_group():
    """The process group of ranks holding the same tensor-parallel shard (None in one process)."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    from fairscale.nn.model_parallel import initialize as fs_init

    return fs_init.get_data_parallel_group()


def model_parallel_rank() -> int:
    if model_parallel_size() == 1:
        return 0
    from fairscale.nn.model_parallel import initialize as fs_init

    return fs_init.get_model_parallel_rank()
