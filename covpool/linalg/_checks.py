"""The argument rules every layer of covpool shares (internal): integer and number guards, and the
dtype the square roots and covariances are computed in (:func:`work_dtype`, :func:`full_precision`).

Backend options, the meta-layers and the models all call these, so a rule and its error message are
written once. ``bool`` is an ``int`` in Python; no count or size accepts ``True``.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, overload

import torch

__all__ = ["is_int", "is_number", "check_int", "check_number", "check_bool", "check_keywords", "did_you_mean",
           "check_square", "WORK_DTYPES", "work_dtype", "full_precision"]

WORK_DTYPES = (torch.float32, torch.float64)


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@overload
def check_int(name: str, value: Any, low: int = ..., *, allow_none: Literal[False] = ...) -> int: ...
@overload
def check_int(name: str, value: Any, low: int = ..., *, allow_none: bool) -> int | None: ...
def check_int(name: str, value: Any, low: int = 1, *, allow_none: bool = False) -> int | None:
    """``value`` if it is an integer >= ``low`` (or None when allowed); otherwise ValueError naming ``name``."""
    if allow_none and value is None:
        return None
    if not is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{' or None' if allow_none else ''}, got {value!r}")
    return value


@overload
def check_number(name: str, value: Any, low: float = ..., high: float = ..., *, open_low: bool = ...,
                 open_high: bool = ..., allow_none: Literal[False] = ..., note: str = ...) -> float: ...
@overload
def check_number(name: str, value: Any, low: float = ..., high: float = ..., *, open_low: bool = ...,
                 open_high: bool = ..., allow_none: bool, note: str = ...) -> float | None: ...
def check_number(
    name: str,
    value: Any,
    low: float = 0.0,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
    allow_none: bool = False,
    note: str = "",
) -> float | None:
    """``float(value)`` if it is a real number in the interval from ``low`` to ``high`` (closed unless
    ``open_low``/``open_high``; an infinite ``high`` also excludes infinity and NaN), or None when allowed.
    Otherwise ValueError naming ``name``, the interval and ``note`` (what the value is for)."""
    if allow_none and value is None:
        return None
    if is_number(value):
        above = value > low if open_low else value >= low
        below = value < high if open_high or high == math.inf else value <= high
        if above and below:
            return float(value)
    if high == math.inf:
        bound = f"{'>' if open_low else '>='} {low:g}"
        what = "a positive finite number" if (low == 0 and open_low) else f"a finite number {bound}"
    else:
        what = f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    extra = f" ({note})" if note else ""
    raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}{extra}, got {value!r}")


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``; otherwise ValueError naming ``name``. Strings are refused: the
    string ``"false"`` is truthy."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` with the name in ``valid`` closest to ``key`` (difflib), or ``""``."""
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keywords(where: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Raise TypeError for the keyword arguments in ``given`` that are not in ``valid``, naming the public
    function ``where``, the closest valid name of each (difflib) and every valid one: a typo in an option passed
    down through layers would otherwise surface as an unexpected keyword argument of an internal class."""
    valid = list(valid)
    unknown = [k for k in given if k not in valid]
    if not unknown:
        return
    parts = [f"{key!r}{did_you_mean(key, valid)}" for key in unknown]
    noun = "argument" if len(unknown) == 1 else "arguments"
    raise TypeError(f"{where} got an unexpected keyword {noun} {', '.join(parts)}; valid: {', '.join(valid)}")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype roots and covariances are computed in: float32/float64 as they are, anything else
    (float16, bfloat16, integers) in float32: half precision loses most of a covariance's digits and
    the iterations their convergence."""
    return dtype if dtype in WORK_DTYPES else torch.float32


def full_precision(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """``fn(*tensors)`` with autocast off and every tensor in the work dtype (:func:`work_dtype`), its result
    cast back to ``dtype``: by default the first tensor's, or the default float dtype for integer and bool
    tensors (a covariance of integers is not an integer, so it is never truncated back).

    The one home of covpool's precision rule: every square root, covariance and normalisation of the
    backends and the meta-layers runs through it, so float16/bfloat16 input and autocast regions compute in
    float32 and return the input dtype.
    """
    first = tensors[0]
    out_dtype = dtype or (first.dtype if first.is_floating_point() else torch.get_default_dtype())
    work = work_dtype(out_dtype)
    with torch.autocast(device_type=first.device.type, enabled=False):
        return fn(*(t.to(work) for t in tensors)).to(out_dtype)


def check_square(a: Any, what: str = "a") -> None:
    """Raise unless ``a`` is a floating-point tensor of shape ``(*, n, n)``, naming it ``what``."""
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(a).__name__}")
    if a.dim() < 2:
        raise ValueError(f"{what} must have shape (*, n, n) with at least 2 dimensions, got shape {tuple(a.shape)}")
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{what} must be square in its last two dimensions, got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {a.dtype}")
