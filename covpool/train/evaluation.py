"""Evaluation: a model's loss and accuracy on a loader (:func:`evaluate_model`, what a run does after each
epoch), and ``covpool eval``'s :func:`evaluate` of a checkpoint on its config's validation set."""
from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..outputs import console_logging
from ._dist import DistContext, all_reduce_sum, init_distributed, shutdown_distributed
from ._model import build_model
from ._schedule import BackendSchedule, checkpoint_epoch
from .checkpoint import Checkpoint, CheckpointError
from .config import TrainConfig, config_from_dict
from .data import build_dataset, build_val_loader, num_classes_of
from .validate import check_config, check_same_model

__all__ = ["autocast", "to_device", "interactive", "evaluate_model", "evaluate"]

_AMP_DTYPES = MappingProxyType({"none": None, "bf16": torch.bfloat16, "fp16": torch.float16})


def autocast(amp: str, device: torch.device):
    """The autocast region of config ``amp`` (``none``, ``bf16``, ``fp16``) on ``device``."""
    dtype = _AMP_DTYPES[amp]
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """``images`` on ``device`` (without waiting for the copy), in NHWC layout when ``channels_last``."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last and images.dim() == 4 else images


def interactive() -> bool:
    """Whether progress bars can redraw in place: tqdm writes to stderr, and a log file or pipe would get
    every carriage-return redraw as text."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
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
               disable=not (progress and ctx.is_main and interactive()))
    for step, (images, target) in enumerate(loader):
        if step >= total:
            break
        images, target = to_device(images, ctx.device, channels_last), target.to(ctx.device, non_blocking=True)
        with autocast(amp, ctx.device):
            logits = model(images)
        logits = logits.float()
        sums += torch.stack([F.cross_entropy(logits, target, reduction="sum"), _correct(logits, target, 1),
                             _correct(logits, target, 5), torch.tensor(float(len(target)), device=ctx.device)]
                            ).to(sums.dtype)
        bar.update()
    bar.close()
    all_reduce_sum(sums, ctx)
    model.train(was_training)
    loss_sum, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count,
            "count": int(count)}


def evaluate(checkpoint: str | Path | Checkpoint, cfg: TrainConfig | None = None, use_ema: bool = False
             ) -> dict[str, float]:
    """Evaluate a checkpoint (a path, or a :class:`~covpool.train.checkpoint.Checkpoint` already read) on its
    config's validation set; ``cfg`` replaces the stored config, and must describe the same model. Only the
    model and the validation set are built.

    Raises:
        ConfigError: ``cfg`` (or the stored config) has a mistake, or describes another model.
        CheckpointError: the file is damaged or foreign, or ``use_ema`` and it holds no EMA weights.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.read(checkpoint)
    if cfg is None:
        cfg = config_from_dict(ckpt.config, where=f" (stored in {ckpt.path})")
    else:
        check_same_model(ckpt.config, cfg, ckpt.path)
    check_config(cfg)
    key = "state_dict_ema" if use_ema else "state_dict"
    if ckpt.state.get(key) is None:
        raise CheckpointError(f"{ckpt.path} has no EMA weights ({key!r}): they are stored only when the run used "
                              "ema=true; evaluate the model's own weights without --ema")
    with console_logging():
        ctx = init_distributed(cfg.device, cfg.dist_timeout)
        clean = False
        try:
            model = build_model(cfg.model, cfg.model.num_classes or num_classes_of(cfg.data), for_checkpoint=True)
            model = model.to(ctx.device)
            model.load_state_dict(ckpt.state[key])
            if cfg.channels_last:
                model = model.to(memory_format=torch.channels_last)
            BackendSchedule.from_config(cfg).apply(checkpoint_epoch(ckpt.state), [model], announce=False)
            val_set = build_dataset(cfg.data, False, model, seed=cfg.seed)
            loader = build_val_loader(cfg.data, val_set, rank=ctx.rank, world_size=ctx.world_size)
            metrics = evaluate_model(model, loader, ctx, cfg.amp, cfg.max_val_steps, progress=cfg.progress,
                                     channels_last=cfg.channels_last)
            clean = True
            return metrics
        finally:
            shutdown_distributed(ctx, clean)
