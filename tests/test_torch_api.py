"""The torch APIs the package uses beyond the everyday ones, each checked to exist with the
arguments we pass. The package supports torch >= 2.11 (setup.py): CI runs torch 2.13, the GPU
machines 2.11 (CUDA 13), where bench/gpu_run.sh runs this file before bench/gpu_check.py, so a
difference between the two shows here in seconds, named, rather than as a crash deep in a check."""
import inspect

import pytest
import torch
import torch.nn.functional as F


def test_torch_is_at_least_the_supported_minimum():
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert (major, minor) >= (2, 11), torch.__version__


def test_attention_and_autocast():
    assert "enable_gqa" in F.scaled_dot_product_attention.__doc__  # llama/model.py: GQA without repeating k/v
    assert callable(torch.get_autocast_dtype) and callable(torch.is_autocast_enabled)  # quant/linear.py
    assert callable(torch.compiler.assume_constant_result)  # llama/model.py
    torch.amp.GradScaler("cpu")  # finetune/trainer.py: loss scaling by device type


def test_int4_ops():
    """quant/kernels.py (CPU op) and bench/gpu_check.py (the CUDA op, as a peer)."""
    for op in ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm",
               "_convert_weight_to_int4pack"):
        assert hasattr(torch.ops.aten, op), op
    q = torch.randint(0, 16, (16, 64), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack((torch.ones(2, 16), torch.zeros(2, 16)), -1)  # scales 1, zeros 0: y = x @ (q - 8).T
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(64), packed, 32, sz)
    assert torch.equal(y, (q - 8).float().t())


def test_fsdp2_dtensor_and_checkpoint():
    """finetune/sharding.py, finetune/state.py, finetune/adapters.py, llama/tp.py."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict  # noqa: F401
    from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    from torch.distributed.fsdp import (  # noqa: F401
        CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
    )
    from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: F401

    assert "src_data_rank" in inspect.signature(distribute_tensor).parameters
    assert {"ignore_frozen_params", "strict"} <= set(StateDictOptions.__dataclass_fields__)
    for method in ("set_requires_gradient_sync", "unshard", "reshard", "_get_fsdp_state"):
        assert hasattr(FSDPModule, method), method
    assert hasattr(torch.nn.parallel.DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model")
    import torch.distributed.checkpoint as dcp

    for fn in (dcp.save, dcp.load):
        assert "checkpoint_id" in inspect.signature(fn).parameters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_memory_and_events():
    """bench/gpu_check.py and bench/common.py on a GPU."""
    assert issubclass(torch.cuda.OutOfMemoryError, RuntimeError)
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.ones(1024, device="cuda").sum()
    end.record()
    torch.cuda.synchronize()
    assert start.elapsed_time(end) >= 0 and torch.cuda.max_memory_allocated() > 0
