"""Process groups and the layer factories that pick fairscale tensor-parallel layers when the
model is split across ranks, and plain torch layers in one process."""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llama.errors import LlamaInputError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_model_parallel(device: str | None = None, tensor_parallel: int | None = None) -> tuple[int, int, str]:
    """Under torchrun, start the process group (nccl on GPU, gloo on CPU) and fairscale's model
    parallel state: groups of `tensor_parallel` consecutive ranks (default: all of them) each hold
    one copy of the model split across them; the copies are data-parallel.

    Returns (rank, world_size, device)."""
    n = world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and n > 1:
        device = f"cuda:{local_rank}"
    if n == 1:
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
    (or destroys its groups) while a peer still has collectives in flight."""
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


def tensor_parallel_kind(layer: nn.Module):
    """None for a whole linear, "column" or "row" for one split across tensor-parallel ranks:
    fairscale's layers by class, others (quantized linears) by their `tensor_parallel` attribute."""
    if hasattr(layer, "tensor_parallel"):
        return layer.tensor_parallel
    return {"ColumnParallelLinear": "column", "RowParallelLinear": "row"}.get(type(layer).__name__)


def _local(size: int, what: str) -> int:
    n = model_parallel_size()
    if size % n:
        raise LlamaInputError(f"{what} {size} does not divide by the {n} tensor-parallel ranks")
    return size // n


