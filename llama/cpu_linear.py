"""Products of a few float32 rows with a weight on the CPU (every step of decoding), spread over
threads as row blocks of the weight; PyTorch's own product everywhere else."""
import torch
import torch.nn.functional as F
from torch import nn

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

    On some CPUs PyTorch's product of one row with W.T (a GEMV: every step of decoding) runs on
    one thread whatever torch.get_num_threads() says; the same product as a batch of row blocks of
    W runs one block per thread. The figures, and the machines where it did and did not pay, are
    in docs/benchmarks.md (bench/decode.py)."""
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
