"""What a run reports: its start-up header, ``metrics.csv`` (one row per epoch), ``curves.png``, a line per epoch
and the final table.

The header (:func:`start_up_header`) describes the run before its first step, as timm's ``train.py`` does; the
rest is made from the run's history, a list of per-epoch rows with the keys of :data:`METRICS_FIELDS`; the
files are written through :mod:`covpool.outputs` (atomically). ``covpool demo`` draws its comparison with
:func:`plot_curves` too.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..outputs import format_table, new_figure, save_figure, write_csv
from ._model import BuiltModel, head_modules

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .config import TrainConfig
    from .data import Splits

__all__ = ["METRICS_FIELDS", "write_metrics", "plot_curves", "format_history", "epoch_line", "start_up_header"]

#: the columns of metrics.csv
METRICS_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc1", "val_acc5", "ema_val_acc1", "lr",
                  "epoch_time_s", "train_img_per_s", "backend")

# the final table's columns: key -> (header, format)
_TABLE = {"epoch": ("epoch", "{:.0f}"), "train_loss": ("train loss", "{:.4f}"), "train_acc": ("train acc%", "{:.2f}"),
          "val_loss": ("val loss", "{:.4f}"), "val_acc1": ("val acc%", "{:.2f}"), "val_acc5": ("val top5%", "{:.2f}"),
          "ema_val_acc1": ("EMA val%", "{:.2f}"), "epoch_time_s": ("time s", "{:.1f}"),
          "train_img_per_s": ("img/s", "{:.0f}")}


def write_metrics(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """``history`` (a run's per-epoch rows) as a CSV file at ``path`` (a run's ``metrics.csv``), written atomically:
    one row per epoch, the columns of :data:`METRICS_FIELDS`; returns the path."""
    return write_csv(history, path, METRICS_FIELDS)


def _has_ema(history: Sequence[Mapping[str, Any]]) -> bool:
    return any(r.get("ema_val_acc1") is not None and not math.isnan(r["ema_val_acc1"]) for r in history)


def format_history(history: Sequence[Mapping[str, Any]]) -> str:
    """A run's ``history`` (its per-epoch rows, the keys of :data:`METRICS_FIELDS`) as an aligned text table (the
    EMA column only for runs that keep one)."""
    columns = [key for key in _TABLE if key != "ema_val_acc1" or _has_ema(history)]
    return format_table(history, columns, headers={k: h for k, (h, _) in _TABLE.items()},
                        formats={k: f for k, (_, f) in _TABLE.items()})


def epoch_line(row: Mapping[str, Any], epochs: int, is_best: bool, ema: bool) -> str:
    """The summary line a run prints at the end of an epoch.

    Args:
        row: the epoch's row of the history (the keys of :data:`METRICS_FIELDS`).
        epochs: the run's number of epochs (``epoch 3/10``).
        is_best: mark the line ``*best*`` (the epoch that ``best.pt`` now holds).
        ema: add the EMA weights' validation accuracy (``ema_val_acc1``).
    """
    ema_text = f"  ema val acc {row['ema_val_acc1']:.2f}%" if ema else ""
    return (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}%  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc1']:.2f}% (top-5 {row['val_acc5']:.2f}%){ema_text}  "
            f"{row['epoch_time_s']:.1f}s {row['train_img_per_s']:.0f} img/s" + ("  *best*" if is_best else ""))


def plot_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str = "") -> Path:
    """One figure, two panels (loss, accuracy %), a train (dashed) and val (solid) line per run, and the EMA
    weights' validation accuracy (dotted) for runs that keep an EMA; the epoch axis has whole-epoch ticks.

    ``runs`` maps a label to its per-epoch rows (``epoch``, ``train_loss``, ``val_loss``, ``train_acc``,
    ``val_acc1``, optionally ``ema_val_acc1``), as in ``metrics.csv``; one run needs no label
    (``{"": history}``). The figure is written atomically as a PNG file at ``path``, with ``title`` above the
    panels (none when empty); returns the path."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure((10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i}"
        epochs = [r["epoch"] for r in rows]
        prefix = f"{label} " if len(runs) > 1 else ""
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], "--", color=color, label=f"{prefix}train")
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], "-o", color=color, label=f"{prefix}val")
        ax_acc.plot(epochs, [r["train_acc"] for r in rows], "--", color=color, label=f"{prefix}train")
        ax_acc.plot(epochs, [r["val_acc1"] for r in rows], "-o", color=color, label=f"{prefix}val")
        if _has_ema(rows):
            ax_acc.plot(epochs, [r.get("ema_val_acc1", math.nan) for r in rows], ":s", color=color,
                        label=f"{prefix}EMA val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    last = max((r["epoch"] for rows in runs.values() for r in rows), default=1)
    for ax in (ax_loss, ax_acc):
        # min_n_ticks=1: with fewer than two whole epochs in view, MaxNLocator would fall back to fractions
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(0.5, last + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    # fixed margins: tight_layout would draw the figure twice, which costs more than the plot itself
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.86 if title else 0.92, wspace=0.22)
    return save_figure(fig, path, dpi=90)


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def _lr_per_group(groups: list[dict[str, Any]]) -> str:
    """``backbone 0.01, backbone, no decay 0.01, head 0.05, ...``; with layer-wise decay (many groups) the
    range of each kind instead."""
    named = [(g.get("name", f"group {i}"), g["lr"]) for i, g in enumerate(groups)]
    if len(named) <= 6:
        return ", ".join(f"{name} {lr:.3g}" for name, lr in named)
    kinds: dict[str, list[float]] = {}
    for name, lr in named:
        kinds.setdefault(name, []).append(lr)
    return ", ".join(f"{name} {min(lrs):.3g}" + (f" to {max(lrs):.3g} ({len(lrs)} groups)" if len(lrs) > 1 else "")
                     for name, lrs in kinds.items())


def start_up_header(cfg: TrainConfig, model: nn.Module, built: BuiltModel, data: Splits, checkpoint: Checkpoint | None,
                    optimizer: torch.optim.Optimizer, steps_per_epoch: int, backend: str, device: torch.device,
                    world_size: int) -> list[str]:
    """The lines a run logs before its first step (rank 0), as timm's train.py does: the model, its parameter
    counts and head, where its weights come from and which modules are new, the data, the device and the
    schedule, and the learning rate of each parameter group.

    Args:
        cfg: the run's config.
        model: the model as it will train (on its device, before any DDP wrapper).
        built: the model as built, with where its weights came from and which modules are new.
        data: the run's data sets (their sizes and class count).
        checkpoint: the checkpoint the run resumes, or None for a fresh run.
        optimizer: the run's optimizer, whose parameter groups' ``name`` and ``lr`` are listed.
        steps_per_epoch: optimizer steps per epoch.
        backend: the label of the model's square-root backend(s) (``""``: none).
        device: the device the run trains on.
        world_size: the number of processes (``torchrun``), which multiplies the images per step.
    """
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pooling = [n for n, m in head_modules(model).items() if not isinstance(m, nn.Linear)]
    if cfg.model.swap_pooling:
        head = f"second-order head {cfg.model.head!r} (model.swap_pooling)"
    elif pooling:
        head = f"covpool's second-order head ({', '.join(pooling)})"
    else:
        head = "the model's own head"
    head += f", square-root backend {backend}" if backend else ""
    weights = f"resumed from {checkpoint.path}" if checkpoint is not None else built.weights
    if checkpoint is None and built.new:
        weights += f"; new (re-initialised): {', '.join(built.new)}"
    where = f" at {cfg.data.root}" if cfg.data.root else ""
    per_step = cfg.data.batch_size * world_size * cfg.grad_accum_steps
    how = f"batch {cfg.data.batch_size} x {_plural(world_size, 'process', 'processes')}" + (
        f" x {cfg.grad_accum_steps} accumulated" if cfg.grad_accum_steps > 1 else "")
    groups = _lr_per_group(optimizer.param_groups)
    return [
        f"model: {cfg.model.name} ({type(model).__name__}), {_millions(total)} parameters "
        f"({_millions(trainable)} trainable); {head}",
        f"weights: {weights}",
        f"data: {cfg.data.dataset}{where}: {data.describe()}; input {cfg.data.img_size}x{cfg.data.img_size}",
        f"device: {device}, amp {cfg.amp}; {_plural(cfg.epochs, 'epoch')} of {_plural(steps_per_epoch, 'step')}, "
        f"{per_step} images per step ({how})",
        f"optimizer: {cfg.optim.opt}, {cfg.optim.sched} schedule, weight decay {cfg.optim.weight_decay:g}; lr per "
        f"parameter group: {groups}",
    ]
