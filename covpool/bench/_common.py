"""What both benchmarks share: their error, the wait for the device, and the line that stamps a page with when,
where and how its figures were measured."""
from __future__ import annotations

import datetime
import shlex
from collections.abc import Sequence

import torch

from ..outputs import cpu_description

__all__ = ["BenchError", "machine_stamp", "synchronize"]


class BenchError(ValueError):
    """A benchmark that cannot run as asked: a model that cannot be measured, or one that cannot take a training
    step at the requested batch and image size. The message names the model and what to change."""


def machine_stamp(command: Sequence[str], device: str | torch.device | None = None) -> str:
    """One line saying when, on what and by which command figures were measured: the date, the CPU
    (:func:`covpool.outputs.cpu_description`) and torch's CPU threads, the GPU (its name, ``none``, or ``not
    used`` when ``device`` is not a CUDA device), the torch version and ``command`` (the argument list,
    quoted as a shell needs it), so that re-measuring is re-running the command.

    >>> machine_stamp(["covpool", "bench", "--out", "my bench"]).endswith("by `covpool bench --out 'my bench'`.")
    True
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device if device.type == "cuda" else None)
        gpu += "" if device.type == "cuda" else " (not used)"
    else:
        gpu = "none"
    return (f"Measured {datetime.date.today().isoformat()} on {cpu_description()}, {torch.get_num_threads()} torch "
            f"threads, GPU: {gpu}, torch {torch.__version__}, by `{shlex.join(command)}`.")


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously; the CPU does not), so a clock read after
    it times the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
