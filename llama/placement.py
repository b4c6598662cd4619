"""Layer-wise placement in one process: contiguous layer ranges on several devices, balanced by
bytes (the same planner cuts layer-wise stage files in split/stages.py)."""
import torch
from torch import nn

from llama.distributed import check_device, model_parallel_size
from llama.errors import LlamaInputError


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
        check_device(d)
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
