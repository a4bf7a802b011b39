"""Every seed a run uses, derived from the config's ``seed`` in one place.

A run seeds python's ``random``, numpy and torch once (:func:`seed_everything`); the other processes of a
torchrun job move to streams of their own (:func:`process_seed`), and the training loader's workers draw
their augmentation from a generator reseeded every epoch (:func:`loader_seed`), so a resumed run draws what
the uninterrupted one did. Rank 0's seeds are the config's own, so a one-process run does not depend on
these formulas.
"""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything", "process_seed", "loader_seed"]

# A prime stride between the streams of two processes (and of two epochs of one loader): seeds a few
# processes or epochs apart never meet for any config seed below 2**32.
_STRIDE = 7919
# Spaces the loader seeds of consecutive config seeds: epoch x _STRIDE + rank stays below it for the first 126
# epochs, so two config seeds never share a loader stream there.
_SEED_SPACING = 1_000_003


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy (modulo 2**32, its limit) and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def process_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of process ``rank`` (rank 0: ``seed`` itself); ``step`` > 0 when a run restarts its streams
    at a global step (a resume with another number of processes, whose saved streams do not fit)."""
    return seed + _STRIDE * rank + step


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of the training loader's generator in ``epoch`` on process ``rank``: a function of these
    three only, so an epoch's augmentation draws do not depend on where a run was resumed."""
    return seed * _SEED_SPACING + epoch * _STRIDE + rank
