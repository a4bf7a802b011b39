"""The stop protocol: Ctrl-C, SIGTERM (torchrun, SLURM, Kubernetes) and SIGUSR1 (SLURM pre-emption).

A signal only sets a flag (:class:`StopFlag`); the training loop shares the flag with the other processes
in the all-reduce it makes at every step anyway, so every process stops at the same step boundary, saves,
and reports the same signal (:func:`agree_to_stop`). A second Ctrl-C aborts at once
(:class:`TrainingAborted`).
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch

from ._dist import DistContext, all_reduce_max, all_reduce_sum

__all__ = ["TrainingAborted", "StopFlag", "stop_signals", "signal_name", "agree_to_stop", "stopped_during_set_up"]


class TrainingAborted(KeyboardInterrupt):
    """A second Ctrl-C aborted the run at once; the message says which checkpoint, if any, holds the work."""


def signal_name(signum: int | None) -> str:
    """``SIGTERM`` for the signal number 15; ``a stop request`` for None (a flag no signal set)."""
    return signal.Signals(signum).name if signum is not None else "a stop request"


def stop_signals() -> tuple[signal.Signals, ...]:
    # SIGTERM: what torchrun, SLURM and Kubernetes send before killing; SIGUSR1: SLURM's pre-emption warning
    return tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopFlag:
    """Handler of SIGINT, SIGTERM and SIGUSR1 that asks the loop to stop at the next step boundary;
    a second Ctrl-C aborts at once with :class:`TrainingAborted`. ``signum`` is the signal that stops the run
    (received here, or taken from another process by :func:`agree_to_stop`)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise TrainingAborted
        if not self.requested:
            self.requested, self.signum = True, int(signum)

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Handle the stop signals while the block runs (the previous handlers come back after it); off the
        main thread, where Python cannot install handlers, the flag is never set."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in stop_signals()}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def agree_to_stop(stop: StopFlag, stops: float, ctx: DistContext) -> bool:
    """Whether any process was signalled (``stops``, summed over processes, is the same number on every
    one); if so, a process that was not takes the signal of one that was (the largest number), so every
    process reports the same exit code."""
    if not stops:
        return False
    signum = all_reduce_max(torch.tensor(float(stop.signum or 0), device=ctx.device), ctx)
    if stop.signum is None:
        received = int(signum.item())
        stop.signum = received if received in {int(s) for s in stop_signals()} else int(signal.SIGTERM)
    return True


def stopped_during_set_up(stop: StopFlag, ctx: DistContext) -> bool:
    """Whether any process was signalled before the first step (every process takes part)."""
    requested = torch.tensor(float(stop.signum is not None), device=ctx.device)
    return agree_to_stop(stop, all_reduce_sum(requested, ctx).item(), ctx)
