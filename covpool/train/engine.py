"""The training and evaluation loops behind ``covpool train`` and ``covpool eval``.

One process or many under ``torchrun`` (DistributedDataParallel, gloo on CPU, nccl on CUDA); only rank
0 writes files and shows progress bars. A run lives in ``<output_dir>/<name>/``: ``config.yaml``,
``last.pt`` and ``best.pt`` (written atomically every epoch), ``metrics.csv`` and ``curves.png``.

Resuming restores the model, EMA, optimizer, scheduler, GradScaler, the RNG states of every process and
the position in the epoch, so a resumed run computes what the uninterrupted one would have (same data
order, same augmentation draws, same updates). Ctrl-C stops at the next step boundary and saves first;
a second Ctrl-C aborts at once.
"""
from __future__ import annotations

import csv
import io
import math
import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from ._dist import DistContext, all_gather_objects, all_reduce_sum, init_distributed, shutdown_distributed
from ._model import build_model, param_groups
from ._plot import plot_history
from ._schedule import BackendSchedule, checkpoint_epoch
from .checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from .config import ConfigError, TrainConfig, config_from_dict, config_to_dict
from .data import build_datasets, build_loaders, num_classes_of

__all__ = ["NonFiniteLossError", "RunExistsError", "TrainResult", "train", "evaluate", "evaluate_model",
           "format_table"]

