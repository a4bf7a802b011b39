"""The training loop behind ``covpool train``: set-up, then epochs of optimizer steps.

One process or many under ``torchrun`` (DistributedDataParallel, gloo on CPU, nccl on CUDA); only rank 0
writes files and logs. What surrounds the loop lives in rooms of its own, each taking only what it needs:
the config checks made before anything is built (:mod:`covpool.train.config_checks`), the run folder (lock,
the checkpoint to continue, best before last, the summary files: ``_run_folder``), the resume policy with
the run's :class:`~covpool.train._resume.Progress` (``_resume``), the stop protocol (``_stop``), the seeds
(``_seed``), the optimizer, schedule and loss (``_optim``), evaluation (:mod:`covpool.train.evaluation`) and
what a run reports, from its start-up header to its final table (:mod:`covpool.train.summary`).

Resuming restores the model, EMA, optimizer, GradScaler, the RNG states of every process and the position
in the epoch, so a resumed run computes what the uninterrupted one would have (same data order, same
augmentation draws, same updates). Ctrl-C, SIGTERM and SIGUSR1 stop every process at the next step boundary
and save first; a second Ctrl-C aborts at once (:class:`~covpool.train._stop.TrainingAborted`).
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..outputs import console_logging, first_line, moved_names
from ..precision import amp_mode
from . import summary
from ._dist import (
    all_gather_objects,
    all_reduce_sum,
    collective_failure,
    dist_timeout_s,
    init_distributed,
    is_collective_failure,
    shutdown_distributed,
)
from ._model import BuiltModel, make_model, set_grad_checkpointing
from ._optim import make_loss, make_optimizer, make_scheduler
from ._resume import Progress, check_resume_config, describe_resume, restore_weights, resume_progress, training_state
from ._run_folder import RunFolder, saved_work
from ._schedule import BackendSchedule
from ._seed import loader_seed, process_seed, seed_everything
from ._stop import StopFlag, TrainingAborted, agree_to_stop, signal_name, stopped_during_set_up
from .checkpoint import Checkpoint, rng_state, set_rng_state, with_checksums
from .config import ConfigError, TrainConfig, config_to_dict
from .config_checks import check_config
from .data import ResumableSampler, Splits, build_train_loader, build_val_loader, check_class_lists, open_datasets
from .evaluation import evaluate_model, interactive, to_device

__all__ = ["NonFiniteLossError", "TrainResult", "train"]

_log = logging.getLogger(__name__)
# the start-up header has a logger of its own, so a program that runs many short trainings (covpool demo) can
# silence it alone: logging.getLogger("covpool.train.header").setLevel(logging.WARNING)
_header_log = logging.getLogger("covpool.train.header")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before that step changed the weights."""


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; files are written by rank 0 only).

    Attributes:
        run_dir: the run's folder (``cfg.run_dir``): checkpoints, ``config.yaml``, ``metrics.csv``, ``curves.png``.
        history: one row per epoch trained, the columns of ``metrics.csv`` (``epoch``, ``train_loss``,
            ``val_acc1``, ..., numbers, and ``backend``, the square-root backend's label).
        best_acc1: the best validation top-1 accuracy (%), of the epoch ``best.pt`` holds.
        best_epoch: that epoch (1-based; 0 before any epoch ended).
        elapsed_s: seconds this call spent training (set-up excluded).
        interrupted: a signal stopped the run before its last epoch (``last.pt`` holds the work).
        model: the trained model, bare (not wrapped by DDP or compiled), on the run's device.
        stop_signal: the signal that stopped an interrupted run (SIGINT, SIGTERM or SIGUSR1); None otherwise.
    """

    run_dir: Path
    history: list[dict[str, Any]]
    best_acc1: float
    best_epoch: int
    elapsed_s: float
    interrupted: bool = False
    model: nn.Module | None = field(default=None, repr=False)
    stop_signal: int | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's row of :attr:`history` (empty when no epoch ended)."""
        return self.history[-1] if self.history else {}

    @property
    def exit_code(self) -> int:
        """0 for a finished run; 128 + the signal number for a stopped one, as shells report a run killed
        by that signal (130 for Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1 on Linux)."""
        if not self.interrupted:
            return 0
        return 128 + (self.stop_signal or int(signal.SIGINT))


def _num_classes(cfg: TrainConfig, data: Splits) -> int:
    """The classifier's size: ``model.num_classes``, or the data set's class count; fewer outputs than the data
    set has classes would fail at the first loss, after everything is set up."""
    found = len(data.classes)
    if cfg.model.num_classes is None:
        return found
    if cfg.model.num_classes < found:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but data set {cfg.data.dataset!r} has {found} "
                          f"classes (labels up to {found - 1}); leave model.num_classes=null to take the data's")
    return cfg.model.num_classes


