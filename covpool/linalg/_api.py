"""The public functions on matrices and features: :func:`sqrtm`, :func:`inv_sqrtm`, :func:`covariance`,
:func:`covariance_sqrtm`, :func:`covariance_power` and :func:`triu_vectorize`."""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from . import _spectral
from ._checks import check_square, full_precision, work_dtype
from ._registry import BackendSpec, get_backend, resolve_backend

__all__ = ["sqrtm", "inv_sqrtm", "covariance", "covariance_sqrtm", "covariance_power", "triu_vectorize"]

SideFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(t, scale)`` of :func:`_on_side`: a matrix function from the factors or the matrix, and the scale."""


def _location(k: int, batch_shape: torch.Size) -> str:
    if not batch_shape:
        return "the matrix"
    index = [int(i) for i in torch.unravel_index(torch.tensor(k), batch_shape)]
    return f"the matrix at batch index {tuple(index)}"


def _check_symmetric_psd(a: torch.Tensor) -> None:
    """Raise ValueError unless every matrix is finite, symmetric to a relative 1000·ε and has no
    eigenvalue below −10·n·ε·max|λ| (ε of the working dtype): rounding passes, a real defect does not.
    One ``eigvalsh`` per matrix; scale-safe (each matrix is divided by its largest entry first)."""
    n = a.shape[-1]
    with torch.no_grad():
        x = a.detach()
        x = x.to(work_dtype(x.dtype)).reshape(-1, n, n)
        finfo = torch.finfo(x.dtype)
        finite = torch.isfinite(x).flatten(1).all(-1)
        if not bool(finite.all()):
            k = int((~finite).nonzero()[0, 0])
            raise ValueError(f"check_input: {_location(k, a.shape[:-2])} has inf or NaN entries")
        m = x.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(finfo.tiny)
        x = x / m
        asym = torch.linalg.matrix_norm(x - x.mT) / torch.linalg.matrix_norm(x).clamp_min(finfo.tiny)
        tol = 1000 * finfo.eps
        if bool((asym > tol).any()):
            k = int((asym > tol).nonzero()[0, 0])
            raise ValueError(
                f"check_input: {_location(k, a.shape[:-2])} is not symmetric (‖A − Aᵀ‖_F / ‖A‖_F = "
                f"{float(asym[k]):.2e} > {tol:.1e}); the roots are defined for symmetric positive semi-definite "
                "matrices: pass 0.5·(A + Aᵀ) if the asymmetry is rounding")
        lam = torch.linalg.eigvalsh(0.5 * (x + x.mT))
        top = lam.abs().amax(-1)
        bad = lam[:, 0] < -10 * n * finfo.eps * top
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            scale = float(m[k])
            raise ValueError(
                f"check_input: {_location(k, a.shape[:-2])} is indefinite: smallest eigenvalue "
                f"{float(lam[k, 0]) * scale:.3g}, largest {float(lam[k, -1]) * scale:.3g}; the roots need "
                "eigenvalues >= 0 (a covariance is PSD: check how the matrix was formed, or add eps·I)")


def _root(
    a: torch.Tensor, backend: BackendSpec, options: dict[str, Any], inverse: bool, check_input: bool
) -> torch.Tensor:
    check_square(a)
    entry, bound = resolve_backend(backend, options)
    if check_input:
        if torch.compiler.is_exporting():
            raise RuntimeError("check_input=True raises on the values of the input, which an exported program cannot "
                               "do (it would branch on the data): export without it and check the inputs eagerly")
        _check_symmetric_psd(a)
    n = a.shape[-1]
    if n == 0:
        # The root of a 0×0 matrix is 0×0 (as in torch.linalg); every backend agrees, none is called.
        return a.clone()
    # Autocast would run the products in half precision, where the iterations lose convergence.
    return full_precision(lambda w: entry.fn(w.reshape(-1, n, n), inverse, **bound).reshape(a.shape), a)


def sqrtm(
    a: torch.Tensor, backend: BackendSpec = "eig", *, check_input: bool = False, **options: Any
) -> torch.Tensor:
    """Square root of a batch of symmetric positive (semi-)definite matrices, differentiably.

    Args:
        a: ``(*, n, n)`` symmetric PSD matrices, any number of batch dimensions. float32/float64 are
            used as they are; float16/bfloat16 (and autocast regions) compute in float32 and return
            the input dtype.
        backend: a name from :func:`list_backends` or a dict ``{"name": ..., **options}``.
        check_input: raise ValueError unless every matrix is finite, symmetric (to a relative 1000·ε)
            and positive semi-definite (smallest eigenvalue >= −10·n·ε·max|λ|). Off by default: it costs
            an ``eigvalsh`` and a host sync. Unchecked, a negative eigenvalue is clipped to the floor by
            ``eig`` and the SVD family and gives a finite but meaningless result with ``ns``,
            ``mtp_lya`` and ``mpa_lya`` (:doc:`choosing a backend </guides/backends>`).
        **options: backend options (:doc:`the backend reference </reference/backends>`), e.g. ``num_iters=5``
            for ``ns``.

    Returns:
        ``(*, n, n)`` tensor of the input dtype. Every matrix is treated on its own: its result and
        gradient do not depend on the rest of the batch. ``(*, 0, 0)`` input gives ``(*, 0, 0)``. For a
        symmetric input the gradient is symmetric whatever the upstream gradient (torch's convention).

    Raises:
        TypeError: ``a`` is not a floating-point tensor; ``backend`` is neither a name nor a dict; an option
            the backend does not have.
        ValueError: ``a`` is not ``(*, n, n)``; an unknown backend name or a bad option value; with
            ``check_input``, a matrix that is not finite, symmetric and PSD.
        RuntimeError: ``check_input=True`` under ``torch.export``; an eigendecomposition backend under ONNX
            export (ONNX has no such operator: use a product backend).
        torch.linalg.LinAlgError: ``eig`` or the SVD family given a matrix with inf or NaN entries.

    Example::

        >>> import torch, covpool
        >>> x = torch.randn(8, 16, 49)
        >>> cov = x @ x.mT / 49
        >>> s = covpool.sqrtm(cov, backend="ns", num_iters=5)
        >>> s.shape
        torch.Size([8, 16, 16])
    """
    return _root(a, backend, options, inverse=False, check_input=check_input)


def inv_sqrtm(
    a: torch.Tensor, backend: BackendSpec = "eig", *, check_input: bool = False, **options: Any
) -> torch.Tensor:
    """Inverse square root ``a^{-1/2}``; same arguments, conventions and errors as :func:`sqrtm`.

    Rank-deficient input has no inverse root: the backends return a finite, large result (``eig`` and
    the SVD family floor the eigenvalues, the iterative backends stop short of convergence). Add
    ``eps·I`` first when you whiten.

    Args:
        a: ``(*, n, n)`` symmetric positive definite matrices; float16/bfloat16 are computed in float32.
        backend: a name from :func:`list_backends` or a dict ``{"name": ..., **options}``.
        check_input: raise ValueError unless every matrix is finite, symmetric and positive semi-definite
            (as :func:`sqrtm`).
        **options: backend options (:doc:`the backend reference </reference/backends>`).

    Returns:
        ``(*, n, n)`` tensor of the input dtype.

    Example::

        >>> import torch, covpool
        >>> covpool.inv_sqrtm(torch.diag(torch.tensor([4.0, 0.25])), backend="eig")
        tensor([[0.5000, 0.0000],
                [0.0000, 2.0000]])
    """
    return _root(a, backend, options, inverse=True, check_input=check_input)


def unit_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / s, s)`` for features ``x`` ``(*, d, N)``: s ``(*, 1, 1)``, detached, is the power of two at or below
    each matrix's largest ``|x|`` (clamped to the dtype's normal range), so the scaled features lie in [1, 2).

    The products that form a covariance square the features: float32 features beyond ~1e19 overflow, below
    ~1e-19 they fall into subnormals and lose their digits. Formed from x/s the matrix is s⁻²·Σ, in range, and
    the backends' roots are homogeneous, √(s²Σ') = s·√Σ' (inverse root 1/s, power α s^(2α)), so the scale is
    carried through exactly; with a power of two the division and the multiplication back are exact, so
    features in the normal range give the same numbers as unscaled. Detached: every function of the
    covariance here is homogeneous in x, so a constant s leaves the gradient exact. Internal (the layers use it).
    """
    s = _power_of_two_scale(x)
    return x / s, s


def _power_of_two_scale(x: torch.Tensor) -> torch.Tensor:
    """2^⌊log₂ max|x|⌋ per matrix of ``x`` ``(*, d, N)``, ``(*, 1, 1)``, detached (:func:`unit_scale`)."""
    if x.numel() == 0:
        return x.new_ones(*x.shape[:-2], 1, 1)
    finfo = torch.finfo(x.dtype)
    with torch.no_grad():
        # max|x| as the larger of max x and −min x: two reductions without a temporary |x|, the fastest form
        # measured (0.5 ms against 0.8 for |x|.amax() and 4.5 for the ∞-norm, 1.6M entries, one CPU thread).
        dims = (-2, -1)
        m = torch.maximum(x.amax(dim=dims, keepdim=True), -x.amin(dim=dims, keepdim=True))
        m = m.clamp(finfo.tiny, finfo.max)
        return torch.exp2(torch.floor(torch.log2(m)))


def covariance(x: torch.Tensor, *, centered: bool = True) -> torch.Tensor:
    """Sample covariance Σ = (1/N) X_c X_cᵀ of ``x`` with shape ``(*, n, N)`` (n features, N samples),
    centred by subtracting the per-feature mean (no N×N centring matrix); ``centered=False`` gives the
    uncentred second moment (1/N)·X Xᵀ. Returns ``(*, n, n)``.

    Integer or bool features are promoted to ``torch.get_default_dtype()`` (the covariance of integers
    is not an integer); floating-point features keep their dtype. The products are formed from the features
    divided by a power of two (``unit_scale``, internal), so float32 features of ~1e-20 keep their digits (the
    unscaled products would be subnormal); an entry beyond the dtype's range (float32 features beyond ~1e19)
    is inf, as it must be, never NaN. :func:`covariance_sqrtm` stays finite there: it carries the scale through
    the root instead."""
    _check_features(x, "x")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    s = _power_of_two_scale(x)
    # As in _on_side: x/s − x̄/s is the centred value divided by s exactly, in the centring's one pass.
    xs = torch.addcdiv(x.mean(dim=-1, keepdim=True) / -s, x, s) if centered else x / s
    # Times s/N, then s, in place (no copy of the matrix): s² overflows where an entry can still be 0.
    return (xs @ xs.mT).mul_(s / x.shape[-1]).mul_(s)


def _check_features(x: Any, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"{what} must be a tensor of shape (*, n, N), got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[-1] < 1:
        raise ValueError(f"{what} needs at least one sample in its last dimension, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"{what} must be real (floating-point, integer or bool), got dtype {x.dtype}")


def covariance_sqrtm(
    x: torch.Tensor, backend: BackendSpec = "ns", *, centered: bool = True, gram: bool | str = "auto", **options: Any
) -> torch.Tensor:
    """Square root of the covariance Σ = (1/N)·X_c X_cᵀ of features ``x`` ``(*, d, N)``, computed on
    whichever side of Σ is cheaper.

    With N < d samples Σ has rank below N, and the backends' matrix function can be computed from the
    N×N Gram matrix G = (1/N)·X_cᵀ X_c instead of the d×d Σ (``covpool.linalg._matrix`` and each backend's
    ``gram`` function): the same matrix and the same gradient — including the value the approximants and
    the eigenvalue floor give Σ's null space — for (N/d)³ of the backend's products.

    Args:
        x: ``(*, d, N)`` features: d channels at N positions.
        backend: a name from :func:`list_backends` or a dict ``{"name": ..., **options}``; the default is
            ``"ns"``, covariance pooling's (:func:`sqrtm`'s is the exact ``"eig"``).
        centered: the covariance (subtract each channel's mean); False gives the uncentred second moment
            (1/N)·X Xᵀ (bilinear pooling).
        gram: ``"auto"`` (default) the Gram side where it measured cheaper, N < ``gram_below``·d
            (:meth:`Backend.uses_gram`; 0.9 for ``eig`` and the SVD family, 0.85 for ``ns``, 0.7 for
            ``mtp_lya`` / ``mpa_lya``); True always (an error for a backend registered without one); False
            never.
        **options: backend options.

    Returns:
        ``(*, d, d)``; dtype and autocast rules as :func:`sqrtm` (half precision and integer features are
        computed in float32 / the default dtype; integers are not truncated back).

    Example::

        >>> import torch, covpool
        >>> x = torch.randn(2, 64, 49, dtype=torch.float64)     # 49 positions, 64 channels
        >>> xc = x - x.mean(-1, keepdim=True)
        >>> gram = covpool.covariance_sqrtm(x, "ns")              # from the 49×49 Gram matrix
        >>> torch.allclose(gram, covpool.sqrtm(xc @ xc.mT / 49, "ns"))
        True
    """
    _check_features(x, "x")
    entry, bound = resolve_backend(backend, options)
    use_gram = entry.uses_gram(x.shape[-2], x.shape[-1], gram)

    def gram_root(u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        gram_fn = entry.gram_fn
        assert gram_fn is not None  # use_gram: uses_gram is True only for a backend with a Gram side
        return gram_fn(u, scale=scale, **bound) if entry.gram_scale else gram_fn(u, **bound) * scale

    def root(a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return entry.fn(a, False, scale=scale, **bound) if entry.fn_scale else entry.fn(a, False, **bound) * scale

    return _on_side(x, centered, use_gram, gram_root, root)


def covariance_power(
    x: torch.Tensor, alpha: float = 0.5, *, centered: bool = True, gram: bool | str = "auto", eps: float | None = None
) -> torch.Tensor:
    """:func:`matrix_power` of the covariance (1/N)·X_c X_cᵀ of features ``x`` ``(*, d, N)`` (MPN-COV), on
    the cheaper side as :func:`covariance_sqrtm` (the Gram side when N < 0.9·d, as ``eig``); ``centered``
    and ``gram`` as there.

    Args:
        x: ``(*, d, N)`` features: d channels at N positions.
        alpha: the power, > 0 (0.5: the square root, MPN-COV's choice).
        centered: the covariance; False gives the uncentred second moment (1/N)·X Xᵀ.
        gram: ``"auto"``, True or False, as :func:`covariance_sqrtm`.
        eps: eigenvalues at or below ``eps`` × the largest count as zero, in (0, 1); None: 10 × machine epsilon
            of the working dtype (as :func:`matrix_power`).

    Returns:
        ``(*, d, d)``, dtype rules as :func:`covariance_sqrtm`.

    Raises:
        ValueError: ``x`` is not ``(*, d, N)`` with N >= 1, or ``alpha``, ``eps`` or ``gram`` is out of range.
        TypeError: complex features.
    """
    _check_features(x, "x")
    _spectral._check_power(alpha, eps)
    channels, samples = x.shape[-2], x.shape[-1]
    use_gram = get_backend("eig").uses_gram(channels, samples, gram)
    return _on_side(x, centered, use_gram,
                    lambda u, scale: _spectral.power_gram(u, alpha, eps, scale),
                    lambda a, scale: _spectral.power_matrix(a, alpha, eps, scale))


def _on_side(x: torch.Tensor, centered: bool, use_gram: bool, gram_fn: SideFn, matrix_fn: SideFn) -> torch.Tensor:
    """A matrix function of the (centred) second moment of ``x`` ``(*, d, N)``, in the work dtype, autocast off,
    formed from the features divided by a power of two s per matrix (:func:`unit_scale`): ``gram_fn(U, s)`` on
    the factors U = X/(s√N) ``(B, d, N)`` or ``matrix_fn(Σ/s², s)`` on the ``(B, d, d)`` matrix, each returning
    the function of the unscaled Σ."""
    channels, samples = x.shape[-2], x.shape[-1]
    if channels == 0:
        out_dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        return (x @ x.mT).to(out_dtype)  # (*, 0, 0), on the graph as sqrtm's empty result is

    def side(x: torch.Tensor) -> torch.Tensor:
        s = _power_of_two_scale(x)
        # s is a power of two, so every value below is the unscaled one divided by s exactly. On the d×d side
        # the division rides on the centring pass (x/s − x̄/s, exact); on the Gram side U = (x − x̄)/(s·√N) is
        # the division the unscaled code made anyway, done in place.
        mean = x.mean(dim=-1, keepdim=True) if centered else None
        if use_gram:
            div = s * math.sqrt(samples)
            xs = torch.sub(x, mean).div_(div) if mean is not None else x / div
        else:
            xs = torch.addcdiv(mean / -s, x, s) if mean is not None else x / s
        s = s.reshape(-1, 1, 1)
        if use_gram:
            out = gram_fn(xs.reshape(-1, channels, samples), s)
        else:
            out = matrix_fn((xs @ xs.mT / samples).reshape(-1, channels, channels), s)
        return out.reshape(*x.shape[:-1], channels)

    return full_precision(side, x)
@lru_cache(maxsize=64)
def _triu_flat_index(n: int, device: torch.device) -> torch.Tensor:
    rows, cols = torch.triu_indices(n, n, device=device)
    return rows * n + cols


def triu_vectorize(a: torch.Tensor) -> torch.Tensor:
    """Upper triangle (diagonal included) of ``a`` ``(*, n, n)`` as ``(*, n(n+1)/2)``, row-major, in
    ``torch.triu_indices`` order: 32 896 features for n = 256. Raises TypeError unless ``a`` is a
    floating-point tensor, ValueError unless it is square in its last two dimensions.

    Example::

        >>> import torch, covpool
        >>> covpool.triu_vectorize(torch.tensor([[1.0, 2.0], [2.0, 3.0]]))
        tensor([1., 2., 3.])
    """
    check_square(a)
    n = a.shape[-1]
    if torch.compiler.is_compiling() or is_fake(a):
        # Under torch.compile / torch.export / FakeTensorMode the index is a traced (fake) tensor: caching
        # it would hand it to later eager calls.
        rows, cols = torch.triu_indices(n, n, device=a.device)
        return a.flatten(-2)[..., rows * n + cols]
    return a.flatten(-2)[..., _triu_flat_index(n, a.device)]
