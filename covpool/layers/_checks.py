"""Argument checks shared by the meta-layers (internal)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from covpool.linalg import get_backend

__all__ = ["check_backend", "check_positive_int", "work_dtype"]


def check_backend(backend: Any) -> None:
    """Fail at construction, not at the first forward, on an unknown backend name or option.

    The spec itself is passed to :func:`covpool.linalg.sqrtm` untouched; this only looks it up.
    """
    if isinstance(backend, str):
        get_backend(backend)
    elif isinstance(backend, Mapping):
        spec = dict(backend)
        if "name" not in spec:
            raise ValueError(f"a backend dict needs a 'name' key, e.g. {{'name': 'mpa_lya'}}; got {backend!r}")
        get_backend(spec.pop("name")).bind(spec)
    else:
        raise TypeError(f"backend must be a name or a dict with 'name' and options, got {type(backend).__name__}")


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Covariances of half-precision features lose most of their digits: compute them in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32
