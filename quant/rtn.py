"""Round-to-nearest int4: per group of input features, the scale and zero point that cover the
group's range, each weight rounded to the nearest of the 16 levels. GPTQ (quant/gptq.py) uses the
same grid, column by column."""
import torch

from quant.pack import Int4Weight, group_index, pack

MAXQ = 15


def find_params(w: torch.Tensor, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for w [rows, cols] so q = round(w / scale) + zero covers 0..15 and
    the range includes 0. Scales are rounded to fp16 (how they are stored) before use."""
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = ((xmax - xmin) / MAXQ).half().float()
    if sym:
        zero = torch.full_like(scale, (MAXQ + 1) / 2)
    else:
        # GPTQ files store zero-1 in 4 bits, so zero 0 (a group with no negative weight) can't be
        # written; zero 1 shifts that group's grid by one step, a tiny loss on a rare group
        zero = torch.round(-xmin / scale).clamp(1, MAXQ)
    return scale, zero


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, MAXQ)


def rtn(weight: torch.Tensor, group_size: int = 128, sym: bool = False) -> Int4Weight:
    """Round-to-nearest int4 of weight [out, in], per group of input features (-1: per row)."""
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    w = weight.detach().float().reshape(out_features, in_features // size, size)
    scale, zero = find_params(w.reshape(-1, size), sym)
    scale, zero = scale.view(out_features, -1, 1), zero.view(out_features, -1, 1)
    q = quantize_column(w, scale, zero).reshape(out_features, in_features)
    return pack(q, zero[..., 0].t(), scale[..., 0].t(), group_index(in_features, group_size).to(weight.device))
