"""Evaluation: a model's loss and accuracy on a loader (:func:`evaluate_model`, what a run does after each
epoch), and ``covpool eval``'s :func:`evaluate` of a checkpoint on a split of its config's data set: overall and
per-class accuracy, the confusion matrix and each image's prediction (:class:`EvalResult`)."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..outputs import console_logging, first_line, moved_names, new_figure, save_figure, write_csv
from ..precision import amp_mode
from ._dist import DistContext, all_gather_objects, all_reduce_sum, init_distributed, shutdown_distributed
from ._model import build_model, classifier_names
from ._schedule import BackendSchedule, checkpoint_epoch
from .checkpoint import Checkpoint, CheckpointError
from .config import TrainConfig, config_from_dict
from .config_checks import check_config, check_same_model
from .data import ClassListError, build_val_loader, check_class_lists, open_datasets, sample_names

__all__ = ["to_device", "interactive", "evaluate_model", "predict_loader", "evaluate", "EvalResult",
           "plot_confusion", "check_checkpoint_classes", "load_weights"]


def _autocast(amp: str, device: torch.device) -> AbstractContextManager:
    """What ``evaluation.autocast`` was, a name that hid ``torch.autocast``: the autocast region of config
    ``amp`` on ``device``."""
    return amp_mode(amp).autocast(device)


__getattr__ = moved_names(__name__, {"autocast": (f"{__name__}:_autocast",
                                                  "covpool.precision.amp_mode(amp).autocast(device)")})


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


def _in_top(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each image's label is among its ``k`` best classes (all of them when there are fewer), ``(B,)``."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return (top == target[:, None]).any(dim=-1)


def _logits(model: nn.Module, loader: DataLoader, ctx: DistContext, amp: str, max_steps: int | None, desc: str,
            progress: bool, channels_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits in float32, target)`` of each batch of ``loader`` (at most ``max_steps``), ``model`` in eval
    mode under ``amp``'s autocast, with a progress bar on rank 0's terminal; the model's mode is restored."""
    was_training = model.training
    model.eval()
    mode = amp_mode(amp)
    total = len(loader) if max_steps is None else min(max_steps, len(loader))
    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
               disable=not (progress and ctx.is_main and interactive()))
    try:
        for step, (images, target) in enumerate(loader):
            if step >= total:
                break
            images, target = to_device(images, ctx.device, channels_last), target.to(ctx.device, non_blocking=True)
            with mode.autocast(ctx.device):
                logits = model(images)
            yield logits.float(), target
            bar.update()
    finally:
        bar.close()
        model.train(was_training)


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, ctx: DistContext, amp: str = "none",
                   max_steps: int | None = None, desc: str = "val", progress: bool = False,
                   channels_last: bool = False) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) of ``model`` over ``loader``, summed over all processes (each
    evaluates its own shard, e.g. :func:`covpool.train.data.build_val_loader`'s).

    Args:
        model: a classifier, evaluated in eval mode and without gradients; its mode is restored afterwards.
        loader: ``(images, target)`` batches: ``(B, 3, H, W)`` floating-point images, ``(B,)`` integer labels.
        ctx: the process's place in the run (rank, world size, device), as ``init_distributed`` gives it.
        amp: the mixed-precision mode, ``"none"``, ``"bf16"`` or ``"fp16"`` (:mod:`covpool.precision`).
        max_steps: evaluate at most this many batches per process; None: the whole loader.
        desc: the progress bar's label.
        progress: show a progress bar (on rank 0, when stderr is a terminal).
        channels_last: move the images to NHWC memory layout first (as a channels-last model trains).

    Returns:
        ``loss`` (mean cross-entropy), ``acc1`` and ``acc5`` (%), and ``count``, the images evaluated over all
        processes.

    Raises:
        ValueError: an unknown ``amp`` mode.
    """
    sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss_sum, top1, top5, count
    for logits, target in _logits(model, loader, ctx, amp, max_steps, desc, progress, channels_last):
        sums += torch.stack([F.cross_entropy(logits, target, reduction="sum"), _in_top(logits, target, 1).sum(),
                             _in_top(logits, target, 5).sum(), torch.tensor(float(len(target)), device=ctx.device)]
                            ).to(sums.dtype)
    all_reduce_sum(sums, ctx)
    loss_sum, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count,
            "count": int(count)}


@torch.no_grad()
def predict_loader(model: nn.Module, loader: DataLoader, ctx: DistContext, amp: str = "none",
                   max_steps: int | None = None, desc: str = "eval", progress: bool = False,
                   channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Per-image results of ``model`` over ``loader`` on this process: ``target``, ``pred`` (top-1 class),
    ``prob`` (its softmax probability), ``top5`` (whether the label is among the 5 best) and ``loss``
    (cross-entropy), each a ``(N,)`` CPU tensor in the loader's order (int64, int64, float32, bool, float32).

    ``ctx``, ``amp``, ``max_steps``, ``desc``, ``progress`` and ``channels_last`` are as in
    :func:`evaluate_model`.
    """
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("target", "pred", "prob", "top5", "loss")}
    for logits, target in _logits(model, loader, ctx, amp, max_steps, desc, progress, channels_last):
        prob, pred = logits.softmax(dim=-1).max(dim=-1)
        for key, value in (("target", target), ("pred", pred), ("prob", prob), ("top5", _in_top(logits, target, 5)),
                           ("loss", F.cross_entropy(logits, target, reduction="none"))):
            parts[key].append(value.cpu())
    empty = {"target": torch.long, "pred": torch.long, "prob": torch.float32, "top5": torch.bool,
             "loss": torch.float32}
    return {k: torch.cat(v) if v else torch.zeros(0, dtype=empty[k]) for k, v in parts.items()}