class _Trainer:
    """One run: set up from the config and the checkpoint it continues, then :meth:`run`."""

    def __init__(self, cfg: TrainConfig, resume: str | Path | bool | Checkpoint | None, overwrite: bool) -> None:
        self.cfg = cfg
        self.ctx = init_distributed(cfg.device, cfg.dist_timeout)
        self.folder = RunFolder(cfg.run_dir, self.ctx)
        self.folder.open()
        try:
            self._set_up(resume, overwrite)
        except BaseException:
            self.folder.release()
            raise

    def _set_up(self, resume: str | Path | bool | Checkpoint | None, overwrite: bool) -> None:
        cfg, ctx = self.cfg, self.ctx
        checkpoint = self.folder.checkpoint_to_resume(resume, overwrite)
        changes = check_resume_config(checkpoint.config, cfg) if checkpoint is not None else {}
        seed_everything(cfg.seed)
        # the data first: a wrong root, layout or class list is reported before any weight is downloaded
        data = open_datasets(cfg.data, ("train", "val"), seed=cfg.seed)
        self.classes = data.classes
        if checkpoint is not None and checkpoint.class_names is not None:
            check_class_lists(checkpoint.class_names, data.classes, f"the checkpoint {checkpoint.path} and "
                              f"data set {cfg.data.dataset!r} (data.root={cfg.data.root})",
                              "resume on the data the run was trained on")
        num_classes = _num_classes(cfg, data)
        built = make_model(cfg.model, num_classes, for_checkpoint=checkpoint is not None, img_size=cfg.data.img_size)
        model = built.model
        set_grad_checkpointing(model, cfg.model)
        model = model.to(ctx.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if ctx.distributed:
            import covpool

            model = covpool.convert_sync_zca(model)
        self.model = model
        pin = ctx.device.type == "cuda"
        data.set_transforms(cfg.data, model)
        train_set, val_set = data["train"], data["val"]
        self.train_loader = build_train_loader(cfg.data, train_set, cfg.seed, ctx.rank, ctx.world_size, pin)
        self.val_loader = build_val_loader(cfg.data, val_set, ctx.rank, ctx.world_size, pin)
        # an optimizer step takes grad_accum_steps batches; the last step of an epoch may take fewer (as timm)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum_steps)
        if cfg.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.optimizer = make_optimizer(model, cfg.optim)
        self.scheduler = make_scheduler(self.optimizer, cfg.optim, cfg.epochs, self.steps_per_epoch)
        from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad

        self.amp = amp_mode(cfg.amp)
        self.scaler = NativeScaler("cuda") if self.amp.scaled else None
        self.clip = dispatch_clip_grad
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
        self.mixup, self.criterion = make_loss(cfg.mixup, cfg.cutmix, cfg.label_smoothing, num_classes)
        # what the training step calls: the model, wrapped by DDP under torchrun and compiled with `compile`;
        # checkpoints, evaluation and the EMA use the bare model
        self.training_module: nn.Module = model
        # DDP's no_sync() (gradients kept local) for all but the last batch of an accumulated step
        self.ddp: DistributedDataParallel | None = None
        if ctx.distributed:
            self.training_module = self.ddp = DistributedDataParallel(
                model, device_ids=[ctx.device.index] if pin else None)
        if cfg.compile is not False:
            compiled = torch.compile(self.training_module, backend="inductor" if cfg.compile is True else cfg.compile)
            # torch.compile of a Module is an OptimizedModule (a Module); its stub says a plain callable
            assert isinstance(compiled, nn.Module)
            self.training_module = compiled
        self.backends = BackendSchedule(cfg.model.backend_schedule, cfg.epochs)
        self.progress = Progress()
        if ctx.rank > 0:
            seed_everything(process_seed(cfg.seed, ctx.rank))  # different augmentation draws on every process
        if ctx.is_main:
            self._header(built, data, checkpoint)
        if checkpoint is not None:
            self._resume(checkpoint, changes)
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.progress.global_step)
        if checkpoint is not None and ctx.is_main:
            describe_resume(checkpoint.path, self.progress, checkpoint.state, changes, ctx.world_size,
                            self.steps_per_epoch * cfg.epochs, self._lr())

    def _header(self, built: BuiltModel, data: Splits, checkpoint: Checkpoint | None) -> None:
        """What timm's train.py logs before the first step: the model, its size and head, where its weights
        come from, the data, the device and the learning rate of each parameter group."""
        cfg, ctx, model = self.cfg, self.ctx, self.model
        for line in summary.start_up_header(cfg, model, built, data, checkpoint, self.optimizer,
                                            self.steps_per_epoch, self.backends.describe(model), ctx.device,
                                            ctx.world_size):
            _header_log.info(line)

    def _resume(self, checkpoint: Checkpoint, changes: dict) -> None:
        ctx = self.ctx
        restore_weights(checkpoint.state, self.model, getattr(self.ema, "module", None), self.optimizer,
                        self.scaler)
        self.progress = resume_progress(checkpoint.state, changes, ctx.world_size, self.steps_per_epoch)
        rngs = checkpoint.state["rng"]
        if len(rngs) == ctx.world_size:
            set_rng_state(rngs[ctx.rank])
        else:
            warnings.warn(f"the checkpoint was written by {len(rngs)} processes, this run has "
                          f"{ctx.world_size}: weights, optimizer and the position in the run resume exactly, the "
                          "data order and augmentation draws do not", stacklevel=3)
            seed_everything(process_seed(self.cfg.seed, ctx.rank, self.progress.global_step))

    # -- the loop --------------------------------------------------------------------------------------------
    def _lr(self) -> float:
        # the base rate: a group scaled by 0 (optim.head_lr_mult=0, a frozen head) does not tell it
        return max((g["lr"] / g["lr_scale"] for g in self.optimizer.param_groups if g["lr_scale"] > 0), default=0.0)

    def _forward(self, images: torch.Tensor, target: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.linalg.LinAlgError | None]:
        """Loss and correct count of one batch; a LinAlgError (eigh/svd refuse NaN/inf or hopelessly
        degenerate input) is returned instead of raised, so every process still takes part in the step."""
        ctx = self.ctx
        images = to_device(images, ctx.device, self.cfg.channels_last)
        target = target.to(ctx.device, non_blocking=True)
        hard_target = target
        if self.mixup is not None:
            images, target = self.mixup(images, target)
        try:
            with self.amp.autocast(ctx.device):
                logits = self.training_module(images)
                loss = self.criterion(logits, target)
            return loss, (logits.detach().argmax(dim=-1) == hard_target).sum(), None
        except torch.linalg.LinAlgError as err:
            return torch.tensor(float("nan"), device=ctx.device), torch.zeros((), device=ctx.device), err

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler(loss, self.optimizer, need_update=False)  # timm's NativeScaler: scaled backward only
        else:
            loss.backward()

    def _non_finite(self, loss_value: float, failure: BaseException | None) -> NonFiniteLossError:
        p, last = self.progress, self.folder.last
        what = f"non-finite loss ({loss_value})"
        if failure is not None:
            what = (f"non-finite or degenerate features reached the matrix decomposition "
                    f"({type(failure).__name__.lstrip('_')}: {first_line(failure)})")
        return NonFiniteLossError(
            f"{what} at epoch {p.epoch + 1}, step {p.step_in_epoch + 1} of {self.steps_per_epoch} (global step "
            f"{p.global_step + 1}); stopped before updating the weights. " + (
                f"The last good checkpoint is {last}. " if last.exists() else "No checkpoint was written yet. ")
            + "Lower optim.lr, set clip_grad (e.g. clip_grad=1.0) or use amp=none.")

    def _train_step(self, images: list[torch.Tensor], target: list[torch.Tensor], stop: StopFlag
                    ) -> tuple[float, float, bool]:
        """One optimizer step over the batches ``zip(images, target)`` (``grad_accum_steps`` of them, or fewer
        at the end of an epoch): the gradient of their mean loss, as one batch of them all would give."""
        cfg, ctx = self.cfg, self.ctx
        n = len(images)
        loss_sum, correct, failure = torch.zeros((), device=ctx.device), torch.zeros((), device=ctx.device), None
        for i, (images_i, target_i) in enumerate(zip(images, target)):
            # the gradients of all but the last batch stay local; DDP all-reduces once, in the last backward
            sync = nullcontext() if i == n - 1 or self.ddp is None else self.ddp.no_sync()
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
        stopping = agree_to_stop(stop, stops, ctx)
        loss_value = loss_sum_all / ctx.world_size
        if not math.isfinite(loss_value):
            raise self._non_finite(loss_value, failure)
        if self.scaler is not None:
            self.scaler(loss / n, self.optimizer, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode,
                        parameters=self.model.parameters())
        else:
            (loss / n).backward()
            if cfg.clip_grad is not None:
                self.clip(self.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.global_step += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.progress.global_step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.global_step)
        return loss_value, hits, stopping

    def _train_epoch(self, stop: StopFlag) -> bool:
        """One (possibly resumed) epoch; returns False when a stop was requested mid-epoch."""
        cfg, ctx, p = self.cfg, self.ctx, self.progress
        # the epoch's backend, also when resuming mid-epoch (the schedule is a function of the epoch only)
        self.backends.apply(p.epoch, [self.model, getattr(self.ema, "module", None)], announce=ctx.is_main)
        sampler = self.train_loader.sampler
        assert isinstance(sampler, ResumableSampler)  # build_train_loader's
        sampler.set_epoch(p.epoch)
        sampler.skip = p.step_in_epoch * cfg.data.batch_size * cfg.grad_accum_steps
        # workers draw their augmentation seeds from this generator: a function of (seed, epoch, rank) only
        self.train_loader.generator.manual_seed(loader_seed(cfg.seed, p.epoch, ctx.rank))
        self.training_module.train()
        per_batch = cfg.data.batch_size * ctx.world_size
        show = cfg.progress and ctx.is_main
        bar = tqdm(total=self.steps_per_epoch, initial=p.step_in_epoch, desc=f"epoch {p.epoch + 1}/{cfg.epochs}",
                   leave=False, dynamic_ncols=True, disable=not (show and interactive()))
        # not a terminal (a log file, a pipe, SLURM's output): a plain line every log_interval steps instead
        every = cfg.log_interval if show and bar.disable else 0
        start, images_here = time.perf_counter(), 0
        batches = iter(self.train_loader)
        while p.step_in_epoch < self.steps_per_epoch:
            group = list(itertools.islice(batches, cfg.grad_accum_steps))
            if not group:
                break
            loss, correct, stop_now = self._train_step([b[0] for b in group], [b[1] for b in group], stop)
            batch = per_batch * len(group)
            p.add_step(loss, correct, batch)
            images_here += batch
            rate = images_here / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{p.train_loss:.4f}", acc=f"{p.train_acc:.1f}%", img_s=f"{rate:.0f}",
                            lr=f"{self._lr():.2e}", refresh=False)
            bar.update()
            if every and p.step_in_epoch % every == 0:
                _log.info(f"epoch {p.epoch + 1}/{cfg.epochs}  step {p.step_in_epoch}/{self.steps_per_epoch}  "
                          f"loss {p.train_loss:.4f}  acc {p.train_acc:.1f}%  {rate:.0f} img/s  lr {self._lr():.2e}")
            if stop_now and p.step_in_epoch < self.steps_per_epoch:
                bar.close()
                return False
        bar.close()
        self._epoch_time = time.perf_counter() - start
        self._epoch_rate = images_here / max(self._epoch_time, 1e-9)
        return True

    def _end_epoch(self) -> None:
        cfg, ctx, p = self.cfg, self.ctx, self.progress
        # the bare model, not the DDP wrapper: shards may differ by a batch, and DDP's forward is collective
        val = evaluate_model(self.model, self.val_loader, ctx, cfg.amp, cfg.max_val_steps,
                             desc=f"val {p.epoch + 1}/{cfg.epochs}", progress=cfg.progress,
                             channels_last=cfg.channels_last)
        ema_acc = float("nan")
        if self.ema is not None:
            ema_acc = evaluate_model(self.ema.module, self.val_loader, ctx, cfg.amp, cfg.max_val_steps,
                                     channels_last=cfg.channels_last)["acc1"]
        row = {"epoch": p.epoch + 1, "train_loss": p.train_loss, "train_acc": p.train_acc,
               "val_loss": val["loss"], "val_acc1": val["acc1"], "val_acc5": val["acc5"], "ema_val_acc1": ema_acc,
               "lr": self._lr(), "epoch_time_s": self._epoch_time, "train_img_per_s": self._epoch_rate,
               "backend": self.backends.describe(self.model)}
        is_best = p.end_epoch(row)
        self._save(best=is_best)
        if ctx.is_main:
            self.folder.write_summary(p.history, self._title())
            _log.info(summary.epoch_line(row, cfg.epochs, is_best, ema=self.ema is not None))

    def _title(self) -> str:
        """The curves' title: run, model, and the head and backend(s) the history records."""
        model = self.cfg.model
        parts = [model.name] + ([f"head {model.head}"] if model.swap_pooling else [])
        backends = list(dict.fromkeys(r["backend"] for r in self.progress.history if r.get("backend")))
        if backends:
            parts.append("backend " + " -> ".join(backends))
        return f"{self.cfg.name}: {', '.join(parts)}"

    def _save(self, best: bool) -> None:
        # every process contributes its RNG state, so all of them resume their own augmentation stream
        rngs = all_gather_objects(rng_state(), self.ctx)
        if self.ctx.is_main:
            self.folder.save(with_checksums(training_state(
                self.cfg, self.progress, self.model, getattr(self.ema, "module", None), self.optimizer,
                self.scheduler, self.scaler, rngs, self.ctx.world_size, self.classes)), best)

    def run(self, stop: StopFlag) -> TrainResult:
        cfg, ctx, p = self.cfg, self.ctx, self.progress
        if ctx.is_main:
            self.folder.write_config(config_to_dict(cfg))
            if p.history:
                self.folder.write_summary(p.history, self._title(), only_if_stale=True)
        start = time.perf_counter()
        interrupted = stopped_during_set_up(stop, ctx)
        if interrupted and ctx.is_main:
            _log.info(f"stopped by {signal_name(stop.signum)} during set-up: nothing trained, no checkpoint "
                      "written" + (" (the resumed one is unchanged)" if p.global_step else ""))
        while not interrupted and p.epoch < cfg.epochs:
            if not self._train_epoch(stop):
                interrupted = True
                self._save(best=False)
                if ctx.is_main:
                    _log.info(f"stopped by {signal_name(stop.signum)} at epoch {p.epoch + 1}, step "
                              f"{p.step_in_epoch}: saved {self.folder.last}; continue with --resume")
                break
            self._end_epoch()
        elapsed = time.perf_counter() - start
        if ctx.is_main and not interrupted and p.history:
            _log.info(summary.format_history(p.history))
            _log.info(f"best val acc {p.best_acc1:.2f}% at epoch {p.best_epoch}; outputs in {self.folder.path}/ "
                      f"({self.folder.last.name}, {self.folder.best.name}, metrics.csv, curves.png)")
        return TrainResult(self.folder.path, p.history, p.best_acc1, p.best_epoch, elapsed, interrupted,
                           self.model, stop.signum if interrupted else None)


