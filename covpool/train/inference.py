"""A trained model from its checkpoint alone (:func:`load_model`), and its top-k classes for image files
(:func:`predict`, ``covpool predict``).

A checkpoint written by ``covpool train`` holds the run's config and the data set's class names, so the model
(a registered covpool model, a timm or torchvision model with a second-order head, a wrapped transformer)
is rebuilt as it was trained, with the square-root backend its schedule gave at the checkpoint's epoch, and
its pretrained config names the classes and the input size::

    model = covpool.load_model("runs/cub200/best.pt")          # eval mode, on the CPU
    model.pretrained_cfg["label_names"][model(x).argmax(-1)]   # x: images transformed as for evaluation
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..outputs import first_line, write_csv
from ..precision import AMP_MODES, amp_mode
from ._model import build_model, classifier_names
from ._schedule import BackendSchedule, checkpoint_epoch
from .checkpoint import Checkpoint, CheckpointError
from .config import ConfigError, TrainConfig, config_from_dict
from .data import image_transform
from .evaluation import interactive, load_weights

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "Prediction", "load_model", "model_config", "class_names",
           "image_files", "resolve_device", "predict", "write_predictions", "format_prediction"]

#: the file suffixes :func:`image_files` takes from a folder (torchvision's ImageFolder's, lower case)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """A path given to :func:`predict` is missing, holds no image, or an image cannot be read."""


def model_config(checkpoint: Checkpoint) -> TrainConfig:
    """The training config stored in ``checkpoint``; a :class:`ConfigError` (naming the checkpoint) when it is not
    one this covpool reads."""
    return config_from_dict(checkpoint.config, where=f" (stored in {checkpoint.path})")


def _classifier_rows(ckpt: Checkpoint, cfg: TrainConfig) -> int:
    """The class count of a checkpoint that does not list its classes (covpool < 0.2): the rows of its
    classifier, found on a model built on the meta device."""
    with torch.device("meta"):
        probe = build_model(cfg.model, 2, for_checkpoint=True, img_size=cfg.data.img_size)
    own = probe.state_dict()
    for name in classifier_names(probe):
        for key, value in own.items():
            if key.startswith(name + ".") and value.dim() >= 1 and value.shape[0] == 2 and key in ckpt.weights:
                return int(ckpt.weights[key].shape[0])
    raise CheckpointError(f"{ckpt.path} stores no class names and its classifier was not found; give "
                          "model.num_classes in its config")


def class_names(checkpoint: Checkpoint, num_classes: int | None = None) -> list[str]:
    """The class names of ``checkpoint`` (``"0"``, ``"1"``, ... for one written before covpool stored them, and
    for outputs beyond the list when ``model.num_classes`` made the classifier wider), ``num_classes`` of them
    (None: as many as it stores)."""
    names = checkpoint.class_names or []
    return names + [str(i) for i in range(len(names), num_classes or len(names))]


def load_model(checkpoint: str | Path | Checkpoint, device: str | torch.device = "cpu", use_ema: bool = False
               ) -> nn.Module:
    """Rebuild a model trained by ``covpool train`` from its checkpoint alone, in eval mode.

    The checkpoint's config says which model it is (``model.name``, ``model.swap_pooling`` and the head,
    ``model.zca``, the CIFAR stem, ``data.img_size`` for a transformer) and its ``class_names`` which classes it
    tells apart; no data set, hub or network is needed. Its ``pretrained_cfg`` (timm's, also set on a
    torchvision model) gets ``label_names``, ``num_classes`` and the ``input_size`` it was trained at, so
    ``timm.data.resolve_data_config(model=model)`` gives its evaluation transform (or use
    :func:`covpool.train.data.image_transform`).

    Args:
        checkpoint: a ``last.pt`` / ``best.pt`` path, or a :class:`~covpool.train.Checkpoint` already read.
        device: where to put the model.
        use_ema: the EMA weights (runs with ``ema=true``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is damaged, not covpool's, or holds no EMA weights with ``use_ema``.
        ConfigError: its stored config is not one this covpool reads.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.read(checkpoint)
    cfg = model_config(ckpt)
    key = "state_dict_ema" if use_ema else "state_dict"
    if ckpt.state.get(key) is None:
        raise CheckpointError(f"{ckpt.path} has no EMA weights ({key!r}): they are stored only when the run used "
                              "ema=true; load the model's own weights without use_ema")
    stored = ckpt.class_names
    num_classes = cfg.model.num_classes or (len(stored) if stored is not None else _classifier_rows(ckpt, cfg))
    model = build_model(cfg.model, num_classes, for_checkpoint=True, img_size=cfg.data.img_size)
    load_weights(model, ckpt, key)
    BackendSchedule.from_config(cfg).apply(checkpoint_epoch(ckpt.state), [model], announce=False)
    size = cfg.data.img_size
    info = dict(getattr(model, "pretrained_cfg", None) or {})
    info.update(label_names=tuple(class_names(ckpt, num_classes)), num_classes=num_classes,
                input_size=(3, size, size), test_input_size=None)
    if cfg.data.crop_pct is not None:
        info["crop_pct"] = cfg.data.crop_pct
    if cfg.data.interpolation is not None:
        info["interpolation"] = cfg.data.interpolation
    # nn.Module's stub types an attribute's value as Tensor | Module; any value is allowed (timm's is a dict)
    model.pretrained_cfg = model.default_cfg = info  # type: ignore[assignment]
    return model.to(device).eval()


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """The images named by ``paths``: files as given, folders searched recursively for the
    :data:`IMAGE_SUFFIXES` (sorted), in the order of ``paths``.

    Raises:
        ImageReadError: a path does not exist, or the paths hold no image.
    """
    out: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            out.append(path)
        else:
            raise ImageReadError(f"{str(given)!r} is neither an image file nor a folder")
    if not out:
        listed = ", ".join(map(str, paths))
        raise ImageReadError(f"no image in {listed or 'the paths given'} (looked for "
                             f"{', '.join(IMAGE_SUFFIXES)} files in folders)")
    return out


def resolve_device(device: str | torch.device) -> torch.device:
    """The ``torch.device`` that ``device`` names: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or
    ``cuda:<n>`` (a string or a ``torch.device``); a device this machine lacks, or one that is neither a CPU nor a
    CUDA device, is a :class:`ConfigError`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device {device!r} is not a device: {first_line(err)}; use auto, cpu, cuda or "
                          "cuda:<n>") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but CUDA is not available here; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: covpool predict runs on cpu or cuda")
    return dev


class _Files(Dataset):
    """Image files through a transform; a file that cannot be read gives its error instead of an image, so
    the first bad file is reported by name whatever the number of workers."""

    def __init__(self, files: Sequence[Path], transform: Callable[[Any], torch.Tensor]) -> None:
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str]:
        from PIL import Image

        try:
            with Image.open(self.files[index]) as img:
                return self.transform(img.convert("RGB")), ""
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            return None, f"{self.files[index]}: {first_line(err)}"


def _collate(batch: list[tuple[torch.Tensor | None, str]]) -> tuple[torch.Tensor | None, list[str]]:
    errors = [error for _, error in batch if error]
    if errors:
        return None, errors
    return torch.stack([image for image, _ in batch if image is not None]), []


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, best first, as :func:`predict` returns them.

    Attributes:
        path: the image file.
        labels: the k class indices (the classifier's outputs).
        classes: their class names.
        probabilities: their softmax probabilities, in [0, 1].
    """

    path: Path
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    probabilities: tuple[float, ...]

    def row(self) -> dict[str, Any]:
        """The CSV row: ``image``, then ``class_1``, ``probability_1``, ``class_2``, ..."""
        out: dict[str, Any] = {"image": str(self.path)}
        for rank, (name, p) in enumerate(zip(self.classes, self.probabilities), start=1):
            out[f"class_{rank}"], out[f"probability_{rank}"] = name, round(p, 6)
        return out


@torch.no_grad()
def predict(checkpoint: str | Path | Checkpoint, paths: Iterable[str | Path], top_k: int = 5, batch_size: int = 32,
            device: str | torch.device = "auto", use_ema: bool = False, workers: int = 0, progress: bool = True
            ) -> list[Prediction]:
    """The ``top_k`` classes, with their softmax probabilities, of every image under ``paths`` (files, or
    folders searched recursively), by the model of ``checkpoint`` (:func:`load_model`) with its evaluation
    transform (:func:`covpool.train.data.image_transform`), in batches of ``batch_size``.

    Args:
        checkpoint: a ``last.pt`` / ``best.pt`` path, or a :class:`~covpool.train.Checkpoint` already read.
        paths: image files and folders (searched recursively for :data:`IMAGE_SUFFIXES`), in the order given.
        top_k: classes per image, >= 1 (at most the model's class count are returned).
        batch_size: images per forward pass, >= 1.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:<n>"`` or a ``torch.device``
            (:func:`resolve_device`); the run's ``amp`` mode is used where the device can run it.
        use_ema: the EMA weights (runs with ``ema=true``).
        workers: data-loader processes that read and transform the images, >= 0 (0: this process).
        progress: show a progress bar (when stderr is a terminal).

    Returns:
        One :class:`Prediction` per image, in the order of the files found.

    Raises:
        ImageReadError: a path is missing, the paths hold no image, or a file is not a readable image.
        ConfigError: ``top_k`` or ``batch_size`` below 1, ``workers`` below 0, or a ``device`` this machine
            lacks.
        CheckpointError, FileNotFoundError: as :func:`load_model`.
    """
    if top_k < 1 or batch_size < 1 or workers < 0:
        raise ConfigError(f"top_k and batch_size must be at least 1 and workers at least 0, got {top_k}, "
                          f"{batch_size} and {workers}")
    dev = resolve_device(device)
    files = image_files(paths)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.read(checkpoint)
    cfg = model_config(ckpt)
    model = load_model(ckpt, dev, use_ema=use_ema)
    names = list(getattr(model, "pretrained_cfg", {})["label_names"])  # load_model put them there
    # the run's autocast, where this device can run it
    amp = amp_mode(cfg.amp) if amp_mode(cfg.amp).refusal(dev.type) is None else AMP_MODES["none"]
    k = min(top_k, len(names))
    loader = DataLoader(_Files(files, image_transform(cfg.data, model)), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=dev.type == "cuda")
    out: list[Prediction] = []
    bar = tqdm(total=math.ceil(len(files) / batch_size), desc="predict", leave=False, dynamic_ncols=True,
               disable=not (progress and interactive()))
    for images, errors in loader:
        if errors:
            bar.close()
            raise ImageReadError(f"cannot read {errors[0]}")
        with amp.autocast(dev):
            logits = model(images.to(dev, non_blocking=True))
        probs, labels = logits.float().softmax(dim=-1).topk(k, dim=-1)
        for p, label in zip(probs.cpu().tolist(), labels.cpu().tolist()):
            path = files[len(out)]
            out.append(Prediction(path, tuple(label), tuple(names[i] for i in label), tuple(p)))
        bar.update()
    bar.close()
    return out


def write_predictions(predictions: Sequence[Prediction], path: str | Path) -> Path:
    """``predictions`` (at least one) as a CSV file at ``path`` (one row per image, :meth:`Prediction.row`),
    written atomically; returns the path."""
    k = max(len(p.classes) for p in predictions)
    fields = ["image", *(f"{kind}_{rank}" for rank in range(1, k + 1) for kind in ("class", "probability"))]
    return write_csv([p.row() for p in predictions], path, fields)


def format_prediction(prediction: Prediction) -> str:
    """One ``prediction`` as a line: ``path: class (97.1%), class (1.2%), ...``."""
    best = ", ".join(f"{name} ({100 * p:.1f}%)" for name, p in zip(prediction.classes, prediction.probabilities))
    return f"{prediction.path}: {best}"
