"""The optimisation recipe of a run, from its config: timm's optimizer with covpool's parameter groups, timm's
scheduler stepped per optimizer step, and the loss (with timm's mixup/cutmix when asked)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ._model import param_groups
from .config import OptimConfig

if TYPE_CHECKING:
    from timm.data import Mixup
    from timm.scheduler.scheduler import Scheduler

__all__ = ["make_optimizer", "make_scheduler", "make_loss"]


def make_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over :func:`~covpool.train._model.param_groups` (no decay on biases and
    norms, ``head_lr_mult`` on the new head, ``layer_decay``)."""
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(
        model, opt=o.opt, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
        param_group_fn=lambda m: param_groups(m, o.weight_decay, o.head_lr_mult, o.layer_decay))
    for group in optimizer.param_groups:
        # timm's schedulers multiply lr_scale into the scheduled value of initial_lr, so initial_lr is the
        # unscaled rate (it defaulted to the scaled lr: the head trained at head_lr_mult squared)
        group["initial_lr"] = o.lr
        group["lr"] = o.lr * group["lr_scale"]
    return optimizer


def make_scheduler(optimizer: torch.optim.Optimizer, o: OptimConfig, epochs: int, steps_per_epoch: int
                   ) -> Scheduler | None:
    """timm's ``create_scheduler_v2`` for ``optimizer``, stepped after every optimizer step
    (``steps_per_epoch`` of them an epoch); timm's own checks of the options raise AssertionError or
    ValueError (e.g. ``rsqrt`` needs a long enough run); None for ``sched=none``."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer, sched=o.sched, num_epochs=epochs, decay_epochs=o.decay_epochs,
        decay_milestones=list(o.decay_milestones), decay_rate=o.decay_rate, min_lr=o.min_lr,
        # timm annotates warmup_epochs as an int, but multiplies it by updates_per_epoch: a fraction works
        warmup_lr=o.warmup_lr, warmup_epochs=o.warmup_epochs,  # type: ignore[arg-type]
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch)
    return scheduler


def make_loss(mixup: float, cutmix: float, label_smoothing: float, num_classes: int
              ) -> tuple[Mixup | None, nn.Module]:
    """timm's mixup/cutmix and its soft-target loss, or plain cross-entropy; (mixup or None, criterion)."""
    if mixup > 0 or cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        return (Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes),
                SoftTargetCrossEntropy())
    return None, nn.CrossEntropyLoss(label_smoothing=label_smoothing)
