"""Exact Taylor and Padé coefficients, computed on first use and cached.

Everything is done in rational arithmetic (:class:`fractions.Fraction`) and rounded to float once, so
the coefficients are exact to the last bit and nothing is computed at import time.
"""
from __future__ import annotations

from fractions import Fraction
from functools import cache
from itertools import zip_longest

import torch

__all__: list[str] = []

Degree = int | tuple[int, int]
"""An approximant's degree: an int for a Taylor polynomial, a pair ``(m, n)`` for a Padé approximant."""


def _binomial_series(exponent: Fraction, degree: int) -> tuple[Fraction, ...]:
    """Coefficients c_k of (1 - x)**exponent = sum_k c_k x**k, k = 0..degree."""
    coeffs = [Fraction(1)]
    for k in range(degree):
        # c_{k+1} = c_k * (k - exponent) / (k + 1), from binom(exponent, k+1) * (-1)**(k+1).
        coeffs.append(coeffs[-1] * (k - exponent) / (k + 1))
    return tuple(coeffs)


def _pade(taylor: tuple[Fraction, ...], m: int, n: int) -> tuple[tuple[Fraction, ...], tuple[Fraction, ...]]:
    """[m/n] Padé approximant P/Q (Q(0) = 1) of the series ``taylor`` (zero beyond its length).

    Solves the n×n Toeplitz system for Q exactly; raises ValueError when the Padé table is degenerate
    (singular system), which callers turn into a message about the chosen degree.
    """
    c = list(taylor) + [Fraction(0)] * (m + n + 1)
    rows = [[c[k - j] if k >= j else Fraction(0) for j in range(1, n + 1)] + [-c[k]] for k in range(m + 1, m + n + 1)]
    for i in range(n):
        pivot = next((r for r in range(i, n) if rows[r][i] != 0), None)
        if pivot is None:
            raise ValueError(f"the [{m}/{n}] Padé approximant is degenerate")
        rows[i], rows[pivot] = rows[pivot], rows[i]
        for r in range(n):
            if r != i and rows[r][i] != 0:
                factor = rows[r][i] / rows[i][i]
                rows[r] = [x - factor * y for x, y in zip(rows[r], rows[i])]
    q = [Fraction(1)] + [rows[i][n] / rows[i][i] for i in range(n)]
    p = [sum((q[j] * c[k - j] for j in range(min(k, n) + 1)), Fraction(0)) for k in range(m + 1)]
    return tuple(p), tuple(q)


def _to_float(coeffs: tuple[Fraction, ...]) -> tuple[float, ...]:
    return tuple(float(c) for c in coeffs)


# The public functions are constants to torch.compile (assume_constant_result): Dynamo calls them
# instead of tracing the rational arithmetic, which would take minutes.
@torch.compiler.assume_constant_result
def taylor_sqrt(degree: int, inverse: bool) -> tuple[float, ...]:
    """Taylor coefficients of sqrt(1 - x) (or 1 / sqrt(1 - x)) up to x**degree."""
    return _taylor_sqrt(degree, inverse)


@torch.compiler.assume_constant_result
def pade_sqrt(m: int, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """[m/n] Padé approximant P/Q of sqrt(1 - x); 1/sqrt(1 - x) is Q/P."""
    return _pade_sqrt(m, n)


@torch.compiler.assume_constant_result
def pade_range(m: int, n: int) -> tuple[float, float, float, float]:
    """(min P, max P, min Q, max Q) of the [m/n] Padé polynomials of sqrt(1 - x) on [0, 1], on a grid."""
    return _pade_range(m, n)


@torch.compiler.assume_constant_result
def approximant(kind: str, degree: Degree, inverse: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(num, den) of the approximant r(x) = num(x)/den(x) of sqrt(1 - x) (or 1/sqrt(1 - x)): ``kind``
    "taylor" (den = 1) of ``degree``, or "pade" of ``degree`` = (m, n)."""
    num, den = _approximant(kind, degree, inverse)
    return _to_float(num), _to_float(den)


@torch.compiler.assume_constant_result
def gram_form(kind: str, degree: Degree, inverse: bool) -> tuple[float, tuple[float, ...]]:
    """(r(1), ñ) with r(1 − λ) = r(1) − λ·ñ(1 − λ)/den(1 − λ) for the approximant r = num/den of
    :func:`approximant`: the value r(1) on the null space of a normalised covariance and the numerator of
    h(λ) = (r(1 − λ) − r(1))/λ, which the Gram side evaluates (``covpool.linalg._matrix``).

    num(y)·den(1) − num(1)·den(y) vanishes at y = 1, so it is (y − 1)·Ñ(y) exactly (synthetic division in
    rational arithmetic); ñ = Ñ/den(1), and y − 1 = −λ.
    """
    return _gram_form(kind, degree, inverse)


@cache
def _approximant(kind: str, degree: Degree, inverse: bool) -> tuple[tuple[Fraction, ...], tuple[Fraction, ...]]:
    if kind == "taylor" and isinstance(degree, int):
        return _binomial_series(Fraction(-1 if inverse else 1, 2), degree), (Fraction(1),)
    if kind == "pade" and isinstance(degree, tuple):
        m, n = degree
        p, q = _pade(_binomial_series(Fraction(1, 2), m + n), m, n)
        return (q, p) if inverse else (p, q)
    raise ValueError(f"no {kind!r} approximant of degree {degree!r}: 'taylor' takes an int, 'pade' a pair (m, n)")


@cache
def _gram_form(kind: str, degree: Degree, inverse: bool) -> tuple[float, tuple[float, ...]]:
    num, den = _approximant(kind, degree, inverse)
    num1, den1 = sum(num), sum(den)
    vanishing = [a * den1 - num1 * b for a, b in zip_longest(num, den, fillvalue=Fraction(0))]
    quotient, running = [], Fraction(0)
    for coeff in vanishing[:-1]:  # (y − 1)·Σ t_k y^k: t_k = t_{k−1} − n_k, t_{−1} = 0
        running -= coeff
        quotient.append(running / den1)
    return float(num1 / den1), _to_float(tuple(quotient))


@cache
def _pade_range(m: int, n: int) -> tuple[float, float, float, float]:
    p, q = _pade(_binomial_series(Fraction(1, 2), m + n), m, n)
    return (_min_on_unit_interval(p), -_min_on_unit_interval(tuple(-c for c in p)),
            _min_on_unit_interval(q), -_min_on_unit_interval(tuple(-c for c in q)))


@cache
def _taylor_sqrt(degree: int, inverse: bool) -> tuple[float, ...]:
    return _to_float(_binomial_series(Fraction(-1 if inverse else 1, 2), degree))


@cache
def _pade_sqrt(m: int, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    p, q = _pade(_binomial_series(Fraction(1, 2), m + n), m, n)
    if _min_on_unit_interval(q) <= 0 or _min_on_unit_interval(p) <= 0:
        raise ValueError(f"the [{m}/{n}] Padé approximant of sqrt(1-x) is not positive on [0, 1]")
    return _to_float(p), _to_float(q)


def _min_on_unit_interval(coeffs: tuple[Fraction, ...], points: int = 2049) -> float:
    """Smallest value of the polynomial on a fine grid of [0, 1] (a guard, evaluated in float64)."""
    best = float("inf")
    for i in range(points):
        x = i / (points - 1)
        value = 0.0
        for c in reversed(coeffs):
            value = value * x + float(c)
        best = min(best, value)
    return best
