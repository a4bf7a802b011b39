"""The embedded data set: a small texture/material classification task that needs no download.

Each class is one real photograph that ships inside scikit-image (``skimage/data``); samples are random
square patches of it, resized to ``img_size``. Training patches come from the first 70 % of the image
along its longer side and validation patches from the last 25 %, so the two never share a pixel and
validation accuracy measures generalisation to unseen parts of the surface, not memorisation.

It is a toy: eight classes, one photo each, so it says how well a model tells *these* textures apart,
nothing about a real benchmark. By default the patches are grey, so colour alone cannot solve it.
Everything is deterministic given ``seed``.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["EmbeddedTextures", "EMBEDDED_CLASSES"]

#: The embedded data set's classes: ``(class name, file in skimage/data)``, photographs chosen for distinct
#: surface statistics (masonry, vegetation, stone, regolith, stained tissue, star field, fur, a table-top scene).
EMBEDDED_CLASSES: tuple[tuple[str, str], ...] = (
    ("brick", "brick.png"),
    ("grass", "grass.png"),
    ("gravel", "gravel.png"),
    ("moon", "moon.png"),
    ("tissue", "ihc.png"),
    ("stars", "hubble_deep_field.jpg"),
    ("fur", "chelsea.png"),
    ("coffee", "coffee.png"),
)

_TRAIN_END = 0.70  # fraction of the long side used for training patches
_VAL_START = 0.75  # validation patches start here; the gap keeps the regions disjoint even at the edge
_MIN_SIDE, _MAX_SIDE = 0.18, 0.40  # patch side as a fraction of the image's short side


def _data_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


@cache
def _photo(filename: str, grayscale: bool) -> np.ndarray:
    """``(H, W, 3)`` uint8 photo, read once per process (read-only array)."""
    import skimage.color
    import skimage.io

    path = _data_dir() / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the embedded data set reads scikit-image's bundled photos; "
            "reinstall scikit-image (pip install --force-reinstall scikit-image)"
        )
    img = skimage.io.imread(path)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    if grayscale:
        grey = (skimage.color.rgb2gray(img) * 255.0).round().astype(np.uint8)
        img = np.stack([grey] * 3, axis=-1)
    img = np.ascontiguousarray(img)
    img.setflags(write=False)
    return img


def _patch_boxes(h: int, w: int, count: int, train: bool, rng: np.random.Generator) -> np.ndarray:
    """``(count, 4)`` boxes ``(top, left, side, side)`` inside the split's region of an ``h x w`` image."""
    long_is_w = w >= h
    long, short = (w, h) if long_is_w else (h, w)
    lo, hi = (0, int(_TRAIN_END * long)) if train else (int(_VAL_START * long), long)
    sides = rng.integers(int(_MIN_SIDE * short), int(_MAX_SIDE * short) + 1, size=count)
    sides = np.minimum(sides, hi - lo)
    along = lo + (rng.random(count) * (hi - lo - sides + 1)).astype(int)
    across = (rng.random(count) * (short - sides + 1)).astype(int)
    top, left = (across, along) if long_is_w else (along, across)
    return np.stack([top, left, sides, sides], axis=1)


class EmbeddedTextures(Dataset):
    """Random patches of scikit-image's sample photos, one class per photo (see the module docstring).

    Args:
        split: ``"train"`` or ``"val"`` (spatially disjoint regions of each photo).
        img_size: side of the returned patches.
        per_class: patches per class.
        seed: fixes which patches are drawn; train and val draw from independent streams.
        grayscale: grey patches (default), so texture rather than colour must separate the classes.
        transform: applied to each ``(3, img_size, img_size)`` float tensor in [0, 1].

    Items are ``(image, label)`` with ``image`` a float32 tensor ``(3, img_size, img_size)``.
    The patches are cut and resized once, at construction (8 x per_class x 3 x img_size² bytes).
    """

    def __init__(self, split: str = "train", img_size: int = 64, per_class: int = 160, seed: int = 0,
                 grayscale: bool = True, transform: Callable[[torch.Tensor], Any] | None = None) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if img_size < 8 or per_class < 1:
            raise ValueError(f"need img_size >= 8 and per_class >= 1, got {img_size} and {per_class}")
        self.classes = [name for name, _ in EMBEDDED_CLASSES]
        self.transform = transform
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        patches, labels = [], []
        for label, (_, filename) in enumerate(EMBEDDED_CLASSES):
            img = torch.from_numpy(np.array(_photo(filename, grayscale))).permute(2, 0, 1)
            for top, left, side, _ in _patch_boxes(img.shape[1], img.shape[2], per_class, split == "train", rng):
                crop = img[:, top:top + side, left:left + side].float().unsqueeze(0)
                crop = F.interpolate(crop, size=(img_size, img_size), mode="bilinear", antialias=True,
                                     align_corners=False)
                patches.append(crop.clamp_(0, 255).round_().to(torch.uint8))
                labels.append(label)
        self.images = torch.cat(patches)
        self.targets = labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image: Any = self.images[index].float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
