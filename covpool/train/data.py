"""Data sets, transforms and loaders for ``covpool train``, ``eval`` and ``predict``.

Data sets are looked up by name in :func:`dataset_names` (their registry: ``_datasets``): the embedded texture
task (no download), an
ImageFolder tree, CUB-200-2011 in its native layout, and torchvision's StanfordCars, FGVCAircraft,
Flowers102, OxfordIIITPet, CIFAR-10/100. Downloads are off unless ``data.download: true``; a missing root
raises :class:`DatasetNotFoundError` naming the layout that is expected.

A run reads its data sets before it builds its model (:func:`open_datasets`), so a wrong root, layout or class
list is reported before any weight is downloaded; the transforms, which depend on the model's pretrained
config (mean, std, interpolation), are attached once the model exists (``Splits.set_transforms``). The
class lists of the splits must be the same (:class:`ClassListError` names the missing and extra classes).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler

from ._datasets import (
    CUB200,
    LAYOUTS,
    DatasetNotFoundError,
    check_root,
    dataset_layout,
    dataset_names,
    dataset_splits,
    not_found,
    num_classes_of,
    spec,
)
from .config import ConfigError, DataConfig

__all__ = [
    "DatasetNotFoundError",
    "ClassListError",
    "Splits",
    "open_datasets",
    "dataset_splits",
    "class_names_of",
    "check_class_lists",
    "image_transform",
    "sample_names",
    "CUB200",
    "ResumableSampler",
    "ShardSampler",
    "dataset_names",
    "dataset_layout",
    "num_classes_of",
    "build_dataset",
    "build_datasets",
    "build_train_loader",
    "build_val_loader",
    "build_loaders",
]


class ClassListError(ValueError):
    """Two class lists that must be the same differ: a data set's splits, or a data set and the checkpoint a
    model was trained into (labels would silently mean other classes)."""


class _Later:
    """A transform given to a data set before the model that decides it exists; ``Splits.set_transforms``
    fills it in. The data set keeps this object, so filling it in reaches every place that holds it
    (torchvision's ``StandardTransform``, the data sets of a ``ConcatDataset``)."""

    def __init__(self) -> None:
        self.transform: Callable | None = None

    def __call__(self, x: Any) -> Any:
        if self.transform is None:
            raise RuntimeError("the data set's transform is not set yet: call Splits.set_transforms(model) first")
        return self.transform(x)


def _transform(cfg: DataConfig, model: torch.nn.Module | None, train: bool) -> Callable:
    if cfg.dataset == "embedded":
        from torchvision.transforms import v2

        mean, std = _mean_std(model)
        if not train:
            return v2.Normalize(mean, std)
        # textures have no up or down: both flips are label-preserving
        return v2.Compose([v2.RandomHorizontalFlip(cfg.hflip), v2.RandomVerticalFlip(cfg.hflip),
                           v2.Normalize(mean, std)])

    from timm.data import create_transform

    data_cfg = _data_config(cfg, model)
    if not train:
        return create_transform(**data_cfg, is_training=False)
    return create_transform(**data_cfg, is_training=True, hflip=cfg.hflip, color_jitter=cfg.color_jitter,
                            auto_augment=cfg.auto_augment, re_prob=cfg.re_prob,
                            scale=tuple(cfg.scale) if cfg.scale else None)


def _mean_std(model: torch.nn.Module | None) -> tuple[Any, Any]:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    return pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN), pretrained_cfg.get("std", IMAGENET_DEFAULT_STD)


def _data_config(cfg: DataConfig, model: torch.nn.Module | None) -> dict[str, Any]:
    from timm.data import resolve_data_config

    args: dict[str, Any] = {"input_size": (3, cfg.img_size, cfg.img_size)}
    if cfg.crop_pct is not None:
        args["crop_pct"] = cfg.crop_pct
    if cfg.interpolation is not None:
        args["interpolation"] = cfg.interpolation
    return resolve_data_config(args, model=model)


