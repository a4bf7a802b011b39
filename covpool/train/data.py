"""Data sets, transforms and loaders for ``covpool train``.

Data sets are looked up by name in :func:`dataset_names`: the embedded texture task (no download), an
ImageFolder tree, CUB-200-2011 in its native layout, and torchvision's StanfordCars, FGVCAircraft,
Flowers102, OxfordIIITPet, CIFAR-10/100. Downloads are off unless ``data.download: true``; a missing root
raises :class:`DatasetNotFoundError` naming the layout that is expected.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler

from .config import ConfigError, DataConfig
from .embedded import EMBEDDED_CLASSES, EmbeddedTextures

__all__ = [
    "DatasetNotFoundError",
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
    "imagefolder": "  train/<class>/<image>.jpg ...\n  val/<class>/<image>.jpg ...   (same class folder names)",
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


@dataclass(frozen=True)
class _Spec:
    build: Callable[[DataConfig, bool, Callable | None, int], Dataset]  # (cfg, train, transform, seed)
    num_classes: int | None  # None: read from the data (ImageFolder)
    needs_root: bool = True


def _embedded(cfg: DataConfig, train: bool, transform: Callable | None, seed: int) -> Dataset:
    return EmbeddedTextures("train" if train else "val", img_size=cfg.img_size, seed=seed,
                            per_class=cfg.embedded_train_per_class if train else cfg.embedded_val_per_class,
                            grayscale=cfg.embedded_grayscale, transform=transform)


def _imagefolder(cfg: DataConfig, train: bool, transform: Callable | None, seed: int) -> Dataset:
    from torchvision.datasets import ImageFolder

    folder = Path(cfg.root) / ("train" if train else "val")
    if not folder.is_dir():
        raise _missing("imagefolder", cfg.root, _LAYOUTS["imagefolder"], f"{str(folder)!r} does not exist")
    return ImageFolder(str(folder), transform=transform)


def _torchvision(cls_name: str, train_kw: dict, val_kw: dict, train_extra: tuple[dict, ...] = ()):
    def build(cfg: DataConfig, train: bool, transform: Callable | None, seed: int) -> Dataset:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        parts = [train_kw, *train_extra] if train else [val_kw]
        made = [cls(root=cfg.root, download=cfg.download, transform=transform, **kw) for kw in parts]
        return made[0] if len(made) == 1 else ConcatDataset(made)

    return build


def _specs() -> dict[str, _Spec]:
    return {
        "embedded": _Spec(_embedded, len(EMBEDDED_CLASSES), needs_root=False),
        "imagefolder": _Spec(_imagefolder, None),
        "cub200": _Spec(lambda c, t, tf, seed: CUB200(c.root, train=t, transform=tf), 200),
        "stanford_cars": _Spec(_torchvision("StanfordCars", {"split": "train"}, {"split": "test"}), 196),
        "fgvc_aircraft": _Spec(_torchvision("FGVCAircraft", {"split": "trainval"}, {"split": "test"}), 100),
        # the usual fine-grained protocol trains on train+val (2040 images) and reports the test split
        "flowers102": _Spec(_torchvision("Flowers102", {"split": "train"}, {"split": "test"}, ({"split": "val"},)),
                            102),
        "oxford_pet": _Spec(_torchvision("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}), 37),
        "cifar10": _Spec(_torchvision("CIFAR10", {"train": True}, {"train": False}), 10),
        "cifar100": _Spec(_torchvision("CIFAR100", {"train": True}, {"train": False}), 100),
    }


def dataset_names() -> list[str]:
    """The names ``data.dataset`` takes."""
    return list(_specs())


def dataset_layout(name: str) -> str:
    """The folder layout ``data.root`` must have for data set ``name``."""
    _spec(name)
    return _LAYOUTS[name]


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
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        from torchvision.transforms import v2

        pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN)
        std = pretrained_cfg.get("std", IMAGENET_DEFAULT_STD)
        if not train:
            return v2.Normalize(mean, std)
        # textures have no up or down: both flips are label-preserving
        return v2.Compose([v2.RandomHorizontalFlip(cfg.hflip), v2.RandomVerticalFlip(cfg.hflip),
                           v2.Normalize(mean, std)])

    from timm.data import create_transform, resolve_data_config

    args = {"input_size": (3, cfg.img_size, cfg.img_size)}
    if cfg.crop_pct is not None:
        args["crop_pct"] = cfg.crop_pct
    if cfg.interpolation is not None:
        args["interpolation"] = cfg.interpolation
    data_cfg = resolve_data_config(args, model=model)
    if not train:
        return create_transform(**data_cfg, is_training=False)
    return create_transform(**data_cfg, is_training=True, hflip=cfg.hflip, color_jitter=cfg.color_jitter,
                            auto_augment=cfg.auto_augment, re_prob=cfg.re_prob,
                            scale=tuple(cfg.scale) if cfg.scale else None)


def build_dataset(cfg: DataConfig, train: bool, model: torch.nn.Module | None = None, seed: int = 0) -> Dataset:
    """The training (``train``) or validation data set with its transform (normalisation from ``model``'s
    pretrained config when given, ImageNet statistics otherwise); the other split is not read."""
    _check_root(cfg)
    spec = _spec(cfg.dataset)
    try:
        return spec.build(cfg, train, _transform(cfg, model, train), seed)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        if "not found" not in str(err).lower():
            raise
        raise _missing(cfg.dataset, cfg.root, _LAYOUTS[cfg.dataset], f"torchvision found nothing under "
                       f"{cfg.root!r} ({err})") from err


def build_datasets(cfg: DataConfig, model: torch.nn.Module | None = None, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Training and validation data sets (:func:`build_dataset`)."""
    return build_dataset(cfg, True, model, seed), build_dataset(cfg, False, model, seed)


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
