"""Shared helpers for the tests of covpool.train (tests/test_train_*.py) and tests/test_examples.py: tiny configs,
fake data trees, and what comparing two runs needs."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["REPO", "Killed", "tiny_overrides", "make_imagefolder", "make_cub", "read_rows", "last_weights",
           "assert_same_run", "one_step", "rel_diff", "weight_update"]

REPO = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """Stands for SIGKILL in fault-injection tests: nothing after it runs, no handler sees it."""


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


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file (metrics.csv) as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["state_dict"]


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same last weights, bit for bit, and the same metrics."""
    wa, wb = last_weights(a), last_weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc1", "lr")
    ra, rb = read_rows(a / "metrics.csv"), read_rows(b / "metrics.csv")
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]


def one_step(tmp_path: Path, name: str, **extra):
    """Parameters (float64 copies; not the BatchNorm statistics) and train loss after one optimizer step of a
    tiny run, and the model."""
    from covpool.train import load_config, train

    extra = {"max_steps_per_epoch": 1, "max_val_steps": 1, "optim__opt": "momentum", "optim__momentum": 0.0,
             "optim__weight_decay": 0.0, "optim__sched": "constant", **extra}
    result = train(load_config(None, tiny_overrides(tmp_path, name, **extra)))
    weights = {k: v.detach().double().clone() for k, v in result.model.named_parameters()}
    return weights, result.history[0]["train_loss"], result.model


def rel_diff(a: dict, b: dict) -> float:
    """Relative Frobenius distance of two sets of tensors with the same keys."""
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in a)
    return math.sqrt(num / max(den, 1e-300))


def weight_update(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}
