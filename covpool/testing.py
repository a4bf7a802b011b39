"""Matrix families and float64 references, for testing a square-root backend (like :mod:`torch.testing`).

Used by covpool's tests and ``covpool bench``; public so that a backend added with
:func:`covpool.register_backend` can be checked the same way::

    >>> import covpool, covpool.testing as ct
    >>> a = ct.well_conditioned(2, 8)
    >>> ct.rel(covpool.sqrtm(a, backend="eig"), ct.exact_root(a)) < 1e-12
    True
"""
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["well_conditioned", "well_separated", "ill_conditioned", "rank_deficient", "repeated_eigenvalues",
           "exact_root", "exact_grad", "rel", "round_products", "assert_compiles_like_eager"]


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative Frobenius error ‖x − y‖ / ‖y‖ of ``x`` against the reference ``y``, over all entries, in float64
    on the CPU (``x`` and ``y`` may live on different devices and have different dtypes; same shape). ``inf``
    or NaN when ``y`` is zero."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    return float((x - y).norm() / y.norm())


def well_conditioned(batch: int, n: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    """Symmetric positive definite matrices with eigenvalues drawn uniformly from [1, 4] and random
    eigenvectors (condition number at most 4): where every backend should be accurate.

    Args:
        batch: how many matrices, the leading dimension of the result.
        n: the matrix size.
        dtype: the dtype of the result (built in float64 and rounded once).
        seed: seed of the private generator: the same arguments give the same matrices, whatever the global RNG.

    Returns:
        ``(batch, n, n)`` tensor of ``dtype`` on the CPU.
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    lam = 1 + 3 * torch.rand(batch, n, generator=g, dtype=torch.float64)
    return ((q * lam.unsqueeze(-2)) @ q.mT).to(dtype)


def well_separated(batch: int, n: int, ratio: float = 1.5, dtype: torch.dtype = torch.float64,
                   seed: int = 0) -> torch.Tensor:
    """Symmetric positive definite matrices with eigenvalues ratio**k / ratio**(n−1), k = 0..n−1 (the largest 1
    for ``ratio`` > 1), and random eigenvectors: neighbouring eigenvalues are never close, so approximate
    gradients (the SVD family's) can be compared with the exact one.

    Args:
        batch: how many matrices, the leading dimension of the result.
        n: the matrix size.
        ratio: the ratio of neighbouring eigenvalues (> 1); the condition number is ratio**(n−1).
        dtype: the dtype of the result (built in float64 and rounded once).
        seed: seed of the private generator: the same arguments give the same matrices, whatever the global RNG.

    Returns:
        ``(batch, n, n)`` tensor of ``dtype`` on the CPU.
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    lam = ratio ** torch.arange(n, dtype=torch.float64)
    return ((q * lam.unsqueeze(-2)) @ q.mT / lam[-1]).to(dtype)


def ill_conditioned(batch: int, n: int, kappa: float = 100.0, dtype: torch.dtype = torch.float64,
                    seed: int = 0) -> torch.Tensor:
    """Symmetric positive definite matrices with log-spaced eigenvalues from 1 down to 1/kappa (a whitening
    matrix's spread) and random eigenvectors.

    Args:
        batch: how many matrices, the leading dimension of the result.
        n: the matrix size.
        kappa: the condition number, largest over smallest eigenvalue (>= 1).
        dtype: the dtype of the result (built in float64 and rounded once).
        seed: seed of the private generator: the same arguments give the same matrices, whatever the global RNG.

    Returns:
        ``(batch, n, n)`` tensor of ``dtype`` on the CPU.
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -torch.log10(torch.tensor(float(kappa))).item(), n, dtype=torch.float64)
    return ((q * lam.unsqueeze(-2)) @ q.mT).to(dtype)


def rank_deficient(batch: int, n: int, samples: int, dtype: torch.dtype = torch.float64,
                   seed: int = 0) -> torch.Tensor:
    """Centred covariances (1/N)·X_c X_cᵀ of ``samples`` < n standard normal feature vectors: positive
    semi-definite of rank ``samples - 1``, the rest of the spectrum exactly 0 up to rounding (a covariance
    pooling input with fewer positions than channels).

    Args:
        batch: how many matrices, the leading dimension of the result.
        n: the matrix size.
        samples: N, the number of feature vectors; the rank is N − 1 when N <= n.
        dtype: the dtype of the result (built in float64 and rounded once).
        seed: seed of the private generator: the same arguments give the same matrices, whatever the global RNG.

    Returns:
        ``(batch, n, n)`` tensor of ``dtype`` on the CPU.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, samples, generator=g, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    return (x @ x.mT / samples).to(dtype)


def repeated_eigenvalues(batch: int, n: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    """Symmetric positive definite matrices with eigenvalues in three tied clusters {1, 1, ..., 2, 2, ..., 3, 3,
    ...} (exactly equal within a cluster) and random eigenvectors: where a gradient formula that divides by
    λ_i − λ_j breaks.

    Args:
        batch: how many matrices, the leading dimension of the result.
        n: the matrix size.
        dtype: the dtype of the result (built in float64 and rounded once).
        seed: seed of the private generator: the same arguments give the same matrices, whatever the global RNG.

    Returns:
        ``(batch, n, n)`` tensor of ``dtype`` on the CPU.
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    lam = (torch.arange(n, dtype=torch.float64) * 3 // n + 1).expand(batch, n)
    return ((q * lam.unsqueeze(-2)) @ q.mT).to(dtype)


def exact_root(a: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Float64 reference square root of ``a`` ``(*, n, n)`` (symmetric PSD), V·f(Λ)·Vᵀ from ``torch.linalg.eigh``,
    f = √· with negative rounding-level eigenvalues clamped to 0, or 1/√· when ``inverse`` (no floor: a singular
    matrix gives inf or NaN). Returns ``(*, n, n)`` float64 on ``a``'s device."""
    lam, v = torch.linalg.eigh(a.double())
    f = lam.rsqrt() if inverse else lam.clamp_min(0).sqrt()
    return (v * f.unsqueeze(-2)) @ v.mT


def exact_grad(a: torch.Tensor, g: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Float64 reference gradient with respect to ``a`` of ⟨root(a), g⟩, the Daleckii–Krein formula
    V·(K ∘ Vᵀ sym(g) V)·Vᵀ with the divided differences K of f = √· (or 1/√· when ``inverse``); pairs of
    eigenvalues closer than 1e-12·max(abs(λ_i), 1) take f'(λ_i).

    Args:
        a: ``(*, n, n)`` symmetric positive definite matrices.
        g: ``(*, n, n)`` upstream gradient; only its symmetric part counts (torch's convention for functions
            of symmetric matrices, which every backend follows).
        inverse: the gradient of the inverse square root instead of the square root.

    Returns:
        ``(*, n, n)`` float64, symmetric.
    """
    lam, v = torch.linalg.eigh(a.double())
    f = lam.rsqrt() if inverse else lam.sqrt()
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    fi, fj = f.unsqueeze(-1), f.unsqueeze(-2)
    diff = li - lj
    same = diff.abs() < 1e-12 * li.abs().clamp_min(1)
    deriv = (-0.5 * f / lam if inverse else 0.5 / f).unsqueeze(-1).expand_as(diff)
    k = torch.where(same, deriv, (fi - fj) / torch.where(same, torch.ones_like(diff), diff))
    gs = 0.5 * (g + g.mT).double()
    return v @ (k * (v.mT @ gs @ v)) @ v.mT


def assert_compiles_like_eager(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, fullgraph: bool = True,
                               rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """``torch.compile(fn, fullgraph=fullgraph)`` gives ``fn``'s output and gradient on ``x`` (loss: the sum of
    squares), within ``rtol``/``atol`` (10× looser for the gradient): a backend or layer compiles correctly.
    Resets dynamo's caches first, so each call compiles afresh.

    Args:
        fn: a function of one tensor returning one tensor, differentiable in it.
        x: its input, a tensor that does not require grad; not modified (each run gets a copy).
        fullgraph: True (default) makes a graph break an error, as ``torch.compile``'s own argument does.
        rtol: relative tolerance of the output (``torch.testing.assert_close``).
        atol: absolute tolerance of the output.

    Raises:
        AssertionError: the outputs or the gradients differ beyond the tolerances.
    """
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=fullgraph)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, out_e = compiled(xc), fn(xe)
    out_c.square().sum().backward()
    out_e.square().sum().backward()
    torch.testing.assert_close(out_c, out_e, rtol=rtol, atol=atol)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=10 * rtol, atol=10 * atol)


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32's 10-bit mantissa, to nearest, ties to even (the exponent is float32's)."""
    bits = x.contiguous().view(torch.int32)
    bias = 0xFFF + ((bits >> 13) & 1)
    return ((bits + bias) & ~0x1FFF).view(torch.float32)


def _round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


_ROUNDING = {"tf32": _round_tf32, "bf16": _round_bf16}
_PRODUCTS = {torch.ops.aten.bmm.default: 0, torch.ops.aten.mm.default: 0, torch.ops.aten.baddbmm.default: 1,
             torch.ops.aten.baddbmm_.default: 1, torch.ops.aten.addmm.default: 1, torch.ops.aten.addmm_.default: 1}


class round_products(TorchDispatchMode):
    """Inside this context every float32 matrix product rounds its two operands as ``"tf32"`` (10-bit
    mantissa, what CUDA's TF32 tensor cores read) or ``"bf16"`` (7-bit) and accumulates in float32: what a
    backend would lose to reduced-precision products, measured on any device. The products rounded are
    ``mm``, ``bmm``, ``addmm`` and ``baddbmm`` (so ``@`` and ``torch.matmul``); other dtypes pass unchanged.

    Args:
        kind: ``"tf32"`` (rounded to nearest, ties to even) or ``"bf16"``.

    Raises:
        ValueError: ``kind`` is neither.

    Example::

        >>> import covpool, covpool.testing as ct
        >>> a = ct.well_conditioned(2, 16, dtype=torch.float32)
        >>> with ct.round_products("bf16"):
        ...     rough = covpool.sqrtm(a, "eig")
        >>> 1e-4 < ct.rel(rough, ct.exact_root(a)) < 1e-2
        True
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in _ROUNDING:
            raise ValueError(f"kind must be one of {', '.join(_ROUNDING)}, got {kind!r}")
        self.round = _ROUNDING[kind]

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: Sequence[type], args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        first = _PRODUCTS.get(func)
        if first is not None and args[first].dtype == torch.float32:
            args = (*args[:first], self.round(args[first]), self.round(args[first + 1]), *args[first + 2:])
        return func(*args, **(kwargs or {}))