_AMP_DTYPES = MappingProxyType({"none": None, "bf16": torch.bfloat16, "fp16": torch.float16})
_CSV_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc1", "val_acc5", "ema_val_acc1", "lr",
               "epoch_time_s", "train_img_per_s", "backend")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before that step changed the weights."""


class RunExistsError(FileExistsError):
    """The run folder already holds a checkpoint and neither resume nor overwrite was asked for."""


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

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def _amp_context(amp: str, device: torch.device):
    if amp not in _AMP_DTYPES:
        raise ConfigError(f"amp must be one of {', '.join(_AMP_DTYPES)}, got {amp!r}")
    dtype = _AMP_DTYPES[amp]
    if dtype is None:
        return nullcontext()
    if dtype is torch.float16 and device.type != "cuda":
        raise ConfigError("amp=fp16 needs CUDA (float16 autocast on the CPU is slow and unscaled); use amp=bf16")
    return torch.autocast(device_type=device.type, dtype=dtype)


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _accuracy(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == target[:, None]).any(dim=-1).sum()


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, ctx: DistContext, amp: str = "none", max_steps: int | None = None,
                   desc: str = "val", progress: bool = False) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) of ``model`` over ``loader``, summed over all processes."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss_sum, top1, top5, count
    total = len(loader) if max_steps is None else min(max_steps, len(loader))
    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not (progress and ctx.is_main))
    for step, (images, target) in enumerate(loader):
        if step >= total:
            break
        images, target = images.to(ctx.device, non_blocking=True), target.to(ctx.device, non_blocking=True)
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


class _StopFlag:
    """SIGINT handler that asks the loop to stop at the next step boundary; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class _Trainer:
    """State of one run; :func:`train` is its public face."""

    def __init__(self, cfg: TrainConfig, resume: str | Path | bool | None, overwrite: bool) -> None:
        self.cfg = cfg
        self.ctx = init_distributed(cfg.device)
        self.run_dir = Path(cfg.output_dir) / cfg.name
        self.amp_ctx = lambda: _amp_context(cfg.amp, self.ctx.device)
        self.amp_ctx()  # validate before any heavy work
        if cfg.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {cfg.epochs}")
        self.backends = BackendSchedule.from_config(cfg)  # model.backend_schedule, checked before heavy work

        checkpoint = self._resume_checkpoint(resume, overwrite)
        _seed_all(cfg.seed)
        num_classes = cfg.model.num_classes or num_classes_of(cfg.data)
        model = build_model(cfg.model, num_classes).to(self.ctx.device)
        if self.ctx.distributed:
            import covpool

            model = covpool.convert_sync_zca(model)
        self.model = model
        train_set, val_set = build_datasets(cfg.data, model, seed=cfg.seed)
        self.train_loader, self.val_loader = build_loaders(
            cfg.data, train_set, val_set, seed=cfg.seed, rank=self.ctx.rank, world_size=self.ctx.world_size,
            pin_memory=self.ctx.device.type == "cuda")
        self.steps_per_epoch = len(self.train_loader)
        if cfg.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)

        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        o = cfg.optim
        self.optimizer = create_optimizer_v2(
            model, opt=o.opt, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
            param_group_fn=lambda m: param_groups(m, o.weight_decay, o.head_lr_mult))
        for group in self.optimizer.param_groups:
            group["lr"] = o.lr * group["lr_scale"]
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=o.sched, num_epochs=cfg.epochs, decay_epochs=o.decay_epochs,
            decay_milestones=list(o.decay_milestones), decay_rate=o.decay_rate, min_lr=o.min_lr,
            warmup_lr=o.warmup_lr, warmup_epochs=o.warmup_epochs, step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
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

    def _resume_checkpoint(self, resume, overwrite: bool) -> dict | None:
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

        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
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
            "config": config_to_dict(self.cfg),
            "covpool_version": __version__,
        }

    def _save(self, best: bool) -> None:
        # every process contributes its RNG state, so all of them resume their own augmentation stream
        rngs = all_gather_objects(rng_state(), self.ctx)
        if not self.ctx.is_main:
            return
        state = self._state(rngs)
        atomic_save(state, self.run_dir / "last.pt")
        if best:
            atomic_save(state, self.run_dir / "best.pt")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                warnings.warn("the checkpoint has no EMA weights; the EMA restarts from the current model")
                self.ema.module.load_state_dict(ckpt["model"])
            else:
                self.ema.module.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
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
                          "augmentation draws do not")
            _seed_all(self.cfg.seed + 7919 * self.ctx.rank + self.global_step)

    # -- loop --------------------------------------------------------------------------------------------
    def _lr(self) -> float:
        return max(g["lr"] / g["lr_scale"] for g in self.optimizer.param_groups)

    def _train_step(self, images: torch.Tensor, target: torch.Tensor, stop: _StopFlag) -> tuple[float, float, bool]:
        cfg, ctx = self.cfg, self.ctx
        images, target = images.to(ctx.device, non_blocking=True), target.to(ctx.device, non_blocking=True)
        hard_target = target
        if self.mixup is not None:
            images, target = self.mixup(images, target)
        with self.amp_ctx():
            logits = self.ddp(images)
            loss = self.criterion(logits, target)
        correct = (logits.detach().argmax(dim=-1) == hard_target).sum()
        # one all-reduce carries the loss, the accuracy and any rank's stop request, so every process
        # takes the same decision at the same step
        shared = torch.stack([loss.detach().float(), correct.float(),
                              torch.tensor(float(stop.requested), device=ctx.device)])
        all_reduce_sum(shared, ctx)
        loss_value = shared[0].item() / ctx.world_size
        if not math.isfinite(loss_value):
            last = self.run_dir / "last.pt"
            raise NonFiniteLossError(
                f"non-finite loss ({loss_value}) at epoch {self.epoch + 1}, step {self.step_in_epoch + 1} of "
                f"{self.steps_per_epoch} (global step {self.global_step + 1}); stopped before updating the "
                "weights. " + (f"The last good checkpoint is {last}. " if last.exists() else "No checkpoint was "
                "written yet. ") + "Lower optim.lr, set clip_grad (e.g. clip_grad=1.0) or use amp=none.")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if cfg.clip_grad is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.global_step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        return loss_value, shared[1].item(), shared[2].item() > 0

    def _train_epoch(self, stop: _StopFlag) -> bool:
        """One (possibly resumed) epoch; returns False when a stop was requested mid-epoch."""
        cfg, ctx = self.cfg, self.ctx
        # the epoch's backend, also when resuming mid-epoch (the schedule is a function of the epoch only)
        self.backends.apply(self.epoch, [self.model, getattr(self.ema, "module", None)], announce=ctx.is_main)
        sampler = self.train_loader.sampler
        sampler.set_epoch(self.epoch)
        sampler.skip = self.step_in_epoch * cfg.data.batch_size
        # workers draw their augmentation seeds from this generator: a function of (seed, epoch, rank) only
        self.train_loader.generator.manual_seed(cfg.seed * 1_000_003 + self.epoch * 7919 + ctx.rank)
        self.ddp.train()
        batch = cfg.data.batch_size * ctx.world_size
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   leave=False, dynamic_ncols=True, disable=not (cfg.progress and ctx.is_main))
        start, done_here = time.perf_counter(), 0
        for images, target in self.train_loader:
            if self.step_in_epoch >= self.steps_per_epoch:
                break
            loss, correct, stop_now = self._train_step(images, target, stop)
            self.step_in_epoch += 1
            done_here += 1
            self.partial[0] += loss * batch
            self.partial[1] += correct
            self.partial[2] += batch
            rate = done_here * batch / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{self.partial[0] / self.partial[2]:.4f}",
                            acc=f"{100 * self.partial[1] / self.partial[2]:.1f}%", img_s=f"{rate:.0f}",
                            lr=f"{self._lr():.2e}", refresh=False)
            bar.update()
            if stop_now and self.step_in_epoch < self.steps_per_epoch:
                bar.close()
                return False
        bar.close()
        self._epoch_time = time.perf_counter() - start
        self._epoch_rate = done_here * batch / max(self._epoch_time, 1e-9)
        return True

    def _end_epoch(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        # the bare model, not the DDP wrapper: shards may differ by a batch, and DDP's forward is collective
        val = evaluate_model(self.model, self.val_loader, ctx, cfg.amp, cfg.max_val_steps,
                             desc=f"val {self.epoch + 1}/{cfg.epochs}", progress=cfg.progress)
        ema_acc = float("nan")
        if self.ema is not None:
            ema_acc = evaluate_model(self.ema.module, self.val_loader, ctx, cfg.amp, cfg.max_val_steps)["acc1"]
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
            _write_csv(self.history, self.run_dir / "metrics.csv")
            plot_history(self.history, self.run_dir / "curves.png", title=f"{cfg.name}: {cfg.model.name}")
            ema = f"  ema val acc {ema_acc:.2f}%" if self.ema is not None else ""
            tqdm.write(f"epoch {row['epoch']}/{cfg.epochs}  train loss {row['train_loss']:.4f} "
                       f"acc {row['train_acc']:.2f}%  val loss {row['val_loss']:.4f} acc {row['val_acc1']:.2f}% "
                       f"(top-5 {row['val_acc5']:.2f}%){ema}  {row['epoch_time_s']:.1f}s "
                       f"{row['train_img_per_s']:.0f} img/s" + ("  *best*" if is_best else ""))

    def run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        start = time.perf_counter()
        interrupted = False
        with _StopFlag().installed() as stop:
            while self.epoch < cfg.epochs:
                if not self._train_epoch(stop):
                    interrupted = True
                    self._save(best=False)
                    if ctx.is_main:
                        tqdm.write(f"interrupted at epoch {self.epoch + 1}, step {self.step_in_epoch}: saved "
                                   f"{self.run_dir / 'last.pt'}; continue with --resume")
                    break
                self._end_epoch()
        elapsed = time.perf_counter() - start
        if ctx.is_main and not interrupted and self.history:
            tqdm.write(format_table(self.history))
            tqdm.write(f"best val acc {self.best_acc1:.2f}% at epoch {self.best_epoch}; outputs in {self.run_dir}/ "
                       "(last.pt, best.pt, metrics.csv, curves.png)")
        return TrainResult(self.run_dir, self.history, self.best_acc1, self.best_epoch, elapsed, interrupted,
                           self.model)


def train(cfg: TrainConfig, resume: str | Path | bool | None = None, overwrite: bool = False) -> TrainResult:
    """Train ``cfg`` (see :class:`~covpool.train.config.TrainConfig`) and return its history.

    Args:
        cfg: the run's configuration.
        resume: ``True`` continues ``<output_dir>/<name>/last.pt``; a path continues that checkpoint.
        overwrite: start afresh even if the run folder already holds a checkpoint.

    Raises:
        RunExistsError: the run folder holds ``last.pt`` and neither ``resume`` nor ``overwrite`` is set.
        NonFiniteLossError: the loss became NaN/inf (the message names the step; the last good
            checkpoint is kept).
        DatasetNotFoundError: the data set's root is missing (the message shows the expected layout).
    """
    trainer = _Trainer(cfg, resume, overwrite)
    try:
        return trainer.run()
    finally:
        shutdown_distributed(trainer.ctx)


def evaluate(checkpoint: str | Path, cfg: TrainConfig | None = None, use_ema: bool = False) -> dict[str, float]:
    """Evaluate a checkpoint on its config's validation set (``cfg`` overrides the stored config)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = cfg or config_from_dict(ckpt["config"], where=f" (stored in {checkpoint})")
    ctx = init_distributed(cfg.device)
    num_classes = cfg.model.num_classes or num_classes_of(cfg.data)
    model_cfg = cfg.model
    if isinstance(model_cfg.pretrained, str) or model_cfg.pretrained:
        from dataclasses import replace

        model_cfg = replace(model_cfg, pretrained=False)  # the checkpoint holds every weight
    model = build_model(model_cfg, num_classes).to(ctx.device)
    key = "ema" if use_ema else "model"
    if ckpt.get(key) is None:
        raise ValueError(f"{checkpoint} has no {key!r} weights (EMA is stored only when the run used ema=true)")
    model.load_state_dict(ckpt[key])
    BackendSchedule.from_config(cfg).apply(checkpoint_epoch(ckpt), [model], announce=False)
    _, val_set = build_datasets(cfg.data, model, seed=cfg.seed)
    _, val_loader = build_loaders(cfg.data, val_set, val_set, seed=cfg.seed, rank=ctx.rank,
                                  world_size=ctx.world_size)
    try:
        return evaluate_model(model, val_loader, ctx, cfg.amp, cfg.max_val_steps, progress=cfg.progress)
    finally:
        shutdown_distributed(ctx)