def _bare(cls, **attrs) -> nn.Module:
    """A fairscale layer built without its __init__, which allocates and initialises a CPU weight
    whatever the device (so the model could not be built on `meta` and filled from the
    checkpoint). Its forward, and the collectives in it, are fairscale's own."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    for name, value in attrs.items():
        setattr(layer, name, value)
    layer.register_parameter("bias", None)
    return layer


GEMV_SPLIT_MIN = 1 << 18  # weights smaller than this (1 MiB in float32) cost less than waking a second thread
GEMV_MAX_ROWS = 8  # past this many rows PyTorch's own GEMM does as well


@torch.compiler.assume_constant_result
def _threads() -> int:
    """torch.get_num_threads(), which a compiled graph takes as a constant (dynamo cannot trace
    it). The row-block split it sets only spreads the work: the product is the same for any count."""
    return torch.get_num_threads()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight [out, in].T, with products of a few float32 rows on the CPU spread
    over threads.

    PyTorch's CPU product of one row with W.T (a GEMV: every step of decoding) ran on one thread
    here whatever torch.get_num_threads() said, reading weights at 6-8 GB/s, and 2-8 rows ran
    slower still (3-5 GB/s); the same product as a batch of row blocks of W runs one block per
    thread, at 12-17 GB/s on 2 cores for 1 row and 10-13 GB/s for 4 (bench/decode.py)."""
    threads = _threads()
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if (threads == 1 or not 0 < rows <= GEMV_MAX_ROWS or weight.numel() < GEMV_SPLIT_MIN or x.device.type != "cpu"
            or x.dtype != torch.float32 or weight.dtype != torch.float32 or out_features % threads
            or not weight.is_contiguous()):
        return F.linear(x, weight)
    blocks = weight.view(threads, out_features // threads, in_features)
    y = torch.bmm(blocks, x.reshape(rows, in_features).t().expand(threads, in_features, rows))  # [threads, out/threads, rows]
    return y.view(out_features, rows).t().contiguous().view(*x.shape[:-1], out_features)


class Linear(nn.Linear):
    """nn.Linear without bias, its few-row CPU products threaded (see `linear`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def column_linear(in_features: int, out_features: int, gather_output: bool = False) -> nn.Module:
    """Linear whose output features are split across ranks (weight [out/n, in], split on dim 0)."""
    if model_parallel_size() == 1:
        return Linear(in_features, out_features)
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear

    local_out = _local(out_features, "output features")
    return _bare(
        ColumnParallelLinear, in_features=in_features, out_features=out_features, gather_output=gather_output,
        output_size_per_partition=local_out, weight=nn.Parameter(torch.empty(local_out, in_features)),
    )


def row_linear(in_features: int, out_features: int) -> nn.Module:
    """Linear whose input features are split across ranks (weight [out, in/n], split on dim 1);
    its outputs are summed over ranks."""
    if model_parallel_size() == 1:
        return Linear(in_features, out_features)
    from fairscale.nn.model_parallel.layers import RowParallelLinear

    local_in = _local(in_features, "input features")
    return _bare(
        RowParallelLinear, in_features=in_features, out_features=out_features, input_is_parallel=True,
        input_size_per_partition=local_in, weight=nn.Parameter(torch.empty(out_features, local_in)),
    )


def embedding(vocab_size: int, dim: int) -> nn.Module:
    """Token embedding split on the embedding dim (weight [vocab, dim/n]) as in LLaMA-1/2."""
    if model_parallel_size() == 1:
        return nn.Embedding(vocab_size, dim)
    from fairscale.nn.model_parallel.layers import ParallelEmbedding

    local_dim = _local(dim, "embedding dim")
    layer = _bare(
        ParallelEmbedding, num_embeddings=vocab_size, embedding_dim=dim, embedding_dim_per_partition=local_dim,
        padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False, _weight=None,
        weight=nn.Parameter(torch.empty(vocab_size, local_dim)),
    )
    del layer.bias  # embeddings have none
    return layer


# --- layer-wise placement ----------------------------------------------------------------------


def plan_stages(unit_bytes: list[int], weights: list[float]) -> list[int]:
    """Split a sequence of units (embedding, layer 0..L-1, norm+output) into len(weights)
    contiguous stages whose byte shares follow `weights` (equal weights: balanced by bytes).

    Returns the stage index of each unit, non-decreasing; every stage gets at least one unit
    when there are enough units. A unit goes to the stage its midpoint falls in."""
    n = len(weights)
    if n < 1 or any(w <= 0 for w in weights):
        raise LlamaInputError("placement needs at least one device, each with a positive share")
    if n > len(unit_bytes):
        raise LlamaInputError(f"{n} stages but only {len(unit_bytes)} units (embedding, layers, output) to place")
    total, share = float(sum(unit_bytes)), [w / sum(weights) for w in weights]
    bounds = [sum(share[: k + 1]) * total for k in range(n)]  # cumulative byte limits
    stages, before = [], 0.0
    for size in unit_bytes:
        mid = before + size / 2
        stages.append(next(k for k in range(n) if mid <= bounds[k] or k == n - 1))
        before += size
    return stages if len(set(stages)) == n else _fill_empty_stages(stages, n)


def _fill_empty_stages(stages: list[int], n: int) -> list[int]:
    """Move as few units as needed so each of n stages owns one: unit i of m stays in order,
    steps at most one stage ahead of the previous unit, and leaves enough units for the rest."""
    m, out, prev = len(stages), [], 0
    for i, s in enumerate(stages):
        s = min(max(s, prev), prev + 1 if i else 0)
        s = max(s, n - (m - i))
        out.append(s)
        prev = s
    return out


def resolve_devices(spec) -> list[str]:
    """'cuda:0,cuda:1' or a list -> device names; 'auto' -> every visible GPU (else cpu)."""
    if spec == "auto":
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    devices = spec.split(",") if isinstance(spec, str) else list(spec)
    for d in devices:
        try:
            torch.device(d)
        except RuntimeError:
            raise LlamaInputError(f"unknown device {d!r} in --devices") from None
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise LlamaInputError(f"device {d} asked for but no GPU is visible")
    return devices


def device_shares(devices: list[str]) -> list[float]:
    """Free memory of each GPU (so a fuller GPU gets fewer layers); equal shares otherwise."""
    if all(d.startswith("cuda") for d in devices):
        return [float(torch.cuda.mem_get_info(torch.device(d))[0]) for d in devices]
    return [1.0] * len(devices)


def place_layers(model: nn.Module, devices: list[str], shares: list[float] | None = None) -> list[str]:
    """Move contiguous layer ranges of a Transformer onto `devices` in one process: embedding
    with the first stage, norm and output with the last, balanced by bytes (or by `shares`).
    Activations follow the layers in Transformer.forward. Returns the device of each layer."""
    if model_parallel_size() > 1 and len(devices) > 1:
        raise LlamaInputError("layer-wise placement over several devices can't be combined with tensor parallel ranks")

    def nbytes(*modules):
        return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])

    units = [nbytes(model.tok_embeddings)] + [nbytes(layer) for layer in model.layers]
    units.append(nbytes(model.norm, model.output))
    stages = plan_stages(units, shares or [1.0] * len(devices))
    model.tok_embeddings.to(devices[stages[0]])
    for layer, stage in zip(model.layers, stages[1:-1]):
        layer.to(devices[stage])
    model.norm.to(devices[stages[-1]])
    model.output.to(devices[stages[-1]])
    return [devices[s] for s in stages[1:-1]]
