"""A run's folder, ``<output_dir>/<name>/``: who holds it, which checkpoint a run continues, and what it writes.

Rank 0 locks the folder (``.lock``, :class:`RunLock`) and writes every file, each atomically: ``config.yaml``,
``best.pt`` then ``last.pt`` (in that order, so ``best.pt`` is never older than what ``last.pt`` records),
``metrics.csv`` and ``curves.png``. The other processes only read the checkpoint they continue.
"""
from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from ..outputs import atomic_write, remove_leftover_temporaries
from ._dist import DistContext, all_gather_objects
from .checkpoint import BEST, LAST, Checkpoint, atomic_save
from .summary import plot_curves, write_metrics

__all__ = ["RunExistsError", "RunLockedError", "RunLock", "RunFolder", "saved_work"]

_log = logging.getLogger(__name__)

_CONFIG, _METRICS, _CURVES = "config.yaml", "metrics.csv", "curves.png"


class RunExistsError(FileExistsError):
    """The run folder already holds a checkpoint and neither resume nor overwrite was asked for."""


class RunLockedError(RunExistsError):
    """Another live process is training in the same run folder."""


class RunLock:
    """An advisory ``flock`` on ``<run folder>/.lock``, which names its holder. The kernel drops the lock
    when its process dies, so the lock of a killed run is taken over, never stale. The file is removed on
    release. Where ``fcntl`` is missing (Windows) runs are not locked."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns the previous holder's description when a dead process had left it,
        raises :class:`RunLockedError` when a live one holds it."""
        try:
            import fcntl
        except ImportError:
            return None
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunLockedError(f"run folder {self.path.parent} is in use by a run in progress ({holder}); "
                                     "wait for it to end, or pick another name=<run name>") from None
            except OSError as err:  # a file system without locks (some NFS set-ups): run, but say so
                os.close(fd)
                self.path.unlink(missing_ok=True)
                warnings.warn(f"cannot lock {self.path} ({err}); nothing stops a second run from using the same "
                              "folder at the same time", stacklevel=2)
                return None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file that its last holder removed between our open and our lock
                break
            os.close(fd)
        previous = os.read(fd, 200).decode(errors="replace").strip()
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return previous or None

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        self.path.unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def saved_work(run_dir: Path) -> str:
    """Which checkpoint holds a stopped run's work, for the message of an abort or a failure (it reads the
    counters of ``last.pt`` as it is now; whatever is there, this does not fail).

    The file is mapped (``mmap=True``), not read: unpickling it touches the pages of the small entries, not
    those of every weight, which a full read of a large model's checkpoint (model, EMA, optimizer) would."""
    last = run_dir / LAST
    if not last.is_file():
        return "no checkpoint was written"
    try:
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        return (f"{last} holds epoch {state['epoch']}, step {state['step_in_epoch']} (global step "
                f"{state['global_step']}); continue with --resume")
    except Exception:  # whatever is there, the abort message must not fail
        return f"{last} holds the last saved state; continue with --resume"


class RunFolder:
    """The folder of one run, held while the run lives (:meth:`open` ... :meth:`release`).

    Args:
        path: ``<output_dir>/<name>``.
        ctx: the processes of the run; rank 0 holds the lock and writes, every process learns its verdict.
    """

    def __init__(self, path: Path, ctx: DistContext) -> None:
        self.path = path
        self.ctx = ctx
        self.lock = RunLock(path)

    @property
    def last(self) -> Path:
        """The checkpoint of the run's latest state, which ``--resume`` continues."""
        return self.path / LAST

    @property
    def best(self) -> Path:
        """The checkpoint of the run's best epoch."""
        return self.path / BEST

    def open(self) -> None:
        """Lock the folder (rank 0) and remove the temporary files of a killed write; every process
        raises :class:`RunLockedError` when another live run holds it."""
        error = None
        if self.ctx.is_main:
            try:
                taken_over = self.lock.acquire()
                if taken_over:
                    _log.info(f"note: {self.path} was locked by {taken_over}, which has ended; taking it over")
            except RunLockedError as err:
                error = str(err)
        if self.ctx.distributed:  # every process learns rank 0's verdict, so none waits in a collective
            error = all_gather_objects(error, self.ctx)[0]
        if error is not None:
            raise RunLockedError(error)
        if self.ctx.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            for name in (_CONFIG, LAST, BEST, _METRICS, _CURVES):  # what a killed write of one left behind
                remove_leftover_temporaries(self.path / name)

    def release(self) -> None:
        self.lock.release()

    def checkpoint_to_resume(self, resume: str | Path | bool | Checkpoint | None, overwrite: bool
                             ) -> Checkpoint | None:
        """The checkpoint a run continues, read once: ``True`` is the folder's ``last.pt``, a path or a
        :class:`Checkpoint` another one; None starts afresh, which a folder holding ``last.pt`` refuses
        (:class:`RunExistsError`) unless ``overwrite``."""
        if isinstance(resume, Checkpoint):
            return resume
        if resume:
            return Checkpoint.read(self.last if resume is True else resume)
        if self.last.exists() and not overwrite:
            raise RunExistsError(f"{self.last} exists: continue it with --resume, start again with --overwrite, "
                                 "or pick another name=<run name>")
        return None

    def save(self, state: dict[str, Any], best: bool) -> None:
        """``best.pt`` (when ``best``) then ``last.pt``: a kill between the two writes leaves ``last.pt`` one
        epoch behind, which resume redoes identically; the other order could leave ``best.pt`` older than
        what ``last.pt`` records as the best."""
        if best:
            atomic_save(state, self.best)
        atomic_save(state, self.last)

    def write_config(self, config: Mapping[str, Any]) -> None:
        """``config.yaml``: the run's config as YAML, keys in schema order."""
        text = yaml.safe_dump(dict(config), sort_keys=False)
        atomic_write(self.path / _CONFIG, lambda f: f.write(text.encode("utf-8")))

    def write_summary(self, history: Sequence[Mapping], title: str, only_if_stale: bool = False) -> None:
        """``metrics.csv`` and ``curves.png`` from the history. ``only_if_stale``: only when a kill left
        ``metrics.csv`` behind the checkpoint it belongs to, or ``curves.png`` missing."""
        csv_path, png_path = self.path / _METRICS, self.path / _CURVES
        if only_if_stale and csv_path.is_file() and png_path.is_file():
            with open(csv_path, newline="") as f:
                if sum(1 for _ in csv.DictReader(f)) == len(history):
                    return
        write_metrics(history, csv_path)
        plot_curves({"": history}, png_path, title=title)

