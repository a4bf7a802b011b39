"""Process-group set-up for runs under ``torchrun`` (gloo on CPU, nccl on CUDA); a no-op otherwise.

Collectives wait at most ``dist_timeout`` seconds (600 by default, or the ``COVPOOL_DIST_TIMEOUT``
environment variable) rather than torch's 30 minutes, so a frozen or dead process ends the job soon with
:class:`DistributedFailure` naming the ranks.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..outputs import first_line

__all__ = ["DistContext", "DistributedFailure", "init_distributed", "shutdown_distributed", "all_gather_objects",
           "all_reduce_sum", "all_reduce_max", "dist_timeout_s", "is_collective_failure", "collective_failure",
           "uses_cuda", "DEVICES"]

DEFAULT_TIMEOUT_S = 600.0
#: the values of the config's ``device``
DEVICES = ("auto", "cpu", "cuda")
TIMEOUT_ENV = "COVPOOL_DIST_TIMEOUT"


class DistributedFailure(RuntimeError):
    """A collective operation timed out or lost a peer: another process is frozen or died."""


def dist_timeout_s(value: float | None = None) -> float:
    """The collective timeout in seconds: ``value`` (the config's ``dist_timeout``) if given, else the
    ``COVPOOL_DIST_TIMEOUT`` environment variable, else 600."""
    where = "dist_timeout"
    given: float | str | None = value  # the environment gives a string
    if value is None and os.environ.get(TIMEOUT_ENV, "").strip():
        given, where = os.environ[TIMEOUT_ENV], TIMEOUT_ENV
    if given is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(given)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{where} must be a positive number of seconds, got {given!r}")
    return seconds


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a timed-out or broken collective (gloo and nccl report them as RuntimeError)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                            "Watchdog caught collective operation timeout"))


def collective_failure(err: BaseException, timeout_s: float, saved_work: str) -> DistributedFailure:
    """The error a process reports when a collective failed (``err``): its rank, the peer that is frozen or
    dead, the timeout, and ``saved_work`` (which checkpoint holds the work, as the run folder says it)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    others = f"rank {1 - rank}" if world == 2 else f"one of the other {world - 1} processes"
    return DistributedFailure(
        f"rank {rank} of {world}: a collective operation failed within dist_timeout={timeout_s:g} s "
        f"({first_line(err)}); {others} is frozen or died (see its log); {saved_work}. If steps legitimately "
        "take longer, raise dist_timeout=<seconds> (or COVPOOL_DIST_TIMEOUT).")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this call started the process group, so it also ends it
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def uses_cuda(device: str) -> bool:
    """Whether config ``device`` (``auto``: CUDA when available, ``cpu``, ``cuda``) means CUDA here."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available here; use device=cpu or device=auto")
    return torch.cuda.is_available() if device == "auto" else device == "cuda"


def init_distributed(device: str, timeout_s: float | None = None) -> DistContext:
    """Read torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and start the process group.

    ``device`` is ``auto`` (CUDA when available), ``cpu`` or ``cuda``; ``timeout_s`` bounds every collective
    (see :func:`dist_timeout_s`)."""
    timeout = dist_timeout_s(timeout_s)
    use_cuda = uses_cuda(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout))
    return DistContext(rank, world, local, dev, owns, timeout)


def shutdown_distributed(ctx: DistContext, clean: bool = True) -> None:
    """End the process group if :func:`init_distributed` started it (a caller's own group is left alone).

    After a run that ended normally (``clean``) the processes first meet at a barrier, so none tears down
    gloo's connections while a peer still uses them (a process torn down under a peer's feet can abort with
    "terminate called without an active exception"); after a failure there is no peer to wait for."""
    if ctx.owns_group and dist.is_initialized():
        if clean and ctx.distributed:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over processes in place (nothing to do in a single process)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Maximum over processes in place (nothing to do in a single process)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