def _gather(results: dict[str, torch.Tensor], ctx: DistContext) -> dict[str, torch.Tensor]:
    """Every process's :func:`predict_loader` results in the data set's order (the :class:`ShardSampler` gives
    process r the images r, r + world, r + 2 world, ...)."""
    shards = all_gather_objects(results, ctx)
    if len(shards) == 1:
        return shards[0]
    out = {}
    for key in results:
        parts = [shard[key] for shard in shards]
        total = sum(len(p) for p in parts)
        merged = torch.empty(total, dtype=parts[0].dtype)
        for rank, part in enumerate(parts):
            merged[rank::len(parts)][:len(part)] = part
        out[key] = merged
    return out


@dataclass
class EvalResult:
    """What :func:`evaluate` measured: the overall numbers (``metrics``), each class's accuracy, the
    confusion matrix and each image's prediction.

    Attributes:
        metrics: ``loss``, ``acc1``, ``acc5`` (%), ``count``, ``mean_class_acc`` (%, the mean of the per-class
            accuracies, which fine-grained papers also report), ``split``.
        classes: class names in label order.
        confusion: ``(K, K)`` counts, rows the true class, columns the predicted one.
        images: a name per image (its file where the data set keeps one, else its index).
        results: the per-image tensors of :func:`predict_loader`.
    """

    metrics: dict[str, Any]
    classes: list[str]
    confusion: torch.Tensor
    images: list[str]
    results: dict[str, torch.Tensor]

    def __getitem__(self, key: str) -> Any:  # ``evaluate(...)["acc1"]``, as when it returned the metrics dict
        return self.metrics[key]

    def per_class(self) -> list[dict[str, Any]]:
        """One row per class: ``class``, ``label``, ``images``, ``correct``, ``accuracy`` (%, NaN without images)."""
        k = len(self.classes)
        support = torch.bincount(self.results["target"], minlength=k)
        rows = []
        for label, name in enumerate(self.classes):
            images, correct = int(support[label]), int(self.confusion[label, label])
            rows.append({"class": name, "label": label, "images": images, "correct": correct,
                         "accuracy": 100.0 * correct / images if images else float("nan")})
        return rows

    def predictions(self) -> list[dict[str, Any]]:
        """One row per image: ``image``, ``label``, ``class``, ``predicted``, ``predicted_class``,
        ``probability``, ``correct``."""
        r, names = self.results, self.classes
        return [{"image": image, "label": int(t), "class": names[int(t)], "predicted": int(p),
                 "predicted_class": names[int(p)] if int(p) < len(names) else str(int(p)),
                 "probability": round(float(q), 6), "correct": int(t == p)}
                for image, t, p, q in zip(self.images, r["target"], r["pred"], r["prob"])]

    def write(self, folder: str | Path, title: str = "") -> list[Path]:
        """``per_class.csv``, ``confusion.csv``, ``confusion.png`` (its ``title`` above the matrix) and
        ``predictions.csv`` in ``folder``; returns their paths."""
        folder = Path(folder)
        matrix = [{"true \\ predicted": name, **{n: int(v) for n, v in zip(self.classes, row.tolist())}}
                  for name, row in zip(self.classes, self.confusion)]
        return [write_csv(self.per_class(), folder / "per_class.csv"),
                write_csv(matrix, folder / "confusion.csv", ["true \\ predicted", *self.classes]),
                plot_confusion(self.confusion, self.classes, folder / "confusion.png", title),
                write_csv(self.predictions(), folder / "predictions.csv",
                          ["image", "label", "class", "predicted", "predicted_class", "probability", "correct"])]


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: str | Path, title: str = "") -> Path:
    """The confusion matrix as an image, each row normalised to the fraction of its class's images (class
    names on the axes up to 40 classes).

    Args:
        confusion: ``(K, K)`` counts, rows the true class, columns the predicted one (an :class:`EvalResult`'s).
        classes: the K class names, in label order.
        path: the PNG file to write (atomically, whatever its suffix).
        title: the figure's title.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    counts = confusion.double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    k = len(classes)
    side = min(4 + 0.25 * k, 16)
    fig = new_figure((side + 1.5, side))
    ax = fig.subplots()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if k <= 40:
        ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(k), classes, fontsize=7)
    fig.subplots_adjust(left=0.2 if k <= 40 else 0.1, bottom=0.2 if k <= 40 else 0.1, right=0.95, top=0.92)
    return save_figure(fig, path, dpi=90)


def evaluate(checkpoint: str | Path | Checkpoint, cfg: TrainConfig | None = None, use_ema: bool = False,
             split: str = "val", out_dir: str | Path | None = None) -> EvalResult:
    """Evaluate a checkpoint (a path, or a :class:`~covpool.train.checkpoint.Checkpoint` already read) on a split
    of its config's data set; ``cfg`` replaces the stored config, and must describe the same model. Only the
    model and that split are built.

    Args:
        checkpoint: a ``last.pt`` / ``best.pt`` written by ``covpool train``, or a
            :class:`~covpool.train.checkpoint.Checkpoint` already read.
        cfg: a config to use instead of the stored one (e.g. another ``data.root``); None: the stored config.
        use_ema: evaluate the EMA weights (stored when the run used ``ema=true``) instead of the model's own.
        split: ``val`` (default), ``test`` (an ImageFolder's ``test/`` folder; for CUB-200 and the torchvision
            data sets the same images as ``val``, their official test split) or ``train``
            (:func:`covpool.train.data.dataset_splits`).
        out_dir: where to write ``per_class.csv``, ``confusion.csv``, ``confusion.png`` and
            ``predictions.csv`` (None: nothing is written).

    Returns:
        An :class:`EvalResult`; ``result["acc1"]`` etc. read its metrics.

    Raises:
        ConfigError: ``cfg`` (or the stored config) has a mistake, or describes another model, or the data set
            has no such split.
        CheckpointError: the file is damaged or foreign, or ``use_ema`` and it holds no EMA weights.
        ClassListError: the data set's classes differ from those the checkpoint was trained on.
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
            data = open_datasets(cfg.data, (split,), seed=cfg.seed)
            classes = check_checkpoint_classes(ckpt, data.classes, f"data set {cfg.data.dataset!r} ({split} split, "
                                               f"data.root={cfg.data.root})")
            model = build_model(cfg.model, cfg.model.num_classes or len(classes), for_checkpoint=True,
                                img_size=cfg.data.img_size)
            model = model.to(ctx.device)
            load_weights(model, ckpt, key)
            if cfg.channels_last:
                model = model.to(memory_format=torch.channels_last)
            BackendSchedule.from_config(cfg).apply(checkpoint_epoch(ckpt.state), [model], announce=False)
            data.set_transforms(cfg.data, model)
            loader = build_val_loader(cfg.data, data[split], rank=ctx.rank, world_size=ctx.world_size)
            results = _gather(predict_loader(model, loader, ctx, cfg.amp, cfg.max_val_steps, desc=f"eval {split}",
                                             progress=cfg.progress, channels_last=cfg.channels_last), ctx)
            clean = True
        finally:
            shutdown_distributed(ctx, clean)
    k = len(classes)
    count = len(results["target"])
    named = results["pred"] < k  # a classifier wider than the class list (model.num_classes) may pick no class
    confusion = torch.bincount(results["target"][named] * k + results["pred"][named], minlength=k * k).reshape(k, k)
    support = torch.bincount(results["target"], minlength=k)
    present = support > 0
    per_class = confusion.diagonal().double() / support.clamp_min(1)
    n = max(count, 1)
    metrics = {"loss": float(results["loss"].double().sum()) / n,
               "acc1": 100.0 * float((results["pred"] == results["target"]).sum()) / n,
               "acc5": 100.0 * float(results["top5"].sum()) / n, "count": count,
               "mean_class_acc": 100.0 * float(per_class[present].mean()) if bool(present.any()) else float("nan"),
               "split": split}
    result = EvalResult(metrics, classes, confusion, sample_names(data[split])[:count], results)
    if out_dir is not None and ctx.is_main:
        result.write(out_dir, title=f"{ckpt.path.name} on {cfg.data.dataset} {split}: top-1 {metrics['acc1']:.2f}%")
    return result


