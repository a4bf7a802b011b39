"""Deprecated path: :class:`covpool.CovPool` and :class:`covpool.layers.AdaptiveChannelDrop` live in
:mod:`covpool.layers.pooling` (import them from :mod:`covpool.layers`); this module goes in the next release."""
from __future__ import annotations

from .._deprecation import moved_names

__all__: list[str] = []  # nothing of its own: every name it gave moved

__getattr__ = moved_names(__name__, {name: (f"covpool.layers.pooling:{name}", f"covpool.layers.{name}")
                                     for name in ("CovPool", "AdaptiveChannelDrop")})
