"""Deprecated path: :class:`covpool.CovPool` and :class:`covpool.layers.AdaptiveChannelDrop` live in
:mod:`covpool.layers.pooling` (import them from :mod:`covpool.layers`); this module goes in the next release."""
from __future__ import annotations

import warnings
from typing import Any

from . import pooling

__all__: list[str] = []  # nothing of its own: every name it gave moved


def __getattr__(name: str) -> Any:
    if name not in ("CovPool", "AdaptiveChannelDrop"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"covpool.layers.covpool_layer is now covpool.layers.pooling: import {name} from covpool.layers "
                  "(this path goes in the next release)", FutureWarning, stacklevel=2)
    return getattr(pooling, name)
