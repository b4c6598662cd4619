"""How many threads PyTorch's CPU kernels use: --threads / `threads = N`, else OMP_NUM_THREADS,
else PyTorch's default (the cores it sees)."""
import os
from typing import Optional

import torch

from llama.errors import LlamaInputError


def set_threads(n: Optional[int] = None) -> int:
    """torch.set_num_threads(n), with n None read from OMP_NUM_THREADS when it is set (PyTorch's
    default otherwise, left as it is). Returns the count now in use; LlamaInputError for a count
    below 1 or an OMP_NUM_THREADS that is not a whole number."""
    where = "threads"
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if not env:
            return torch.get_num_threads()
        where = "OMP_NUM_THREADS"
        try:
            n = int(env)
        except ValueError:
            raise LlamaInputError(f"OMP_NUM_THREADS={env!r}: expected a whole number of threads, at least 1") from None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LlamaInputError(f"{where} = {n!r}: expected a whole number of threads, at least 1")
    torch.set_num_threads(n)
    return n