def image_transform(cfg: DataConfig, model: torch.nn.Module | None = None) -> Callable:
    """The evaluation transform of data section ``cfg`` for a PIL image (what ``covpool predict`` applies to a
    file): timm's resize, centre crop and normalisation for the model; for a model trained on the embedded data
    set, a centre crop resized to ``data.img_size`` (grey when ``data.embedded_grayscale``), as its patches were.
    The mean, standard deviation (and, for timm's transform, interpolation and crop) come from ``model``'s
    pretrained config; None: ImageNet's statistics. Returns a callable from a PIL image to a ``(3, H, W)``
    float32 tensor."""
    if cfg.dataset != "embedded":
        return _transform(cfg, model, train=False)
    from torchvision.transforms import v2

    mean, std = _mean_std(model)
    steps = [v2.PILToTensor(), v2.Resize(cfg.img_size, antialias=True), v2.CenterCrop(cfg.img_size)]
    if cfg.embedded_grayscale:
        steps.append(v2.Grayscale(num_output_channels=3))
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _size(dataset: Dataset) -> int:
    """``len(dataset)``, which torch's ``Dataset`` does not promise: an iterable-style data set (no length) is a
    TypeError, as covpool's samplers and loaders need a map-style one."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"{type(dataset).__name__} has no len(): covpool's loaders need a map-style data set")
    return len(dataset)


def class_names_of(dataset: Dataset) -> list[str] | None:
    """The class names of ``dataset`` in label order (its ``classes``; the first part's for a ``ConcatDataset``),
    or None when it does not say."""
    if isinstance(dataset, ConcatDataset):
        return class_names_of(dataset.datasets[0])
    classes = getattr(dataset, "classes", None)
    return [str(c) for c in classes] if classes is not None else None


def _labels_of(dataset: Dataset) -> list[int] | None:
    if isinstance(dataset, ConcatDataset):
        labels: list[int] = []
        for part in dataset.datasets:
            part_labels = _labels_of(part)
            if part_labels is None:
                return None
            labels += part_labels
        return labels
    for name in ("targets", "_labels"):
        found = getattr(dataset, name, None)
        if found is not None:
            return [int(x) for x in found]
    samples = getattr(dataset, "_samples", None)  # StanfordCars: (path, label) pairs
    return [int(label) for _, label in samples] if samples is not None else None


def sample_names(dataset: Dataset) -> list[str]:
    """What names each sample of ``dataset`` in the predictions of ``covpool eval``: its file (ImageFolder,
    CUB-200 and the torchvision data sets that keep paths), else its index."""
    if isinstance(dataset, ConcatDataset):
        return [name for d in dataset.datasets for name in sample_names(d)]
    samples = getattr(dataset, "samples", None) or getattr(dataset, "_samples", None)
    if samples is not None:
        return [str(s[0]) for s in samples]
    files = getattr(dataset, "_image_files", None) or getattr(dataset, "_images", None)
    if files is not None and len(files) == _size(dataset):
        return [str(f) for f in files]
    return [str(i) for i in range(_size(dataset))]


def check_class_lists(expected: list[str], found: list[str], what: str, advice: str = "") -> None:
    """Raise :class:`ClassListError` when the class lists ``expected`` and ``found`` differ, naming the classes
    ``found`` lacks and those it has in excess (or, with the same names, that the order differs): labels are
    indices into these lists, so any difference makes a label mean another class. ``what`` says which lists
    (e.g. ``"val/ against train/"``), ``advice`` what to do (added to the message when not empty)."""
    if list(expected) == list(found):
        return
    missing = [c for c in expected if c not in set(found)]
    extra = [c for c in found if c not in set(expected)]

    def listed(names: list[str]) -> str:
        return ", ".join(map(repr, names[:8])) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    parts = ([f"missing {listed(missing)}"] if missing else []) + ([f"extra {listed(extra)}"] if extra else [])
    detail = "; ".join(parts) if parts else "the same names in another order"
    raise ClassListError(f"the class lists of {what} differ ({len(expected)} vs {len(found)} classes): {detail}. "
                         "Labels are positions in the class list, so they would silently mean other classes"
                         + (f"; {advice}" if advice else ""))


@dataclass
class Splits:
    """The data sets of a run or an evaluation, read before the model exists (:func:`open_datasets`).

    Attributes:
        datasets: split name -> data set; each holds a placeholder transform until :meth:`set_transforms`.
        classes: the class names, in label order, shared by every split.
        dataset: the data-set name (``data.dataset``).
    """

    datasets: dict[str, Dataset]
    classes: list[str]
    dataset: str
    _later: dict[str, _Later] = field(default_factory=dict, repr=False)

    def __getitem__(self, split: str) -> Dataset:
        return self.datasets[split]

    def set_transforms(self, cfg: DataConfig, model: torch.nn.Module | None) -> None:
        """Attach each split's transform, as data section ``cfg`` describes it (training augmentation for
        ``train``, evaluation otherwise), with the normalisation of ``model``'s pretrained config (None:
        ImageNet's statistics)."""
        for split, later in self._later.items():
            later.transform = _transform(cfg, model, split == "train")

    def describe(self) -> str:
        """``"8 classes; train 24 images, val 16 images"``, for the start-up header."""
        sizes = ", ".join(f"{split} {_size(ds)} images" for split, ds in self.datasets.items())
        return f"{len(self.classes)} classes; {sizes}"