def train(cfg: TrainConfig, resume: str | Path | bool | Checkpoint | None = None, overwrite: bool = False
          ) -> TrainResult:
    """Train ``cfg`` (see :class:`~covpool.train.config.TrainConfig`) and return its history.

    Args:
        cfg: the run's configuration; checked first (:func:`covpool.train.check_config`).
        resume: ``True`` continues ``<output_dir>/<name>/last.pt`` (in ``cfg.run_dir``); a path, or a
            :class:`~covpool.train.checkpoint.Checkpoint` already read, continues that checkpoint.
        overwrite: start afresh even if the run folder already holds a checkpoint.

    Raises:
        ConfigError: a mistake in ``cfg`` (before anything is built), or a resume with changes it cannot honour.
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
    check_config(cfg)
    run_dir = cfg.run_dir

    def failure(err: RuntimeError) -> BaseException:
        return collective_failure(err, dist_timeout_s(cfg.dist_timeout), saved_work(run_dir))

    with console_logging(), StopFlag().installed() as stop:
        try:
            trainer = _Trainer(cfg, resume, overwrite)
        except TrainingAborted:
            raise TrainingAborted(f"aborted by a second Ctrl-C during set-up; {saved_work(run_dir)}") from None
        except RuntimeError as err:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and is_collective_failure(err):
                raise failure(err) from err
            raise
        clean = False
        try:
            result = trainer.run(stop)
            clean = True
            return result
        except TrainingAborted:
            raise TrainingAborted(f"aborted by a second Ctrl-C; {saved_work(run_dir)}") from None
        except RuntimeError as err:
            if trainer.ctx.distributed and is_collective_failure(err):
                raise failure(err) from err
            raise
        finally:
            trainer.folder.release()
            shutdown_distributed(trainer.ctx, clean)


# Names that moved out of this module, kept for one release (evaluate_model and TrainingAborted, which the loop
# uses, are still imported here).
__getattr__ = moved_names(__name__, {
    "evaluate": ("covpool.train.evaluation:evaluate", "covpool.train.evaluate"),
    "format_table": ("covpool.train.summary:format_history", "covpool.train.summary.format_history"),
    "RunExistsError": ("covpool.train._run_folder:RunExistsError", "covpool.train.RunExistsError"),
    "RunLockedError": ("covpool.train._run_folder:RunLockedError", "covpool.train.RunLockedError"),
    "DistributedFailure": ("covpool.train._dist:DistributedFailure", "covpool.train.DistributedFailure"),
    "start_up_header": "covpool.train.summary:start_up_header",
})
