"""The training and evaluation loops behind ``covpool train`` and ``covpool eval``.

One process or many under ``torchrun`` (DistributedDataParallel, gloo on CPU, nccl on CUDA); only rank
0 writes files and shows progress. A run lives in ``<output_dir>/<name>/``, locked while it runs:
``config.yaml``, ``best.pt`` then ``last.pt`` (written atomically every epoch, in that order, so ``best.pt``
is never older than what ``last.pt`` records), ``metrics.csv`` and ``curves.png``.

Resuming restores the model, EMA, optimizer, scheduler, GradScaler, the RNG states of every process and
the position in the epoch, so a resumed run computes what the uninterrupted one would have (same data
order, same augmentation draws, same updates). Ctrl-C, SIGTERM (torchrun, SLURM, Kubernetes) and SIGUSR1
(SLURM pre-emption) stop every process at the next step boundary and save first; a second Ctrl-C aborts
at once (:class:`TrainingAborted`).
"""
from __future__ import annotations

import csv
import io
import itertools
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from ._dist import (
    DistContext,
    DistributedFailure,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    dist_timeout_s,
    init_distributed,
    is_collective_failure,
    shutdown_distributed,
)
from ._io import atomic_write
from ._model import build_model, param_groups
from ._plot import plot_history
from ._schedule import BackendSchedule, checkpoint_epoch
from .checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    remove_stale_temp_files,
    rng_state,
    set_rng_state,
    with_checksums,
)
from .config import ConfigError, TrainConfig, config_diff, config_from_dict, config_to_dict, format_config_diff
from .data import build_datasets, build_loaders, num_classes_of

__all__ = ["DistributedFailure", "NonFiniteLossError", "RunExistsError", "RunLockedError", "TrainingAborted",
           "TrainResult", "train", "evaluate", "evaluate_model", "format_table"]

_AMP_DTYPES = MappingProxyType({"none": None, "bf16": torch.bfloat16, "fp16": torch.float16})
_CLIP_MODES = ("norm", "value", "agc")  # timm's dispatch_clip_grad
_CSV_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc1", "val_acc5", "ema_val_acc1", "lr",
               "epoch_time_s", "train_img_per_s", "backend")




def _interactive() -> bool:
    """Whether progress bars can redraw in place: tqdm writes to stderr, and a log file or pipe would get
    every carriage-return redraw as text."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before that step changed the weights."""


class RunExistsError(FileExistsError):
    """The run folder already holds a checkpoint and neither resume nor overwrite was asked for."""


class RunLockedError(RunExistsError):
    """Another live process is training in the same run folder."""


