"""The data sets ``covpool train`` knows by name (``data.dataset``): each one's builder, class count, splits and
the folder layout ``data.root`` must have.

The registry under :mod:`covpool.train.data` (which reads the splits, attaches transforms and makes loaders),
kept apart from it so that the config can take ``data.dataset``'s values from it (:func:`dataset_names`)
without importing the data pipeline that reads the config.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from ..outputs import first_line
from ._schema import ConfigError
from .embedded import EMBEDDED_CLASSES, EmbeddedTextures

__all__ = ["DatasetNotFoundError", "CUB200", "LAYOUTS", "Spec", "specs", "spec", "dataset_names", "dataset_layout",
           "dataset_splits", "check_root", "check_img_size", "num_classes_of", "not_found"]


class DatasetNotFoundError(FileNotFoundError):
    """The data-set root is missing or does not hold the expected files."""


def not_found(name: str, root: Any, layout: str, why: str) -> DatasetNotFoundError:
    """The error for a data set that is not where ``data.root`` says, with the layout expected there."""
    return DatasetNotFoundError(
        f"data set {name!r}: {why}. Expected layout under data.root:\n{layout}\n"
        f"Point data.root=<folder> at it (e.g. `covpool train --config ... data.root=/data/{name}`)"
        + ("" if name in ("imagefolder", "cub200") else ", or set data.download=true where torchvision can fetch it")
        + "."
    )


class CUB200(Dataset):
    """Caltech-UCSD Birds-200-2011 read from its native layout (``root`` is the ``CUB_200_2011`` folder
    or its parent): ``images.txt``, ``train_test_split.txt``, ``image_class_labels.txt``, ``classes.txt``
    and ``images/``. Labels are 0-based; 5994 training and 5794 test images in the official split.

    Args:
        root: the ``CUB_200_2011`` folder, or the folder that holds it.
        train: the official training split (True) or its test split (False).
        transform: applied to each RGB PIL image; None: items are the PIL images themselves.

    Items are ``(image, label)``, ``label`` an int in [0, 200).

    Raises:
        DatasetNotFoundError: ``root`` lacks one of the files or ``images/`` (the message shows the layout).
    """

    FILES = ("images.txt", "train_test_split.txt", "image_class_labels.txt", "classes.txt")

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None) -> None:
        root = Path(root)
        if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
            root = root / "CUB_200_2011"
        missing = [f for f in (*self.FILES, "images") if not (root / f).exists()]
        if missing:
            raise not_found("cub200", root, LAYOUTS["cub200"], f"{str(root)!r} lacks {', '.join(missing)}")
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

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            image = img.convert("RGB")
        return (self.transform(image) if self.transform else image), label


LAYOUTS = MappingProxyType({
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


#: ``build(cfg, split, transform, seed)``: a split of a data set, for the data section ``cfg`` of a config (a
#: ``DataConfig``, typed Any here: config.py takes data.dataset's values from this module)
Builder = Callable[[Any, str, Callable[[Any], Any] | None, int], Dataset]


@dataclass(frozen=True)
class Spec:
    """One data set: how to build a split of it, and what it needs."""

    build: Builder
    num_classes: int | None  # None: read from the data (ImageFolder)
    needs_root: bool = True
    # "test" is another name of "val": the validation split of these data sets is their official test split
    val_is_test: bool = False
    test: bool = False  # a test split of its own (an ImageFolder's optional test/ folder)
    min_img_size: int = 1  # the embedded data set cuts patches of at least 8x8 pixels


def _embedded(cfg: Any, split: str, transform: Callable | None, seed: int) -> Dataset:
    check_img_size(cfg)
    return EmbeddedTextures(split, img_size=cfg.img_size, seed=seed,
                            per_class=cfg.embedded_train_per_class if split == "train" else cfg.embedded_val_per_class,
                            grayscale=cfg.embedded_grayscale, transform=transform)


def _imagefolder(cfg: Any, split: str, transform: Callable | None, seed: int) -> Dataset:
    from torchvision.datasets import ImageFolder

    folder = Path(cfg.root) / split
    if not folder.is_dir():
        raise not_found("imagefolder", cfg.root, LAYOUTS["imagefolder"], f"{str(folder)!r} does not exist")
    try:
        return ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as err:  # no class folder, or a class folder without images
        raise not_found("imagefolder", cfg.root, LAYOUTS["imagefolder"], f"{str(folder)!r}: {first_line(err)}"
                       ) from None


def _torchvision(cls_name: str, train_kw: dict[str, Any], val_kw: dict[str, Any],
                 train_extra: tuple[dict[str, Any], ...] = ()) -> Builder:
    def build(cfg: Any, split: str, transform: Callable | None, seed: int) -> Dataset:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        parts = [train_kw, *train_extra] if split == "train" else [val_kw]
        made = [cls(root=cfg.root, download=cfg.download, transform=transform, **kw) for kw in parts]
        return made[0] if len(made) == 1 else ConcatDataset(made)

    return build


def specs() -> dict[str, Spec]:
    """Every data set, name -> :class:`Spec`, made afresh (no module-level state)."""
    return {
        "embedded": Spec(_embedded, len(EMBEDDED_CLASSES), needs_root=False, min_img_size=8),
        "imagefolder": Spec(_imagefolder, None, test=True),
        "cub200": Spec(lambda c, s, tf, seed: CUB200(c.root, train=s == "train", transform=tf), 200,
                        val_is_test=True),
        "stanford_cars": Spec(_torchvision("StanfordCars", {"split": "train"}, {"split": "test"}), 196,
                               val_is_test=True),
        "fgvc_aircraft": Spec(_torchvision("FGVCAircraft", {"split": "trainval"}, {"split": "test"}), 100,
                               val_is_test=True),
        # the usual fine-grained protocol trains on train+val (2040 images) and reports the test split
        "flowers102": Spec(_torchvision("Flowers102", {"split": "train"}, {"split": "test"}, ({"split": "val"},)),
                            102, val_is_test=True),
        "oxford_pet": Spec(_torchvision("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}), 37,
                            val_is_test=True),
        "cifar10": Spec(_torchvision("CIFAR10", {"train": True}, {"train": False}), 10, val_is_test=True),
        "cifar100": Spec(_torchvision("CIFAR100", {"train": True}, {"train": False}), 100, val_is_test=True),
    }


def dataset_names() -> list[str]:
    """The names ``data.dataset`` takes."""
    return list(specs())


def dataset_layout(name: str) -> str:
    """The folder layout ``data.root`` must have for data set ``name``."""
    spec(name)
    return LAYOUTS[name]


def dataset_splits(name: str) -> tuple[str, ...]:
    """The splits ``covpool eval --split`` takes for data set ``name``: ``train`` and ``val`` always; ``test``
    where the data set has one (an ImageFolder's ``test/`` folder) or where ``val`` already is the official
    test split (CUB-200, the torchvision data sets: ``test`` and ``val`` are the same images)."""
    known = spec(name)
    return ("train", "val", "test") if known.test or known.val_is_test else ("train", "val")


def spec(name: str) -> Spec:
    """The registry entry of data set ``name``; an unknown name is a ValueError listing the names."""
    known = specs()
    if name not in known:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(known)}")
    return known[name]


def check_root(cfg: Any) -> None:
    """Raise :class:`DatasetNotFoundError` when data section ``cfg`` names no root, or a missing one, for a data
    set that needs one (unless torchvision may download it there)."""
    known = spec(cfg.dataset)
    if not known.needs_root:
        return
    if cfg.root is None:
        raise not_found(cfg.dataset, None, LAYOUTS[cfg.dataset], "data.root is not set")
    if not Path(cfg.root).is_dir() and not cfg.download:
        raise not_found(cfg.dataset, cfg.root, LAYOUTS[cfg.dataset], f"root {cfg.root!r} does not exist")


def check_img_size(cfg: Any) -> None:
    """Raise :class:`ConfigError` when data section ``cfg`` asks for inputs smaller than its data set gives."""
    least = spec(cfg.dataset).min_img_size
    if cfg.img_size < least:
        raise ConfigError(f"data.img_size={cfg.img_size}: the {cfg.dataset} data set cuts patches of at least "
                          f"{least}x{least} pixels; use data.img_size >= {least}")


def num_classes_of(cfg: Any) -> int:
    """Number of classes of the data set that ``cfg`` (a config's data section) names, without reading the
    images (an ImageFolder's: its ``train/`` class folders).

    Raises:
        DatasetNotFoundError: the data set needs ``data.root`` and it is missing, or an ImageFolder root has no
            ``train/`` folder.
    """
    check_root(cfg)
    known = spec(cfg.dataset)
    if known.num_classes is not None:
        return known.num_classes
    train = Path(cfg.root) / "train"
    if not train.is_dir():
        raise not_found(cfg.dataset, cfg.root, LAYOUTS[cfg.dataset], f"{str(train)!r} does not exist")
    return sum(1 for p in train.iterdir() if p.is_dir())
