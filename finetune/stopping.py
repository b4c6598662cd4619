"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM at a step boundary, with a checkpoint to resume from.

While `StopSignals` is active, the first signal only records a request; the loop asks `agreed()`
after each step and, when it answers a signal, saves a checkpoint and raises `TrainingInterrupted`.
A second signal stops at once (`StopNow`), which can leave only a `.partial` checkpoint folder,
one that resume never takes (finetune.state). Under torchrun every rank must stop after the same
step, or their checkpoints would disagree, and a signal may reach only some ranks: `agreed()` is a
max all-reduce of one scalar, so all ranks stop as soon as any one was signalled.
"""
import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; exit with `exit_code`, as shells do."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopNow(KeyboardInterrupt):
    """A second signal: stop wherever the run is (a KeyboardInterrupt, so nothing catches it)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped at once on a second {signal.Signals(signum).name}: the checkpoints saved before "
                         "are whole; run the same command again to resume from the last (resume = auto)")
        self.exit_code = 128 + signum


class StopSignals:
    """Context manager: SIGINT and SIGTERM handlers that request a stop, the previous handlers
    restored on exit. Handlers can only be set from the main thread; elsewhere it does nothing."""

    def __init__(self):
        self.signum = 0  # the first signal received, 0 for none
        self.previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise StopNow(signum)
        self.signum = signum

    def agreed(self, device) -> int:
        """The signal to stop on, the same on every rank (the largest any rank received), or 0."""
        if not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