class _RunLock:
    """An advisory ``flock`` on ``<run folder>/.lock``, which names its holder. The kernel drops the lock
    when its process dies, so the lock of a killed run is taken over, never stale. Rank 0 holds it; the
    file is removed on release. Where ``fcntl`` is missing (Windows) runs are not locked."""

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


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; files are written by rank 0 only)."""

    run_dir: Path
    history: list[dict[str, float]]
    best_acc1: float
    best_epoch: int
    elapsed_s: float
    interrupted: bool = False
    model: nn.Module | None = field(default=None, repr=False)
    stop_signal: int | None = None  # the signal that stopped an interrupted run (SIGINT, SIGTERM, SIGUSR1)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}

    @property
    def exit_code(self) -> int:
        """0 for a finished run; 128 + the signal number for a stopped one, as shells report a run killed
        by that signal (130 for Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1 on Linux)."""
        if not self.interrupted:
            return 0
        return 128 + (self.stop_signal or int(signal.SIGINT))


def _amp_context(amp: str, device: torch.device):
    if amp not in _AMP_DTYPES:
        raise ConfigError(f"amp must be one of {', '.join(_AMP_DTYPES)}, got {amp!r}")
    dtype = _AMP_DTYPES[amp]
    if dtype is None:
        return nullcontext()
    if dtype is torch.float16 and device.type != "cuda":
        raise ConfigError("amp=fp16 needs CUDA (float16 autocast on the CPU is slow and unscaled); use amp=bf16")
    return torch.autocast(device_type=device.type, dtype=dtype)


def _compile_backend(compile: bool | str) -> str | None:
    """The torch.compile backend of ``compile=`` (true: inductor), or None; an unknown name raises."""
    if compile is False:
        return None
    if compile is True:
        return "inductor"
    valid = torch.compiler.list_backends(exclude_tags=())
    if compile not in valid:
        raise ConfigError(f"compile={compile!r} is not a torch.compile backend; use true (inductor), false, or one "
                          f"of {', '.join(valid)}")
    return compile


def _set_grad_checkpointing(model: nn.Module, name: str) -> None:
    if not callable(getattr(model, "set_grad_checkpointing", None)):
        raise ConfigError(f"model.grad_checkpointing=true: {name} ({type(model).__name__}) has no "
                          "set_grad_checkpointing (timm's models do); turn it off for this model")
    model.set_grad_checkpointing(True)


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last and images.dim() == 4 else images


def _accuracy(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == target[:, None]).any(dim=-1).sum()


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, ctx: DistContext, amp: str = "none", max_steps: int | None = None,
                   desc: str = "val", progress: bool = False, channels_last: bool = False) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) of ``model`` over ``loader``, summed over all processes."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss_sum, top1, top5, count
    total = len(loader) if max_steps is None else min(max_steps, len(loader))
    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
               disable=not (progress and ctx.is_main and _interactive()))
    for step, (images, target) in enumerate(loader):
        if step >= total:
            break
        images, target = _to_device(images, ctx.device, channels_last), target.to(ctx.device, non_blocking=True)
        with _amp_context(amp, ctx.device):
            logits = model(images)
        logits = logits.float()
        sums += torch.stack([F.cross_entropy(logits, target, reduction="sum"), _accuracy(logits, target, 1),
                             _accuracy(logits, target, 5), torch.tensor(float(len(target)), device=ctx.device)]
                            ).to(sums.dtype)
        bar.update()
    bar.close()
    all_reduce_sum(sums, ctx)
    model.train(was_training)
    loss_sum, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count,
            "count": int(count)}


def format_table(history: list[dict[str, float]]) -> str:
    """The per-epoch metrics as an aligned text table."""
    cols = [("epoch", "epoch", "{:.0f}"), ("train_loss", "train loss", "{:.4f}"), ("train_acc", "train acc%", "{:.2f}"),
            ("val_loss", "val loss", "{:.4f}"), ("val_acc1", "val acc%", "{:.2f}"), ("val_acc5", "val top5%", "{:.2f}"),
            ("epoch_time_s", "time s", "{:.1f}"), ("train_img_per_s", "img/s", "{:.0f}")]
    if any(r.get("ema_val_acc1") is not None and not math.isnan(r["ema_val_acc1"]) for r in history):
        cols.insert(6, ("ema_val_acc1", "EMA val%", "{:.2f}"))
    rows = [[head for _, head, _ in cols]]
    rows += [[fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in cols] for r in history]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _write_csv(history: list[dict[str, float]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode("utf-8")))


# Keys a resumed run cannot honour: the weights, the optimizer state or the label space would not fit
# (model.pretrained is irrelevant on resume: the checkpoint holds every weight).
_FIXED_ON_RESUME = ("model.", "data.dataset", "data.embedded_", "optim.opt")
_FREE_ON_RESUME = ("model.pretrained", "name", "output_dir")
# Model keys that leave the weights as they are: a resumed run takes the new value (and logs the change).
_CHANGEABLE_ON_RESUME = ("model.backend_schedule", "model.grad_checkpointing")
# Keys of the learning-rate schedule: rebuilt from the new config at the resumed global step.
_SCHEDULE_KEYS = ("epochs", "max_steps_per_epoch", "grad_accum_steps")


def _with_defaults(data: dict, defaults: dict) -> dict:
    out = dict(defaults)
    for key, value in data.items():
        both = isinstance(value, dict) and isinstance(defaults.get(key), dict) and key in ("model", "data", "optim")
        out[key] = _with_defaults(value, defaults[key]) if both else value
    return out


def _check_resume_config(stored: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """The changes between a checkpoint's config and this run's, after refusing those that cannot be
    honoured (raises :class:`ConfigError` listing them)."""
    # a key that did not exist when the checkpoint was written had its default value
    stored = _with_defaults(stored, config_to_dict(TrainConfig()))
    changes = {key: (old, new) for key, old, new in config_diff(stored, current) if not key.startswith(_FREE_ON_RESUME)}
    fixed = {k: v for k, v in changes.items()
             if k.startswith(_FIXED_ON_RESUME) and not k.startswith(_CHANGEABLE_ON_RESUME)}
    if fixed:
        listed = format_config_diff([(key, old, new) for key, (old, new) in fixed.items()])
        raise ConfigError(f"cannot resume with a different {', '.join(fixed)}: {listed}. The checkpoint's weights "
                          "and optimizer state belong to the old values; resume with them, or start a new run "
                          "that loads these weights with model.pretrained=<checkpoint> (and --overwrite or a new "
                          "name=)")
    return changes


def _stop_signals() -> tuple[signal.Signals, ...]:
    # SIGTERM: what torchrun, SLURM and Kubernetes send before killing; SIGUSR1: SLURM's pre-emption warning
    return tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class TrainingAborted(KeyboardInterrupt):
    """A second Ctrl-C aborted the run at once; the message says which checkpoint, if any, holds the work."""


class _StopFlag:
    """Handler of SIGINT, SIGTERM and SIGUSR1 that asks the loop to stop at the next step boundary (all
    processes agree on it and save); a second Ctrl-C aborts at once with :class:`TrainingAborted`."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise TrainingAborted
        if not self.requested:
            self.requested, self.signum = True, int(signum)

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in _stop_signals()}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _Trainer:
    """State of one run; :func:`train` is its public face."""

    def __init__(self, cfg: TrainConfig, resume: str | Path | bool | None, overwrite: bool) -> None:
        self.cfg = cfg
        self.ctx = init_distributed(cfg.device, cfg.dist_timeout)
        self.run_dir = Path(cfg.output_dir) / cfg.name
        self.amp_ctx = lambda: _amp_context(cfg.amp, self.ctx.device)
        self.amp_ctx()  # validate before any heavy work
        if cfg.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {cfg.epochs}")
        if cfg.clip_mode not in _CLIP_MODES:
            raise ConfigError(f"clip_mode must be one of {', '.join(_CLIP_MODES)}, got {cfg.clip_mode!r}")
        self.compile_backend = _compile_backend(cfg.compile)
        self.backends = BackendSchedule.from_config(cfg)  # model.backend_schedule, checked before heavy work
        self.lock = _RunLock(self.run_dir)
        self._lock_run_dir()
        try:
            self._build(resume, overwrite)
        except BaseException:
            self.lock.release()
            raise

    def _lock_run_dir(self) -> None:
        error = None
        if self.ctx.is_main:
            try:
                taken_over = self.lock.acquire()
                if taken_over:
                    tqdm.write(f"note: {self.run_dir} was locked by {taken_over}, which has ended; taking it over")
            except RunLockedError as err:
                error = str(err)
        if self.ctx.distributed:  # every process learns rank 0's verdict, so none waits in a collective
            error = all_gather_objects(error, self.ctx)[0]
        if error is not None:
            raise RunLockedError(error)

    def _build(self, resume, overwrite: bool) -> None:
        cfg = self.cfg
        checkpoint = self._resume_checkpoint(resume, overwrite)
        self.resume_changes: dict[str, tuple[Any, Any]] = {}
        model_cfg = cfg.model
        if checkpoint is not None:
            self.resume_changes = _check_resume_config(checkpoint["config"], config_to_dict(cfg))
            if model_cfg.pretrained:  # the checkpoint holds every weight: no download, no file needed
                model_cfg = replace(model_cfg, pretrained=False)
        _seed_all(cfg.seed)
        num_classes = cfg.model.num_classes or num_classes_of(cfg.data)
        model = build_model(model_cfg, num_classes)
        if cfg.model.grad_checkpointing:
            _set_grad_checkpointing(model, cfg.model.name)
        model = model.to(self.ctx.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.ctx.distributed:
            import covpool

            model = covpool.convert_sync_zca(model)
        self.model = model
        train_set, val_set = build_datasets(cfg.data, model, seed=cfg.seed)
        self.train_loader, self.val_loader = build_loaders(
            cfg.data, train_set, val_set, seed=cfg.seed, rank=self.ctx.rank, world_size=self.ctx.world_size,
            pin_memory=self.ctx.device.type == "cuda")
        # an optimizer step takes grad_accum_steps batches; the last step of an epoch may take fewer (as timm)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum_steps)
        if cfg.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)

        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        o = cfg.optim
        self.optimizer = create_optimizer_v2(
            model, opt=o.opt, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
            param_group_fn=lambda m: param_groups(m, o.weight_decay, o.head_lr_mult, o.layer_decay))
        for group in self.optimizer.param_groups:
            # timm's schedulers multiply lr_scale into the scheduled value of initial_lr, so initial_lr is the
            # unscaled rate (it defaulted to the scaled lr: the head trained at head_lr_mult squared)
            group["initial_lr"] = o.lr
            group["lr"] = o.lr * group["lr_scale"]
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=o.sched, num_epochs=cfg.epochs, decay_epochs=o.decay_epochs,
            decay_milestones=list(o.decay_milestones), decay_rate=o.decay_rate, min_lr=o.min_lr,
            warmup_lr=o.warmup_lr, warmup_epochs=o.warmup_epochs, step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch)
        from timm.utils import NativeScaler, dispatch_clip_grad

        self.scaler = NativeScaler("cuda") if cfg.amp == "fp16" else None
        self.clip = dispatch_clip_grad
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema_decay)
        self.mixup, self.criterion = self._loss(num_classes)
        self.ddp = model
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=ids)
        if self.compile_backend is not None:  # the training forward only: checkpoints and eval use the model
            self.ddp = torch.compile(self.ddp, backend=self.compile_backend)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.partial = [0.0, 0.0, 0.0]  # loss_sum, correct, count of the epoch in progress
        self.history: list[dict[str, float]] = []
        self.best_acc1, self.best_epoch = -1.0, 0
        if self.ctx.rank > 0:
            _seed_all(cfg.seed + 7919 * self.ctx.rank)  # different augmentation draws on every process
        if checkpoint is not None:
            self._restore(checkpoint)
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.global_step)
        if checkpoint is not None and self.ctx.is_main:
            self._log_resume(resume)

    def _resume_checkpoint(self, resume, overwrite: bool) -> dict | None:
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # what a killed atomic write left behind (covpool's own temporary names only)
            remove_stale_temp_files(self.run_dir, ("last.pt", "best.pt", "metrics.csv", "curves.png"))
            remove_stale_temp_files(self.run_dir, ("curves.png",), suffix=".png")  # covpool <= 0.1.0's name
        last = self.run_dir / "last.pt"
        if resume:
            path = last if resume is True else Path(resume)
            return load_checkpoint(path, map_location="cpu")
        if last.exists() and not overwrite:
            raise RunExistsError(f"{last} exists: continue it with --resume, start again with --overwrite, "
                                 "or pick another name=<run name>")
        return None

    def _loss(self, num_classes: int):
        cfg = self.cfg
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                          num_classes=num_classes)
            return mixup, SoftTargetCrossEntropy()
        return None, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    # -- checkpoints ------------------------------------------------------------------------------------
    def _state(self, rngs: list[dict]) -> dict[str, Any]:
        from covpool import __version__

        config = config_to_dict(self.cfg)
        return with_checksums({
            # timm's keys: timm.models.load_checkpoint(model, path, use_ema=True) reads them as they are
            "state_dict": self.model.state_dict(),
            "state_dict_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "arch": self.cfg.model.name,
            "args": config,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "partial": list(self.partial),
            "rng": rngs,
            "history": [dict(r) for r in self.history],
            "best_acc1": self.best_acc1,
            "best_epoch": self.best_epoch,
            "world_size": self.ctx.world_size,
            "config": config,  # the same object as "args": pickled once
            "covpool_version": __version__,
        })

    def _save(self, best: bool) -> None:
        # every process contributes its RNG state, so all of them resume their own augmentation stream
        rngs = all_gather_objects(rng_state(), self.ctx)
        if not self.ctx.is_main:
            return
        state = self._state(rngs)
        # best.pt first: a kill between the two writes leaves last.pt one epoch behind, which resume redoes
        # identically; the other order could leave best.pt older than what last.pt records as the best
        if best:
            atomic_save(state, self.run_dir / "best.pt")
        atomic_save(state, self.run_dir / "last.pt")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["state_dict"])
        if self.ema is not None:
            if ckpt.get("state_dict_ema") is None:
                warnings.warn("the checkpoint has no EMA weights; the EMA restarts from the current model",
                              stacklevel=2)
                self.ema.module.load_state_dict(ckpt["state_dict"])
            else:
                self.ema.module.load_state_dict(ckpt["state_dict_ema"])
        # The optimizer's state (momentum, Adam moments) comes from the checkpoint; its hyper-parameters
        # (lr, weight decay, momentum, head multiplier) and the whole schedule come from this run's config. A
        # timm scheduler is a function of the config and the global step, so it is rebuilt rather than
        # loaded: an unchanged config resumes exactly, a changed one (epochs=3 after epochs=1, a lower
        # optim.lr after a non-finite stop) takes effect from the resumed step.
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as err:
            raise ConfigError(f"cannot resume the optimizer state: {err} (the parameter groups changed; start "
                              "a new run with model.pretrained=<checkpoint> instead)") from err
        for group, hyper in zip(self.optimizer.param_groups, fresh):
            group.update(hyper)
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        # the position inside an epoch is a number of optimizer steps of batch_size x grad_accum_steps images
        for key in ("grad_accum_steps", "data.batch_size") if self.step_in_epoch else ():
            if key in self.resume_changes:
                old, new = self.resume_changes[key]
                raise ConfigError(f"cannot resume mid-epoch (step {self.step_in_epoch}) with {key} {old} -> {new}: "
                                  "the position in the epoch counts steps of data.batch_size x grad_accum_steps "
                                  f"images. Resume with {key}={old} and change it once the epoch is done")
        self.global_step = int(ckpt["global_step"])
        self.partial = [float(v) for v in ckpt["partial"]]
        self.history = [dict(r) for r in ckpt["history"]]
        self.best_acc1, self.best_epoch = float(ckpt["best_acc1"]), int(ckpt["best_epoch"])
        rngs = ckpt["rng"]
        if len(rngs) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank])
        else:
            warnings.warn(f"the checkpoint was written by {len(rngs)} processes, this run has "
                          f"{self.ctx.world_size}: weights and optimizer resume exactly, the data order and "
                          "augmentation draws do not", stacklevel=2)
            _seed_all(self.cfg.seed + 7919 * self.ctx.rank + self.global_step)

    def _log_resume(self, resume) -> None:
        source = self.run_dir / "last.pt" if resume is True else Path(resume)
        tqdm.write(f"resume: {source} at epoch {self.epoch + 1}, step {self.step_in_epoch} (global step "
                   f"{self.global_step})")
        if self.resume_changes:
            changes = format_config_diff([(key, old, new) for key, (old, new) in self.resume_changes.items()])
            rebuilt = [key for key in self.resume_changes if key in _SCHEDULE_KEYS or key.startswith("optim.")]
            tqdm.write(f"resume: config changed: {changes}" + (
                f"; optimizer hyper-parameters and scheduler rebuilt from the new config, continuing at global "
                f"step {self.global_step} of {self.steps_per_epoch * self.cfg.epochs} with lr {self._lr():.3g}"
                if rebuilt else ""))

    # -- loop --------------------------------------------------------------------------------------------
    def _lr(self) -> float:
        # the base rate: a group scaled by 0 (optim.head_lr_mult=0, a frozen head) does not tell it
        return max((g["lr"] / g["lr_scale"] for g in self.optimizer.param_groups if g["lr_scale"] > 0), default=0.0)

    def _forward(self, images: torch.Tensor, target: torch.Tensor):
        """Loss and correct count of one batch; a LinAlgError (eigh/svd refuse NaN/inf or hopelessly
        degenerate input) is returned instead of raised, so every process still takes part in the step."""
        ctx = self.ctx
        images = _to_device(images, ctx.device, self.cfg.channels_last)
        target = target.to(ctx.device, non_blocking=True)
        hard_target = target
        if self.mixup is not None:
            images, target = self.mixup(images, target)
        try:
            with self.amp_ctx():
                logits = self.ddp(images)
                loss = self.criterion(logits, target)
            return loss, (logits.detach().argmax(dim=-1) == hard_target).sum(), None
        except torch.linalg.LinAlgError as err:
            return torch.tensor(float("nan"), device=ctx.device), torch.zeros((), device=ctx.device), err

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler(loss, self.optimizer, need_update=False)  # timm's NativeScaler: scaled backward only
        else:
            loss.backward()

    def _train_step(self, images: list[torch.Tensor], target: list[torch.Tensor], stop: _StopFlag
                    ) -> tuple[float, float, bool]:
        """One optimizer step over the batches ``zip(images, target)`` (``grad_accum_steps`` of them, or fewer
        at the end of an epoch): the gradient of their mean loss, as one batch of them all would give."""
        cfg, ctx = self.cfg, self.ctx
        n = len(images)
        loss_sum, correct, failure = torch.zeros((), device=ctx.device), torch.zeros((), device=ctx.device), None
        for i, (images_i, target_i) in enumerate(zip(images, target)):
            # the gradients of all but the last batch stay local; DDP all-reduces once, in the last backward
            sync = nullcontext() if i == n - 1 or not ctx.distributed else self.ddp.no_sync()
            with sync:
                loss, hits, err = self._forward(images_i, target_i)
                failure = failure or err
                if i < n - 1 and err is None:
                    self._backward(loss / n)
            loss_sum, correct = loss_sum + loss.detach().float(), correct + hits
        # one all-reduce carries the loss, the accuracy and any rank's stop request, so every process
        # takes the same decision at the same step; a NaN from a LinAlgError or the products-only backends
        # ends in the same stop, agreed on by every process, before the last backward (DDP's all-reduce)
        requested = torch.tensor(float(stop.signum is not None), device=ctx.device)
        shared = all_reduce_sum(torch.stack([loss_sum / n, correct.float(), requested]), ctx)
        loss_sum_all, hits, stops = shared.tolist()
        stopping = self._agree_to_stop(stop, stops)
        loss_value = loss_sum_all / ctx.world_size
        if not math.isfinite(loss_value):
            last = self.run_dir / "last.pt"
            what = f"non-finite loss ({loss_value})"
            if failure is not None:
                first = str(failure).strip().splitlines()[0][:160] if str(failure).strip() else ""
                what = (f"non-finite or degenerate features reached the matrix decomposition "
                        f"({type(failure).__name__.lstrip('_')}: {first})")
            raise NonFiniteLossError(
                f"{what} at epoch {self.epoch + 1}, step {self.step_in_epoch + 1} of "
                f"{self.steps_per_epoch} (global step {self.global_step + 1}); stopped before updating the "
                "weights. " + (f"The last good checkpoint is {last}. " if last.exists() else "No checkpoint was "
                "written yet. ") + "Lower optim.lr, set clip_grad (e.g. clip_grad=1.0) or use amp=none.")
        if self.scaler is not None:
            self.scaler(loss / n, self.optimizer, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode,
                        parameters=self.model.parameters())
        else:
            (loss / n).backward()
            if cfg.clip_grad is not None:
                self.clip(self.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.global_step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        return loss_value, hits, stopping

    def _train_epoch(self, stop: _StopFlag) -> bool:
        """One (possibly resumed) epoch; returns False when a stop was requested mid-epoch."""
        cfg, ctx = self.cfg, self.ctx
        # the epoch's backend, also when resuming mid-epoch (the schedule is a function of the epoch only)
        self.backends.apply(self.epoch, [self.model, getattr(self.ema, "module", None)], announce=ctx.is_main)
        sampler = self.train_loader.sampler
        sampler.set_epoch(self.epoch)
        sampler.skip = self.step_in_epoch * cfg.data.batch_size * cfg.grad_accum_steps
        # workers draw their augmentation seeds from this generator: a function of (seed, epoch, rank) only
        self.train_loader.generator.manual_seed(cfg.seed * 1_000_003 + self.epoch * 7919 + ctx.rank)
        self.ddp.train()
        per_batch = cfg.data.batch_size * ctx.world_size
        show = cfg.progress and ctx.is_main
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   leave=False, dynamic_ncols=True, disable=not (show and _interactive()))
        # not a terminal (a log file, a pipe, SLURM's output): a plain line every log_interval steps instead
        every = cfg.log_interval if show and bar.disable else 0
        start, images_here = time.perf_counter(), 0
        batches = iter(self.train_loader)
        while self.step_in_epoch < self.steps_per_epoch:
            group = list(itertools.islice(batches, cfg.grad_accum_steps))
            if not group:
                break
            loss, correct, stop_now = self._train_step([b[0] for b in group], [b[1] for b in group], stop)
            batch = per_batch * len(group)
            self.step_in_epoch += 1
            images_here += batch
            self.partial[0] += loss * batch
            self.partial[1] += correct
            self.partial[2] += batch
            rate = images_here / max(time.perf_counter() - start, 1e-9)
            loss_avg, acc_avg = self.partial[0] / self.partial[2], 100 * self.partial[1] / self.partial[2]
            bar.set_postfix(loss=f"{loss_avg:.4f}", acc=f"{acc_avg:.1f}%", img_s=f"{rate:.0f}", lr=f"{self._lr():.2e}",
                            refresh=False)
            bar.update()
            if every and self.step_in_epoch % every == 0:
                tqdm.write(f"epoch {self.epoch + 1}/{cfg.epochs}  step {self.step_in_epoch}/{self.steps_per_epoch}  "
                           f"loss {loss_avg:.4f}  acc {acc_avg:.1f}%  {rate:.0f} img/s  lr {self._lr():.2e}")
            if stop_now and self.step_in_epoch < self.steps_per_epoch:
                bar.close()
                return False
        bar.close()
        self._epoch_time = time.perf_counter() - start
        self._epoch_rate = images_here / max(self._epoch_time, 1e-9)
        return True

    def _end_epoch(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        # the bare model, not the DDP wrapper: shards may differ by a batch, and DDP's forward is collective
        val = evaluate_model(self.model, self.val_loader, ctx, cfg.amp, cfg.max_val_steps,
                             desc=f"val {self.epoch + 1}/{cfg.epochs}", progress=cfg.progress,
                             channels_last=cfg.channels_last)
        ema_acc = float("nan")
        if self.ema is not None:
            ema_acc = evaluate_model(self.ema.module, self.val_loader, ctx, cfg.amp, cfg.max_val_steps,
                                     channels_last=cfg.channels_last)["acc1"]
        loss_sum, correct, count = self.partial
        row = {"epoch": self.epoch + 1, "train_loss": loss_sum / count, "train_acc": 100.0 * correct / count,
               "val_loss": val["loss"], "val_acc1": val["acc1"], "val_acc5": val["acc5"], "ema_val_acc1": ema_acc,
               "lr": self._lr(), "epoch_time_s": self._epoch_time, "train_img_per_s": self._epoch_rate}
        row["backend"] = self.backends.describe(self.model)
        self.history.append(row)
        is_best = val["acc1"] > self.best_acc1
        if is_best:
            self.best_acc1, self.best_epoch = val["acc1"], self.epoch + 1
        self.epoch, self.step_in_epoch, self.partial = self.epoch + 1, 0, [0.0, 0.0, 0.0]
        self._save(best=is_best)
        if ctx.is_main:
            self._write_outputs()
            ema = f"  ema val acc {ema_acc:.2f}%" if self.ema is not None else ""
            tqdm.write(f"epoch {row['epoch']}/{cfg.epochs}  train loss {row['train_loss']:.4f} "
                       f"acc {row['train_acc']:.2f}%  val loss {row['val_loss']:.4f} acc {row['val_acc1']:.2f}% "
                       f"(top-5 {row['val_acc5']:.2f}%){ema}  {row['epoch_time_s']:.1f}s "
                       f"{row['train_img_per_s']:.0f} img/s" + ("  *best*" if is_best else ""))

    def _write_outputs(self, only_if_stale: bool = False) -> None:
        """metrics.csv and curves.png from the history (rank 0). ``only_if_stale``: only when a kill left
        metrics.csv behind the checkpoint it belongs to, or curves.png missing."""
        csv_path, png_path = self.run_dir / "metrics.csv", self.run_dir / "curves.png"
        if only_if_stale and csv_path.is_file() and png_path.is_file():
            with open(csv_path, newline="") as f:
                if sum(1 for _ in csv.DictReader(f)) == len(self.history):
                    return
        _write_csv(self.history, csv_path)
        plot_history(self.history, png_path, title=f"{self.cfg.name}: {self.cfg.model.name}")

    def _agree_to_stop(self, stop: _StopFlag, stops: float) -> bool:
        """Whether any process was signalled (``stops``, summed over processes, is the same number on every
        one); if so, a process that was not takes the signal of one that was (the largest number), so every
        process reports the same exit code."""
        if not stops:
            return False
        signum = all_reduce_max(torch.tensor(float(stop.signum or 0), device=self.ctx.device), self.ctx)
        if stop.signum is None:
            received = int(signum.item())
            stop.signum = received if received in {int(s) for s in _stop_signals()} else int(signal.SIGTERM)
        return True

    def _stopped_during_set_up(self, stop: _StopFlag) -> bool:
        requested = torch.tensor(float(stop.signum is not None), device=self.ctx.device)
        return self._agree_to_stop(stop, all_reduce_sum(requested, self.ctx).item())

    def run(self, stop: _StopFlag) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            if self.history:
                self._write_outputs(only_if_stale=True)
        start = time.perf_counter()
        interrupted = self._stopped_during_set_up(stop)
        if interrupted and ctx.is_main:
            tqdm.write(f"stopped by {signal.Signals(stop.signum).name} during set-up: nothing trained, no checkpoint "
                       "written" + (" (the resumed one is unchanged)" if self.global_step else ""))
        while not interrupted and self.epoch < cfg.epochs:
            if not self._train_epoch(stop):
                interrupted = True
                self._save(best=False)
                if ctx.is_main:
                    tqdm.write(f"stopped by {signal.Signals(stop.signum).name} at epoch {self.epoch + 1}, step "
                               f"{self.step_in_epoch}: saved {self.run_dir / 'last.pt'}; continue with --resume")
                break
            self._end_epoch()
        elapsed = time.perf_counter() - start
        if ctx.is_main and not interrupted and self.history:
            tqdm.write(format_table(self.history))
            tqdm.write(f"best val acc {self.best_acc1:.2f}% at epoch {self.best_epoch}; outputs in {self.run_dir}/ "
                       "(last.pt, best.pt, metrics.csv, curves.png)")
        return TrainResult(self.run_dir, self.history, self.best_acc1, self.best_epoch, elapsed, interrupted,
                           self.model, stop.signum if interrupted else None)


def train(cfg: TrainConfig, resume: str | Path | bool | None = None, overwrite: bool = False) -> TrainResult:
    """Train ``cfg`` (see :class:`~covpool.train.config.TrainConfig`) and return its history.

    Args:
        cfg: the run's configuration.
        resume: ``True`` continues ``<output_dir>/<name>/last.pt``; a path continues that checkpoint.
        overwrite: start afresh even if the run folder already holds a checkpoint.

    Raises:
        RunExistsError: the run folder holds ``last.pt`` and neither ``resume`` nor ``overwrite`` is set.
        RunLockedError: another live process trains in the same run folder (a subclass of RunExistsError).
        CheckpointError: the checkpoint to resume is empty, foreign or damaged.
        TrainingAborted: a second Ctrl-C (the message says which checkpoint holds the work).
        DistributedFailure: under torchrun, a collective timed out (``dist_timeout`` seconds, 600 by default)
            or lost a peer; the message names the ranks and the last checkpoint.
        NonFiniteLossError: the loss became NaN/inf (the message names the step; the last good
            checkpoint is kept).
        DatasetNotFoundError: the data set's root is missing (the message shows the expected layout).
    """
    run_dir = Path(cfg.output_dir) / cfg.name
    with _StopFlag().installed() as stop:
        try:
            trainer = _Trainer(cfg, resume, overwrite)
        except TrainingAborted:
            raise TrainingAborted(f"aborted by a second Ctrl-C during set-up; {_saved_work(run_dir)}") from None
        except RuntimeError as err:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and is_collective_failure(err):
                raise _collective_failure(err, cfg, run_dir) from err
            raise
        clean = False
        try:
            result = trainer.run(stop)
            clean = True
            return result
        except TrainingAborted:
            raise TrainingAborted(f"aborted by a second Ctrl-C; {_saved_work(run_dir)}") from None
        except RuntimeError as err:
            if trainer.ctx.distributed and is_collective_failure(err):
                raise _collective_failure(err, cfg, run_dir) from err
            raise
        finally:
            trainer.lock.release()
            shutdown_distributed(trainer.ctx, clean)


def _collective_failure(err: RuntimeError, cfg: TrainConfig, run_dir: Path) -> DistributedFailure:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    others = f"rank {1 - rank}" if world == 2 else f"one of the other {world - 1} processes"
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    saved = _saved_work(run_dir)
    return DistributedFailure(
        f"rank {rank} of {world}: a collective operation failed within dist_timeout="
        f"{dist_timeout_s(cfg.dist_timeout):g} s ({first}); {others} is frozen or died (see its "
        f"log). {saved[0].upper()}{saved[1:]}. If steps legitimately take longer, "
        "raise dist_timeout=<seconds> (or COVPOOL_DIST_TIMEOUT).")


def _saved_work(run_dir: Path) -> str:
    last = run_dir / "last.pt"
    if not last.is_file():
        return "no checkpoint was written"
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
        return (f"{last} holds epoch {state['epoch']}, step {state['step_in_epoch']} (global step "
                f"{state['global_step']}); continue with --resume")
    except Exception:  # whatever is there, the abort message must not fail
        return f"{last} holds the last saved state; continue with --resume"


def evaluate(checkpoint: str | Path, cfg: TrainConfig | None = None, use_ema: bool = False) -> dict[str, float]:
    """Evaluate a checkpoint on its config's validation set (``cfg`` overrides the stored config)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = cfg or config_from_dict(ckpt["config"], where=f" (stored in {checkpoint})")
    ctx = init_distributed(cfg.device, cfg.dist_timeout)
    num_classes = cfg.model.num_classes or num_classes_of(cfg.data)
    model_cfg = cfg.model
    if isinstance(model_cfg.pretrained, str) or model_cfg.pretrained:
        model_cfg = replace(model_cfg, pretrained=False)  # the checkpoint holds every weight
    model = build_model(model_cfg, num_classes).to(ctx.device)
    key = "state_dict_ema" if use_ema else "state_dict"
    if ckpt.get(key) is None:
        raise CheckpointError(f"{checkpoint} has no EMA weights ({key!r}): they are stored only when the run used "
                              "ema=true; evaluate the model's own weights without --ema")
    model.load_state_dict(ckpt[key])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    BackendSchedule.from_config(cfg).apply(checkpoint_epoch(ckpt), [model], announce=False)
    _, val_set = build_datasets(cfg.data, model, seed=cfg.seed)
    _, val_loader = build_loaders(cfg.data, val_set, val_set, seed=cfg.seed, rank=ctx.rank,
                                  world_size=ctx.world_size)
    clean = False
    try:
        metrics = evaluate_model(model, val_loader, ctx, cfg.amp, cfg.max_val_steps, progress=cfg.progress,
                                 channels_last=cfg.channels_last)
        clean = True
        return metrics
    finally:
        shutdown_distributed(ctx, clean)
