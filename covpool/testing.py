"""Matrix families and float64 references, for testing a square-root backend (like :mod:`torch.testing`).

Used by covpool's tests and ``covpool bench``; public so that a backend added with
:func:`covpool.register_backend` can be checked the same way::

    >>> import covpool, covpool.testing as ct
    >>> a = ct.well_conditioned(2, 8)
    >>> ct.rel(covpool.sqrtm(a, backend="eig"), ct.exact_root(a)) < 1e-12
    True
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["well_conditioned", "well_separated", "ill_conditioned", "rank_deficient", "repeated_eigenvalues",
           "exact_root", "exact_grad", "rel", "round_products", "assert_compiles_like_eager"]


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative Frobenius error ‖x − y‖ / ‖y‖ in float64 on the CPU (x and y may live on different devices)."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    return float((x - y).norm() / y.norm())


def well_conditioned(batch: int, n: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """SPD matrices with eigenvalues spread over [1, 4]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    lam = 1 + 3 * torch.rand(batch, n, generator=g, dtype=torch.float64)
    return ((q * lam.unsqueeze(-2)) @ q.mT).to(dtype)


def well_separated(batch: int, n: int, ratio: float = 1.5, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """SPD matrices with eigenvalues ratio**k, k = 0..n-1: neighbouring eigenvalues never close."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    lam = ratio ** torch.arange(n, dtype=torch.float64)
    return ((q * lam.unsqueeze(-2)) @ q.mT / lam[-1]).to(dtype)


def ill_conditioned(batch: int, n: int, kappa: float = 100.0, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """SPD matrices with log-spaced eigenvalues from 1 down to 1/kappa (a whitening matrix's spread)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -torch.log10(torch.tensor(float(kappa))).item(), n, dtype=torch.float64)
    return ((q * lam.unsqueeze(-2)) @ q.mT).to(dtype)


def rank_deficient(batch: int, n: int, samples: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Covariances of ``samples`` < n feature vectors: rank ``samples - 1`` after centring."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, samples, generator=g, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    return (x @ x.mT / samples).to(dtype)


def repeated_eigenvalues(batch: int, n: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Eigenvalues in three tied clusters {1, 1, ..., 2, 2, ..., 3, 3, ...}, random eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    lam = (torch.arange(n, dtype=torch.float64) * 3 // n + 1).expand(batch, n)
    return ((q * lam.unsqueeze(-2)) @ q.mT).to(dtype)


def exact_root(a: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Float64 eigh reference."""
    lam, v = torch.linalg.eigh(a.double())
    f = lam.rsqrt() if inverse else lam.clamp_min(0).sqrt()
    return (v * f.unsqueeze(-2)) @ v.mT


def exact_grad(a: torch.Tensor, g: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Float64 Daleckii–Krein gradient of <root(a), g> (g symmetrised), from the divided differences."""
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


def assert_compiles_like_eager(fn, x: torch.Tensor, fullgraph: bool = True, rtol: float = 1e-4,
                               atol: float = 1e-5) -> None:
    """``torch.compile(fn, fullgraph=...)`` gives ``fn``'s output and gradient on ``x`` (loss: the sum of
    squares), within ``rtol``/``atol`` (10× looser for the gradient): a backend or layer compiles correctly."""
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
    backend would lose to reduced-precision products, measured on any device.

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

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = _PRODUCTS.get(func)
        if first is not None and args[first].dtype == torch.float32:
            args = (*args[:first], self.round(args[first]), self.round(args[first + 1]), *args[first + 2:])
        return func(*args, **(kwargs or {}))