def check_checkpoint_classes(ckpt: Checkpoint, classes: list[str], what: str) -> list[str]:
    """The class names to report with: the checkpoint ``ckpt``'s, after checking that ``classes`` (a data set's)
    are the same (:class:`ClassListError` otherwise, whose message names the data set as ``what`` says, e.g.
    ``"data set 'cub200' (val split)"``); a checkpoint written before covpool stored them takes the data set's."""
    stored = ckpt.class_names
    if stored is None:
        return list(classes)
    check_class_lists(stored, classes, f"the checkpoint {ckpt.path} and {what}",
                      "evaluate a checkpoint on the classes it was trained on")
    return stored


def load_weights(model: nn.Module, ckpt: Checkpoint, key: str = "state_dict") -> None:
    """Load the weights of checkpoint ``ckpt`` (``key``: ``state_dict`` or ``state_dict_ema``) into ``model``, the
    model its config builds; a classifier of another size (a checkpoint written before class names were stored,
    evaluated on another data set) is a :class:`ClassListError`, any other difference a :class:`CheckpointError`."""
    own = model.state_dict()
    weights = ckpt.state[key]
    sized = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    classifier = classifier_names(model)
    if sized and all(any(k == c or k.startswith(c + ".") for c in classifier) for k in sized):
        rows = tuple(weights[sized[0]].shape)[0]
        raise ClassListError(f"{ckpt.path} holds a classifier of {rows} classes but the data set has "
                             f"{tuple(own[sized[0]].shape)[0]}; evaluate it on the data set it was trained on")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt.path}: its weights do not fit the model its config builds ({first_line(err)})"
                              ) from None
