"""What the layers share with the models built on them (internal): the factory keyword arguments of torch's
constructors typed once, the keyword options of :class:`covpool.SoViTHead` as a type, and the checked width of
a head's pooling module."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import torch
from torch import nn

from covpool.linalg import BackendSpec

__all__ = ["Factory", "SoViTHeadOptions", "out_features_of"]


class Factory(TypedDict, total=False):
    """``device`` and ``dtype``, the factory keyword arguments a layer passes on to the parameters and buffers it
    makes (``nn.Linear(..., **factory)``, ``torch.empty(..., **factory)``, ``module.to(**factory)``); either may
    be left out, and None is torch's default."""

    device: torch.device | str | None
    dtype: torch.dtype | None


class SoViTHeadOptions(TypedDict, total=False):
    """The keyword options of :class:`covpool.SoViTHead` after ``embed_dim`` and ``num_classes`` (a model keeps
    them to build its head again, ``SoViTHead(embed_dim, num_classes, **options)``); see its docstring."""

    reduced_dim: int | tuple[int, int] | None
    backend: BackendSpec | None
    drop_rate: float
    head: str
    centering: str | None
    pool_options: Mapping[str, Any] | None


def out_features_of(pool: nn.Module, where: str) -> int:
    """``pool.out_features``, the width of the ``(B, out_features)`` output of a head's pooling module (the
    contract of :class:`covpool.layers.Head`'s ``module``); a TypeError naming ``where`` (what builds on it)
    when the module has none or it is not an integer."""
    width = getattr(pool, "out_features", None)
    if not isinstance(width, int) or isinstance(width, bool):
        raise TypeError(f"{where} needs a pooling module with an integer out_features (the width of its "
                        f"(B, out_features) output), got {type(pool).__name__} with out_features={width!r}")
    return width