def open_datasets(cfg: DataConfig, splits: tuple[str, ...] = ("train", "val"), seed: int = 0) -> Splits:
    """Read the ``splits`` of the data set that data section ``cfg`` names (root, layout, annotations; no image is
    decoded and no model is needed) and check that their class lists agree. ``seed`` draws the embedded data
    set's patches (the other data sets are files). Transforms come later (``Splits.set_transforms``).

    Raises:
        DatasetNotFoundError: the root or a split is missing, or does not hold the expected files (the message
            shows the layout).
        ClassListError: the splits' class lists differ (the message names the missing and extra classes), or a
            label lies outside the class list.
        ConfigError: a split the data set does not have, or an ``img_size`` the data set cannot give.
    """
    check_root(cfg)
    known = spec(cfg.dataset)
    valid = dataset_splits(cfg.dataset)
    for split in splits:
        if split not in valid:
            raise ConfigError(f"data set {cfg.dataset!r} has no {split!r} split; its splits: {', '.join(valid)}")
    datasets, later = {}, {}
    for split in splits:
        later[split] = _Later()
        which = "val" if split == "test" and known.val_is_test else split
        try:
            datasets[split] = known.build(cfg, which, later[split], seed)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            if "not found" not in str(err).lower():
                raise
            raise not_found(cfg.dataset, cfg.root, LAYOUTS[cfg.dataset], f"torchvision found nothing under "
                            f"{cfg.root!r} ({err})") from err
    classes = None
    for split, ds in datasets.items():
        names = class_names_of(ds)
        if names is None:
            names = [str(i) for i in range(known.num_classes or 0)]
        if classes is None:
            classes, first = names, split
        else:
            folders = f"{split}/ against {first}/" if cfg.dataset == "imagefolder" else f"{split} against {first}"
            check_class_lists(classes, names, f"{cfg.dataset} {folders} under {cfg.root}",
                              "give every split the same class folders" if cfg.dataset == "imagefolder" else "")
        labels = _labels_of(ds)
        if labels and max(labels) >= len(names):
            raise ClassListError(f"data set {cfg.dataset!r}, {split} split: label {max(labels)} but only "
                                 f"{len(names)} classes are named; check the annotation files under {cfg.root}")
    return Splits(datasets, classes or [], cfg.dataset, later)


def build_dataset(cfg: DataConfig, train: bool | str, model: torch.nn.Module | None = None, seed: int = 0
                  ) -> Dataset:
    """The training (``train=True`` or ``"train"``), validation (``False`` or ``"val"``) or ``"test"`` data set
    of data section ``cfg`` with its transform (normalisation from ``model``'s pretrained config when given,
    ImageNet statistics otherwise); the other splits are not read. ``seed`` and the errors as
    :func:`open_datasets`."""
    split = ("train" if train else "val") if isinstance(train, bool) else train
    splits = open_datasets(cfg, (split,), seed)
    splits.set_transforms(cfg, model)
    return splits[split]


