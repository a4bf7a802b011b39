"""Data sets, transforms and loaders for ``covpool train``, ``eval`` and ``predict``.

Data sets are looked up by name in :func:`dataset_names`: the embedded texture task (no download), an
ImageFolder tree, CUB-200-2011 in its native layout, and torchvision's StanfordCars, FGVCAircraft,
Flowers102, OxfordIIITPet, CIFAR-10/100. Downloads are off unless ``data.download: true``; a missing root
raises :class:`DatasetNotFoundError` naming the layout that is expected.

A run reads its data sets before it builds its model (:func:`open_datasets`), so a wrong root, layout or class
list is reported before any weight is downloaded; the transforms, which depend on the model's pretrained
config (mean, std, interpolation), are attached once the model exists (``Splits.set_transforms``). The
class lists of the splits must be the same (:class:`ClassListError` names the missing and extra classes).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler

from ..outputs import first_line
from .config import ConfigError, DataConfig
from .embedded import EMBEDDED_CLASSES, EmbeddedTextures

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


class DatasetNotFoundError(FileNotFoundError):
    """The data-set root is missing or does not hold the expected files."""


class ClassListError(ValueError):
    """Two class lists that must be the same differ: a data set's splits, or a data set and the checkpoint a
    model was trained into (labels would silently mean other classes)."""


def _missing(name: str, root: Any, layout: str, why: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"data set {name!r}: {why}. Expected layout under data.root:\n{layout}\n"
        f"Point data.root=<folder> at it (e.g. `covpool train --config ... data.root=/data/{name}`)"
        + ("" if name in ("imagefolder", "cub200") else ", or set data.download=true where torchvision can fetch it")
        + "."
    )


class CUB200(Dataset):
    """Caltech-UCSD Birds-200-2011 read from its native layout (``root`` is the ``CUB_200_2011`` folder
    or its parent): ``images.txt``, ``train_test_split.txt``, ``image_class_labels.txt``, ``classes.txt``
    and ``images/``. Labels are 0-based; 5994 training and 5794 test images in the official split."""

    FILES = ("images.txt", "train_test_split.txt", "image_class_labels.txt", "classes.txt")

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None) -> None:
        root = Path(root)
        if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
            root = root / "CUB_200_2011"
        missing = [f for f in (*self.FILES, "images") if not (root / f).exists()]
        if missing:
            raise _missing("cub200", root, _LAYOUTS["cub200"], f"{str(root)!r} lacks {', '.join(missing)}")
        self.root, self.transform = root, transform

        def table(name: str) -> dict[int, str]:
            rows = (line.split(maxsplit=1) for line in (root / name).read_text().splitlines() if line.strip())
            return {int(key): value.strip() for key, value in rows}

        paths, split, labels = table("images.txt"), table("train_test_split.txt"), table("image_class_labels.txt")
        self.classes = [name for _, name in sorted(table("classes.txt").items())]
        self.samples = [(root / "images" / paths[i], int(labels[i]) - 1) for i in sorted(paths)
                        if (split[i] == "1") == train]
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            image = img.convert("RGB")
        return (self.transform(image) if self.transform else image), label


_LAYOUTS = MappingProxyType({
    "embedded": "  (none: built from scikit-image's bundled photos)",
    "imagefolder": "  train/<class>/<image>.jpg ...\n  val/<class>/<image>.jpg ...   (same class folder names)\n"
                   "  test/<class>/<image>.jpg ...  (optional: covpool eval --split test)",
    "cub200": "  CUB_200_2011/images.txt\n  CUB_200_2011/train_test_split.txt\n  CUB_200_2011/image_class_labels.txt\n"
              "  CUB_200_2011/classes.txt\n  CUB_200_2011/images/<class>/<image>.jpg\n"
              "  (root may also be the CUB_200_2011 folder itself)",
    "stanford_cars": "  stanford_cars/  as torchvision.datasets.StanfordCars expects (devkit/, cars_train/, "
                     "cars_test/, cars_test_annos_withlabels.mat); torchvision cannot download it any more",
    "fgvc_aircraft": "  fgvc-aircraft-2013b/data/...  (torchvision.datasets.FGVCAircraft)",
    "flowers102": "  flowers-102/jpg/, imagelabels.mat, setid.mat  (torchvision.datasets.Flowers102)",
    "oxford_pet": "  oxford-iiit-pet/images/, annotations/  (torchvision.datasets.OxfordIIITPet)",
    "cifar10": "  cifar-10-batches-py/  (torchvision.datasets.CIFAR10)",
    "cifar100": "  cifar-100-python/  (torchvision.datasets.CIFAR100)",
})


class _Later:
    """A transform given to a data set before the model that decides it exists; ``Splits.set_transforms``
    fills it in. The data set keeps this object, so filling it in reaches every place that holds it
    (torchvision's ``StandardTransform``, the data sets of a ``ConcatDataset``)."""

    def __init__(self) -> None:
        self.transform: Callable | None = None

    def __call__(self, x):
        if self.transform is None:
            raise RuntimeError("the data set's transform is not set yet: call Splits.set_transforms(model) first")
        return self.transform(x)


@dataclass(frozen=True)
class _Spec:
    build: Callable[[DataConfig, str, Callable | None, int], Dataset]  # (cfg, split, transform, seed)
    num_classes: int | None  # None: read from the data (ImageFolder)
    needs_root: bool = True
    # "test" is another name of "val": the validation split of these data sets is their official test split
    val_is_test: bool = False
    test: bool = False  # a test split of its own (an ImageFolder's optional test/ folder)


def _embedded(cfg: DataConfig, split: str, transform: Callable | None, seed: int) -> Dataset:
    if cfg.img_size < 8:
        raise ConfigError(f"data.img_size={cfg.img_size}: the embedded data set cuts patches of at least 8x8 "
                          "pixels; use data.img_size >= 8")
    return EmbeddedTextures(split, img_size=cfg.img_size, seed=seed,
                            per_class=cfg.embedded_train_per_class if split == "train" else cfg.embedded_val_per_class,
                            grayscale=cfg.embedded_grayscale, transform=transform)


def _imagefolder(cfg: DataConfig, split: str, transform: Callable | None, seed: int) -> Dataset:
    from torchvision.datasets import ImageFolder

    folder = Path(cfg.root) / split
    if not folder.is_dir():
        raise _missing("imagefolder", cfg.root, _LAYOUTS["imagefolder"], f"{str(folder)!r} does not exist")
    try:
        return ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as err:  # no class folder, or a class folder without images
        raise _missing("imagefolder", cfg.root, _LAYOUTS["imagefolder"], f"{str(folder)!r}: {first_line(err)}"
                       ) from None


def _torchvision(cls_name: str, train_kw: dict, val_kw: dict, train_extra: tuple[dict, ...] = ()):
    def build(cfg: DataConfig, split: str, transform: Callable | None, seed: int) -> Dataset:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        parts = [train_kw, *train_extra] if split == "train" else [val_kw]
        made = [cls(root=cfg.root, download=cfg.download, transform=transform, **kw) for kw in parts]
        return made[0] if len(made) == 1 else ConcatDataset(made)

    return build


def _specs() -> dict[str, _Spec]:
    return {
        "embedded": _Spec(_embedded, len(EMBEDDED_CLASSES), needs_root=False),
        "imagefolder": _Spec(_imagefolder, None, test=True),
        "cub200": _Spec(lambda c, s, tf, seed: CUB200(c.root, train=s == "train", transform=tf), 200,
                        val_is_test=True),
        "stanford_cars": _Spec(_torchvision("StanfordCars", {"split": "train"}, {"split": "test"}), 196,
                               val_is_test=True),
        "fgvc_aircraft": _Spec(_torchvision("FGVCAircraft", {"split": "trainval"}, {"split": "test"}), 100,
                               val_is_test=True),
        # the usual fine-grained protocol trains on train+val (2040 images) and reports the test split
        "flowers102": _Spec(_torchvision("Flowers102", {"split": "train"}, {"split": "test"}, ({"split": "val"},)),
                            102, val_is_test=True),
        "oxford_pet": _Spec(_torchvision("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}), 37,
                            val_is_test=True),
        "cifar10": _Spec(_torchvision("CIFAR10", {"train": True}, {"train": False}), 10, val_is_test=True),
        "cifar100": _Spec(_torchvision("CIFAR100", {"train": True}, {"train": False}), 100, val_is_test=True),
    }


def dataset_names() -> list[str]:
    """The names ``data.dataset`` takes."""
    return list(_specs())


def dataset_layout(name: str) -> str:
    """The folder layout ``data.root`` must have for data set ``name``."""
    _spec(name)
    return _LAYOUTS[name]


def dataset_splits(name: str) -> tuple[str, ...]:
    """The splits ``covpool eval --split`` takes for data set ``name``: ``train`` and ``val`` always; ``test``
    where the data set has one (an ImageFolder's ``test/`` folder) or where ``val`` already is the official
    test split (CUB-200, the torchvision data sets: ``test`` and ``val`` are the same images)."""
    spec = _spec(name)
    return ("train", "val", "test") if spec.test or spec.val_is_test else ("train", "val")


def _spec(name: str) -> _Spec:
    specs = _specs()
    if name not in specs:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(specs)}")
    return specs[name]


def _check_root(cfg: DataConfig) -> None:
    spec = _spec(cfg.dataset)
    if not spec.needs_root:
        return
    if cfg.root is None:
        raise _missing(cfg.dataset, None, _LAYOUTS[cfg.dataset], "data.root is not set")
    if not Path(cfg.root).is_dir() and not cfg.download:
        raise _missing(cfg.dataset, cfg.root, _LAYOUTS[cfg.dataset], f"root {cfg.root!r} does not exist")


def num_classes_of(cfg: DataConfig) -> int:
    """Number of classes of the configured data set, without reading the images."""
    _check_root(cfg)
    spec = _spec(cfg.dataset)
    if spec.num_classes is not None:
        return spec.num_classes
    train = Path(cfg.root) / "train"
    if not train.is_dir():
        raise _missing(cfg.dataset, cfg.root, _LAYOUTS[cfg.dataset], f"{str(train)!r} does not exist")
    return sum(1 for p in train.iterdir() if p.is_dir())


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

    args = {"input_size": (3, cfg.img_size, cfg.img_size)}
    if cfg.crop_pct is not None:
        args["crop_pct"] = cfg.crop_pct
    if cfg.interpolation is not None:
        args["interpolation"] = cfg.interpolation
    return resolve_data_config(args, model=model)


def image_transform(cfg: DataConfig, model: torch.nn.Module | None = None) -> Callable:
    """The evaluation transform of config ``cfg`` for a PIL image (what ``covpool predict`` applies to a file):
    timm's resize, centre crop and normalisation for the model; for a model trained on the embedded data set,
    a centre crop resized to ``data.img_size`` (grey when ``data.embedded_grayscale``), as its patches were."""
    if cfg.dataset != "embedded":
        return _transform(cfg, model, train=False)
    from torchvision.transforms import v2

    mean, std = _mean_std(model)
    steps = [v2.PILToTensor(), v2.Resize(cfg.img_size, antialias=True), v2.CenterCrop(cfg.img_size)]
    if cfg.embedded_grayscale:
        steps.append(v2.Grayscale(num_output_channels=3))
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def class_names_of(dataset: Dataset) -> list[str] | None:
    """A data set's class names in label order (its ``classes``; the first part's for a ``ConcatDataset``),
    or None when it does not say."""
    if isinstance(dataset, ConcatDataset):
        return class_names_of(dataset.datasets[0])
    classes = getattr(dataset, "classes", None)
    return [str(c) for c in classes] if classes is not None else None


def _labels_of(dataset: Dataset) -> list[int] | None:
    if isinstance(dataset, ConcatDataset):
        parts = [_labels_of(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [label for p in parts for label in p]
    for name in ("targets", "_labels"):
        labels = getattr(dataset, name, None)
        if labels is not None:
            return [int(x) for x in labels]
    samples = getattr(dataset, "_samples", None)  # StanfordCars: (path, label) pairs
    return [int(label) for _, label in samples] if samples is not None else None


def sample_names(dataset: Dataset) -> list[str]:
    """What names each sample in the predictions of ``covpool eval``: its file (ImageFolder, CUB-200 and the
    torchvision data sets that keep paths), else its index."""
    if isinstance(dataset, ConcatDataset):
        return [name for d in dataset.datasets for name in sample_names(d)]
    samples = getattr(dataset, "samples", None) or getattr(dataset, "_samples", None)
    if samples is not None:
        return [str(s[0]) for s in samples]
    files = getattr(dataset, "_image_files", None) or getattr(dataset, "_images", None)
    if files is not None and len(files) == len(dataset):
        return [str(f) for f in files]
    return [str(i) for i in range(len(dataset))]


def check_class_lists(expected: list[str], found: list[str], what: str, advice: str = "") -> None:
    """Raise :class:`ClassListError` when two class lists differ, naming the classes ``found`` lacks and those
    it has in excess (or, with the same names, that the order differs): labels are indices into these lists,
    so any difference makes a label mean another class. ``what`` says which lists (e.g. ``"val/ against
    train/"``)."""
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
        """Attach each split's transform (training augmentation for ``train``, evaluation otherwise), with the
        normalisation of ``model``'s pretrained config."""
        for split, later in self._later.items():
            later.transform = _transform(cfg, model, split == "train")

    def describe(self) -> str:
        """``"8 classes; train 24 images, val 16 images"``, for the start-up header."""
        sizes = ", ".join(f"{split} {len(ds)} images" for split, ds in self.datasets.items())
        return f"{len(self.classes)} classes; {sizes}"


def open_datasets(cfg: DataConfig, splits: tuple[str, ...] = ("train", "val"), seed: int = 0) -> Splits:
    """Read the ``splits`` of the configured data set (root, layout, annotations; no image is decoded and no
    model is needed) and check that their class lists agree. Transforms come later
    (``Splits.set_transforms``).

    Raises:
        DatasetNotFoundError: the root or a split is missing, or does not hold the expected files (the message
            shows the layout).
        ClassListError: the splits' class lists differ (the message names the missing and extra classes), or a
            label lies outside the class list.
        ConfigError: a split the data set does not have, or an ``img_size`` the data set cannot give.
    """
    _check_root(cfg)
    spec = _spec(cfg.dataset)
    valid = dataset_splits(cfg.dataset)
    for split in splits:
        if split not in valid:
            raise ConfigError(f"data set {cfg.dataset!r} has no {split!r} split; its splits: {', '.join(valid)}")
    datasets, later = {}, {}
    for split in splits:
        later[split] = _Later()
        which = "val" if split == "test" and spec.val_is_test else split
        try:
            datasets[split] = spec.build(cfg, which, later[split], seed)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            if "not found" not in str(err).lower():
                raise
            raise _missing(cfg.dataset, cfg.root, _LAYOUTS[cfg.dataset], f"torchvision found nothing under "
                           f"{cfg.root!r} ({err})") from err
    classes = None
    for split, ds in datasets.items():
        names = class_names_of(ds)
        if names is None:
            names = [str(i) for i in range(spec.num_classes or 0)]
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
    with its transform (normalisation from ``model``'s pretrained config when given, ImageNet statistics
    otherwise); the other splits are not read."""
    split = ("train" if train else "val") if isinstance(train, bool) else train
    splits = open_datasets(cfg, (split,), seed)
    splits.set_transforms(cfg, model)
    return splits[split]


def build_datasets(cfg: DataConfig, model: torch.nn.Module | None = None, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Training and validation data sets (:func:`open_datasets`, whose class lists must agree) with their
    transforms."""
    splits = open_datasets(cfg, ("train", "val"), seed)
    splits.set_transforms(cfg, model)
    return splits["train"], splits["val"]



class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (a shuffle fixed by ``seed`` and the epoch, the same on every process)
    that can skip the batches already done when a run resumes mid-epoch (``skip`` samples, this epoch)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank``, no padding: per-process sums add up to exact totals."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_train_loader(cfg: DataConfig, train_set: Dataset, seed: int, rank: int = 0, world_size: int = 1,
                       pin_memory: bool = False) -> DataLoader:
    """A loader over a :class:`ResumableSampler` (the last incomplete batch dropped). Its ``generator`` seeds
    worker augmentation; the trainer reseeds it every epoch so that resumed and uninterrupted runs draw the
    same numbers."""
    if len(train_set) < cfg.batch_size * world_size:
        raise ConfigError(f"the training set has {len(train_set)} images, fewer than one batch "
                         f"({cfg.batch_size} x {world_size} processes); lower data.batch_size")
    return DataLoader(train_set, batch_size=cfg.batch_size, sampler=ResumableSampler(
        train_set, world_size, rank, seed), num_workers=cfg.workers, pin_memory=pin_memory, drop_last=True,
        generator=torch.Generator())


def build_val_loader(cfg: DataConfig, val_set: Dataset, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> DataLoader:
    """A loader over a :class:`ShardSampler`: every image once, over all processes."""
    return DataLoader(val_set, batch_size=cfg.val_batch_size or 2 * cfg.batch_size,
                      sampler=ShardSampler(val_set, world_size, rank), num_workers=cfg.workers, pin_memory=pin_memory)


def build_loaders(cfg: DataConfig, train_set: Dataset, val_set: Dataset, seed: int, rank: int = 0,
                  world_size: int = 1, pin_memory: bool = False) -> tuple[DataLoader, DataLoader]:
    """:func:`build_train_loader` and :func:`build_val_loader`."""
    return (build_train_loader(cfg, train_set, seed, rank, world_size, pin_memory),
            build_val_loader(cfg, val_set, rank, world_size, pin_memory))
