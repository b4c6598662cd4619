"""Data parallelism over whole model copies, two ways (`sharding`):

- ddp: every rank holds the model; DDP all-reduces the trainable parameters' gradients.
- fsdp: torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) on each transformer block, then on
  the task model as the root. Parameters, gradients and AdamW's state are split across the ranks
  (each parameter along dim 0); a block's parameters are gathered only while it runs. The model
  is built on the meta device and each rank reads its shard from the checkpoint one tensor at a
  time, so no rank ever holds the whole model. With bf16/fp16 precision the parameters are
  gathered in that dtype and gradients reduced in float32 (MixedPrecisionPolicy); cpu_offload
  keeps the shards in host memory (CPUOffloadPolicy).

Both average gradients over the ranks (gloo included: checked against one process in
tests/finetune/test_fsdp.py), so the trainer scales its loss the same way for either.
"""
import contextlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from llama.config import ModelArgs
from llama.formats import open_checkpoint
from llama.loader import model_skeleton
from llama.tokenizers import Tokenizer
from finetune.adapters import attach
from finetune.heads import TaskModel


def ddp(task_model: TaskModel, dp_group) -> DistributedDataParallel:
    """DDP over the trainable parameters only: the frozen base is identical everywhere, and int4
    weights are buffers, so nothing else is broadcast or reduced."""
    frozen = [n for n, p in task_model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in task_model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(task_model, frozen)
    return DistributedDataParallel(task_model, process_group=dp_group)


def fsdp_task_model(cfg, args: ModelArgs, tokenizer: Tokenizer, dtype: torch.dtype, device: str,
                    amp_dtype) -> TaskModel:
    """The task model with cfg.method attached, sharded over every rank with FSDP2: built on the
    meta device, the method attached there (LoRA's A and B are drawn on the host from cfg.seed,
    the same on every rank), sharded, then each rank's shard filled from the checkpoint one tensor
    at a time. Frozen base weights are kept in `dtype`, trained ones in float32."""
    ckpt = open_checkpoint(cfg.ckpt_dir, 1, 0).check(args, 1)
    model = model_skeleton(args)
    if ckpt.tensors["output.weight"].tied_to == "tok_embeddings.weight":
        model.output.weight = model.tok_embeddings.weight
    torch.manual_seed(cfg.seed)
    task_model = attach(model, cfg, tokenizer)
    drawn = {n: p.detach().clone() for n, p in task_model.named_parameters() if not p.is_meta}
    task_model.to("meta")  # the drawn ones too: every parameter is filled after sharding
    with torch.no_grad():
        for p in task_model.parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    policies = dict(mesh=mesh, offload_policy=CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(),
                    mp_policy=MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
                    if amp_dtype is not None else MixedPrecisionPolicy())
    for block in model.layers:
        fully_shard(block, **policies)
    fully_shard(task_model, **policies)
    task_model.to_empty(device="cpu" if cfg.cpu_offload else device)
    with torch.no_grad():
        for name, p in task_model.named_parameters():
            whole = drawn[name] if name in drawn else ckpt.read(checkpoint_key(name))
            p.copy_(distribute_tensor(whole.to(p.device, p.dtype), mesh, p.placements, src_data_rank=None))
    ckpt.close()
    return task_model


def checkpoint_key(name: str) -> str:
    """The checkpoint key of a task model's base parameter ("model.layers.0.attention.wq.base.weight"
    -> "layers.0.attention.wq.weight")."""
    return name.removeprefix("model.").replace(".base.", ".")


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(wrapped: torch.nn.Module, sync: bool):
    """Reduce gradients over the ranks in this backward (the last micro-batch of a step) or not
    (the ones before: they accumulate locally)."""
    if sync:
        yield
    elif isinstance(wrapped, DistributedDataParallel):
        with wrapped.no_sync():
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered_root(task_model: torch.nn.Module):
    """Everything outside the blocks (embeddings, final norm, output) whole, for code that calls
    the transformer directly rather than through the task model (generation)."""
    if not is_sharded(task_model):
        yield
        return
    # The root's lazy initialisation (which makes it the root, the blocks its children) runs in
    # its first forward; a block called first would make itself a root instead. Nothing public
    # runs it without a forward (torch 2.13), hence the private call.
    task_model._get_fsdp_state()._lazy_init()
    task_model.unshard()
    try:
        yield
    finally:
        task_model.reshard()
