"""Public functions: ``sqrtm``, ``inv_sqrtm``, ``covariance`` and ``triu_vectorize``."""
from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch

from ._registry import resolve_backend

__all__ = ["sqrtm", "inv_sqrtm", "covariance", "triu_vectorize"]

_WORK_DTYPES = (torch.float32, torch.float64)


def _check_square(a: Any, what: str = "a") -> None:
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(a).__name__}")
    if a.dim() < 2:
        raise ValueError(f"{what} must have shape (*, n, n) with at least 2 dimensions, got shape {tuple(a.shape)}")
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{what} must be square in its last two dimensions, got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {a.dtype}")


def _root(a: torch.Tensor, backend: str | Mapping[str, Any], options: dict[str, Any], inverse: bool) -> torch.Tensor:
    _check_square(a)
    entry, bound = resolve_backend(backend, options)
    n = a.shape[-1]
    work = a if a.dtype in _WORK_DTYPES else a.float()
    # Autocast would run the products in half precision, where the iterations lose convergence.
    with torch.autocast(device_type=a.device.type, enabled=False):
        out = entry.fn(work.reshape(-1, n, n), inverse, **bound)
    return out.reshape(a.shape).to(a.dtype)


def sqrtm(a: torch.Tensor, backend: str | Mapping[str, Any] = "eig", **options: Any) -> torch.Tensor:
    """Square root of a batch of symmetric positive (semi-)definite matrices, differentiably.

    Args:
        a: ``(*, n, n)`` symmetric PSD matrices, any number of batch dimensions. float32/float64 are
            used as they are; float16/bfloat16 (and autocast regions) compute in float32 and return
            the input dtype.
        backend: a name from :func:`list_backends` or a dict ``{"name": ..., **options}``.
        **options: backend options (see the README's backend table), e.g. ``num_iters=5`` for ``ns``.

    Returns:
        ``(*, n, n)`` tensor of the input dtype. Every matrix is treated on its own: its result and
        gradient do not depend on the rest of the batch.

    Example::

        >>> import torch, covpool
        >>> x = torch.randn(8, 16, 49)
        >>> cov = x @ x.mT / 49
        >>> s = covpool.sqrtm(cov, backend="ns", num_iters=5)
        >>> s.shape
        torch.Size([8, 16, 16])
    """
    return _root(a, backend, options, inverse=False)


def inv_sqrtm(a: torch.Tensor, backend: str | Mapping[str, Any] = "eig", **options: Any) -> torch.Tensor:
    """Inverse square root ``a^{-1/2}``; same arguments and conventions as :func:`sqrtm`.

    Rank-deficient input has no inverse root: the backends return a finite, large result (``eig`` and
    the SVD family floor the eigenvalues, the iterative backends stop short of convergence). Add
    ``eps·I`` first when you whiten.
    """
    return _root(a, backend, options, inverse=True)


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Sample covariance Σ = (1/N) X_c X_cᵀ of ``x`` with shape ``(*, n, N)`` (n features, N samples),
    centred by subtracting the per-feature mean (no N×N centring matrix). Returns ``(*, n, n)``."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor of shape (*, n, N), got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[-1] < 1:
        raise ValueError(f"x needs at least one sample in its last dimension, got shape {tuple(x.shape)}")
    xc = x - x.mean(dim=-1, keepdim=True)
    return xc @ xc.mT / x.shape[-1]


@lru_cache(maxsize=64)
def _triu_flat_index(n: int, device: torch.device) -> torch.Tensor:
    rows, cols = torch.triu_indices(n, n, device=device)
    return rows * n + cols


def triu_vectorize(a: torch.Tensor) -> torch.Tensor:
    """Upper triangle (diagonal included) of ``(*, n, n)`` as ``(*, n(n+1)/2)``, row-major, in
    ``torch.triu_indices`` order: 32 896 features for n = 256."""
    _check_square(a)
    n = a.shape[-1]
    return a.flatten(-2)[..., _triu_flat_index(n, a.device)]