def build_datasets(cfg: DataConfig, model: torch.nn.Module | None = None, seed: int = 0) -> tuple[Dataset, Dataset]:
    """The training and validation data sets of data section ``cfg`` (:func:`open_datasets` with ``seed``, so
    their class lists must agree) with their transforms, normalised as ``model``'s pretrained config says
    (None: ImageNet's statistics). Errors as :func:`open_datasets`."""
    splits = open_datasets(cfg, ("train", "val"), seed)
    splits.set_transforms(cfg, model)
    return splits["train"], splits["val"]



class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (a shuffle fixed by ``seed`` and the epoch, the same on every process)
    that can skip the batches already done when a run resumes mid-epoch (``skip`` samples, this epoch).

    Args:
        dataset: a map-style data set (with a length).
        num_replicas: the number of processes; each takes every ``num_replicas``-th index of the shuffle.
        rank: this process's index, in ``[0, num_replicas)``.
        seed: the shuffle's seed (with the epoch, :meth:`set_epoch`).

    The last incomplete round is dropped, so every process gets as many samples.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index of ``dataset`` (a map-style data set) from ``rank``, in order, no padding:
    per-process sums add up to exact totals."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        self.indices = list(range(rank, _size(dataset), num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_train_loader(cfg: DataConfig, train_set: Dataset, seed: int, rank: int = 0, world_size: int = 1,
                       pin_memory: bool = False) -> DataLoader:
    """A loader of ``train_set`` over a :class:`ResumableSampler` (the last incomplete batch dropped). Its
    ``generator`` seeds worker augmentation; the trainer reseeds it every epoch so that resumed and uninterrupted
    runs draw the same numbers.

    Args:
        cfg: the data section: ``batch_size`` (per process) and ``workers``.
        train_set: the training data set, map-style.
        seed: the shuffle's seed.
        rank: this process's index in ``[0, world_size)``.
        world_size: the number of processes, each loading its own shard.
        pin_memory: page-locked batches, for faster copies to a CUDA device.

    Raises:
        ConfigError: the data set holds fewer images than one batch on every process.
    """
    if _size(train_set) < cfg.batch_size * world_size:
        raise ConfigError(f"the training set has {_size(train_set)} images, fewer than one batch "
                         f"({cfg.batch_size} x {world_size} processes); lower data.batch_size")
    return DataLoader(train_set, batch_size=cfg.batch_size, sampler=ResumableSampler(
        train_set, world_size, rank, seed), num_workers=cfg.workers, pin_memory=pin_memory, drop_last=True,
        generator=torch.Generator())


def build_val_loader(cfg: DataConfig, val_set: Dataset, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> DataLoader:
    """A loader of ``val_set`` over a :class:`ShardSampler`: every image once, over all processes, in batches of
    data section ``cfg``'s ``val_batch_size`` (None: twice ``batch_size``) with its ``workers``; ``rank``,
    ``world_size`` and ``pin_memory`` as in :func:`build_train_loader`."""
    return DataLoader(val_set, batch_size=cfg.val_batch_size or 2 * cfg.batch_size,
                      sampler=ShardSampler(val_set, world_size, rank), num_workers=cfg.workers, pin_memory=pin_memory)


def build_loaders(cfg: DataConfig, train_set: Dataset, val_set: Dataset, seed: int, rank: int = 0,
                  world_size: int = 1, pin_memory: bool = False) -> tuple[DataLoader, DataLoader]:
    """:func:`build_train_loader` of ``train_set`` (shuffled with ``seed``) and :func:`build_val_loader` of
    ``val_set``, with data section ``cfg``; ``rank``, ``world_size`` and ``pin_memory`` as there."""
    return (build_train_loader(cfg, train_set, seed, rank, world_size, pin_memory),
            build_val_loader(cfg, val_set, rank, world_size, pin_memory))
