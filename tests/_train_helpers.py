"""Shared helpers for tests/test_train.py and tests/test_examples.py: tiny configs and fake data trees."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["REPO", "tiny_overrides", "make_imagefolder", "make_cub"]

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(output_dir: Path, name: str = "tiny", **extra: object) -> list[str]:
    """A run that takes seconds: timm's 0.4M-parameter ``test_resnet`` on 32x32 embedded patches,
    8 per class, 3 steps of 8 images per epoch, no workers, no bars."""
    base = {
        "name": name, "output_dir": str(output_dir), "epochs": 1, "seed": 0, "progress": "false",
        "model.name": "test_resnet", "data.dataset": "embedded", "data.img_size": 32, "data.batch_size": 8,
        "data.workers": 0, "data.embedded_train_per_class": 3, "data.embedded_val_per_class": 2,
        "optim.lr": 0.05, "optim.sched": "cosine",
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def _write_jpeg(path: Path, seed: int, size: int = 24) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_imagefolder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` with random pixels."""
    for split in ("train", "val"):
        for c in range(classes):
            for i in range(per_class):
                _write_jpeg(root / split / f"class{c}" / f"{i}.jpg", seed=100 * c + i + (50 if split == "val" else 0))
    return root


def make_cub(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """A CUB-200-2011 tree in its native layout (``root/CUB_200_2011/...``); every other image is a
    training image."""
    cub = root / "CUB_200_2011"
    images, split, labels, names = [], [], [], []
    n = 0
    for c in range(1, classes + 1):
        name = f"{c:03d}.Bird_{c}"
        names.append(f"{c} {name}")
        for i in range(per_class):
            n += 1
            rel = f"{name}/{name}_{i}.jpg"
            _write_jpeg(cub / "images" / rel, seed=n)
            images.append(f"{n} {rel}")
            split.append(f"{n} {int(i % 2 == 0)}")
            labels.append(f"{n} {c}")
    for filename, rows in (("images.txt", images), ("train_test_split.txt", split),
                           ("image_class_labels.txt", labels), ("classes.txt", names)):
        (cub / filename).write_text("\n".join(rows) + "\n")
    return root
