"""Products of a few float32 rows with a weight on the CPU (every step of decoding): PyTorch's own
`F.linear`, or the same product as a batch of row blocks of the weight, one block per thread,
whichever measured faster on this machine. PyTorch's own product everywhere else.

Which of the two wins depends on the CPU and its BLAS: the row-block split doubled decoding on
AMD EPYC VMs and halved it on an Intel Xeon with AMX (docs/benchmarks.md). So no rule is written
down here: the first time a shape is seen, both candidates are timed on it for a few
milliseconds, and the choice is kept for the process (`choices()` lists them).

`LLAMA_CPU_LINEAR` (environment) overrides that:
    auto   (default) calibrate per shape, as above
    plain  always F.linear
    split  the row-block split wherever it applies (tests, benchmarks)
"""
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama.errors import LlamaInputError

ENV = "LLAMA_CPU_LINEAR"
MODES = ("auto", "plain", "split")
GEMV_MAX_ROWS = 8  # past this many rows PyTorch's own GEMM spreads the work itself
SPLIT_GAIN = 1.10  # the split is kept only if it beats F.linear by 10%: a near tie is noise, and F.linear is the safe side
CALIBRATION_BYTES = 64 << 20  # distinct weight copies timed in turn, so the timing reads memory, not a warm cache
CALIBRATION_MAX_COPIES = 256  # tiny weights: their cost is the call's overhead, wherever they sit
CALIBRATION_SECONDS = 0.002  # per candidate per round
CALIBRATION_MIN_CALLS = 3  # per candidate per round, for the largest weights
CALIBRATION_ROUNDS = 3  # candidates alternate round by round, so a busy spell of the machine hits both
# a candidate's cost is the fastest of its calls: on a machine shared with other work most calls of
# a 2-thread product can wait a scheduler tick (~4-8 ms) for a descheduled thread, which swings a mean
# and, under heavy load, even a median; the fastest call is the product's own cost


@dataclass(frozen=True)
class Choice:
    """The path one shape took and what each candidate cost per call when it was calibrated."""
    path: str  # "split" or "plain"
    split_us: float
    plain_us: float


# (rows, out_features, in_features, threads) -> Choice, for the process
_choices: dict[tuple[int, int, int, int], Choice] = {}


def mode() -> str:
    """LLAMA_CPU_LINEAR's value (default "auto"); LlamaInputError for anything else."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise LlamaInputError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(MODES)}")
    return value


def choices() -> dict[tuple[int, int, int, int], Choice]:
    """The calibrated choices so far, {(rows, out_features, in_features, threads): Choice}."""
    return dict(_choices)


def split_linear(x: torch.Tensor, weight: torch.Tensor, threads: int) -> torch.Tensor:
    """x [..., in] @ weight [out, in].T as one bmm over `threads` row blocks of weight
    [threads, out/threads, in]: PyTorch runs one block per thread. out % threads must be 0 and
    weight contiguous. Returns [..., out], contiguous as F.linear's."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    blocks = weight.view(threads, out_features // threads, in_features)
    y = torch.bmm(blocks, x.reshape(rows, in_features).t().expand(threads, in_features, rows))  # [threads, out/threads, rows]
    return y.view(out_features, rows).t().contiguous().view(*x.shape[:-1], out_features)


def _call_times(fn, x: torch.Tensor, weights: torch.Tensor) -> list[float]:
    """Seconds of each call of fn(x, w), cycling over the copies in weights [copies, out, in], for
    at least CALIBRATION_SECONDS and CALIBRATION_MIN_CALLS calls."""
    times, start = [], time.perf_counter()
    while len(times) < CALIBRATION_MIN_CALLS or time.perf_counter() - start < CALIBRATION_SECONDS:
        t = time.perf_counter()
        fn(x, weights[len(times) % len(weights)])
        times.append(time.perf_counter() - t)
    return times


@torch.compiler.disable
def calibrate(rows: int, out_features: int, in_features: int, threads: int) -> Choice:
    """Time F.linear and the split on float32 x [rows, in] @ W [out, in].T with `threads` threads
    and keep the faster (the split only if SPLIT_GAIN faster). Tens of milliseconds, once per shape."""
    copies = max(1, min(CALIBRATION_MAX_COPIES, CALIBRATION_BYTES // (4 * out_features * in_features)))
    with torch.no_grad():
        weights = torch.empty(copies, out_features, in_features).fill_(1e-3)  # fill: every page touched before timing
        x = torch.full((rows, in_features), 1e-3)
        candidates = {"plain": F.linear, "split": lambda x, w: split_linear(x, w, threads)}
        times = {name: [] for name in candidates}
        for name, fn in candidates.items():  # warm-up: thread pool awake, kernels chosen
            for w in weights[:2]:
                fn(x, w)
        for _ in range(CALIBRATION_ROUNDS):
            for name, fn in candidates.items():
                times[name] += _call_times(fn, x, weights)
    cost = {name: min(t) for name, t in times.items()}
    path = "split" if cost["plain"] >= SPLIT_GAIN * cost["split"] else "plain"
    return Choice(path, round(cost["split"] * 1e6, 1), round(cost["plain"] * 1e6, 1))


@torch.compiler.assume_constant_result
def _threads() -> int:
    """torch.get_num_threads(), which a compiled graph takes as a constant (dynamo cannot trace
    it). The split it sets only spreads the work: the product is the same for any count."""
    return torch.get_num_threads()


@torch.compiler.assume_constant_result
def _use_split(rows: int, out_features: int, in_features: int, threads: int) -> bool:
    """Whether this shape takes the split: by LLAMA_CPU_LINEAR, else by calibration (run here the
    first time the shape is seen). A compiled graph takes the answer as a constant, so the
    calibration runs while tracing and never inside the graph."""
    m = mode()
    if m != "auto":
        return m == "split"
    key = (rows, out_features, in_features, threads)
    if key not in _choices:
        _choices[key] = calibrate(*key)
    return _choices[key].path == "split"


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight [out, in].T. Products of 1 to GEMV_MAX_ROWS float32 rows with a
    contiguous CPU weight whose out_features the thread count divides may go through
    `split_linear`, as `_use_split` decides; everything else is F.linear."""
    threads = _threads()
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    # a graph compiled for any batch size (dynamic=True) sees rows as a symbol, which a constant
    # lookup cannot take: there the one-row choice stands in for every row count
    key_rows = 1 if torch.compiler.is_compiling() else rows
    if (threads == 1 or not 0 < rows <= GEMV_MAX_ROWS or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or out_features % threads or not weight.is_contiguous()
            or not _use_split(key_rows, out_features, in_features, threads)):
        return F.linear(x, weight)
    return split_linear(x, weight, threads)


class Linear(nn.Linear):
    """nn.Linear without bias, its few-row CPU products through `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        mode()  # a bad LLAMA_CPU_LINEAR stops the model's build, not its first token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
