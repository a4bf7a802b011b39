"""Eigendecomposition backends: ``eig`` and the SVD family (``svd_pi``, ``svd_taylor``, ``svd_pade``).

All four compute the forward pass exactly, ``V f(Λ) Vᵀ`` from a symmetric eigendecomposition (for a
symmetric positive semi-definite matrix it is also its SVD), and differ only in the backward. Every
backward has the form

    Ā = V (K ∘ Vᵀ sym(Ḡ) V) Vᵀ,    K_ij ≈ (f(λ_i) − f(λ_j)) / (λ_i − λ_j),    K_ii = f'(λ_i),

one symmetric eigenbasis change each way (4 matrix products). ``eig`` writes K exactly in a form that
has no difference in the denominator; the SVD family replaces 1/(λ_i − λ_j) by a bounded
approximation, as the papers do, which keeps the gradient finite for (nearly) equal eigenvalues.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ._double import guard
from ._matrix import eye
from ._registry import Option, degree_pair, int_at_least, positive_float_or_none, register_backend

__all__: list[str] = []

KernelFn = Callable[[torch.Tensor, bool], torch.Tensor]


def _floor_value(lam: torch.Tensor, eps: float | None) -> torch.Tensor:
    """The floor ``eps`` × the largest eigenvalue (``lam`` ascending), ``(*, 1)``; ``eps=None`` means
    10 × machine epsilon of the dtype."""
    rel = 10 * torch.finfo(lam.dtype).eps if eps is None else eps
    return rel * lam[..., -1:].clamp_min(torch.finfo(lam.dtype).tiny)


def _floor(lam: torch.Tensor, eps: float | None) -> torch.Tensor:
    """Clamp eigenvalues (ascending) at the floor, so that rank-deficient inputs keep a finite root,
    inverse root and gradient."""
    return torch.maximum(lam, _floor_value(lam, eps))


def _eigh_checked(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh``, redone in float64 for the matrices whose lower-precision decomposition failed.

    LAPACK's float32 solver (``ssyevd``) can fail to converge on covariances whose channels are mostly
    exact zeros (dead ReLUs after a reduction layer): batched, torch returns NaN for those matrices without
    a word; for a single matrix it raises. Measured on such a 64×64 covariance (51 zero channels), in
    training with the SVD backends. Those matrices, only, are decomposed again in float64 and rounded back,
    so a healthy batch costs one finiteness check (a host sync on CUDA, where ``eigh`` itself already
    synchronises). Input that is itself non-finite stays non-finite.
    """
    if a.dtype == torch.float64:
        return torch.linalg.eigh(a)
    try:
        lam, v = torch.linalg.eigh(a)
    except torch.linalg.LinAlgError:
        lam, v = torch.linalg.eigh(a.double())
        return lam.to(a.dtype), v.to(a.dtype)
    failed = ~torch.isfinite(lam).all(dim=-1)
    if failed.any():
        lam64, v64 = torch.linalg.eigh(a[failed].double())
        lam[failed], v[failed] = lam64.to(lam.dtype), v64.to(v.dtype)
    return lam, v


def _rescale(f: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (v * f.unsqueeze(-2)) @ v.mT


class _Spectral(torch.autograd.Function):
    """Exact eigendecomposition forward; backward ``V (K ∘ Vᵀ Ḡ V) Vᵀ`` with a backend-given K."""

    @staticmethod
    def forward(a: torch.Tensor, inverse: bool, eps: float | None, kernel: KernelFn, name: str):
        lam, v = _eigh_checked(a)
        lam = _floor(lam, eps)
        root = lam.sqrt()
        out = _rescale(root.reciprocal() if inverse else root, v)
        return out, root, v

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, inverse, _, kernel, name = inputs
        _, root, v = output
        ctx.mark_non_differentiable(root, v)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(a, root, v)  # a only anchors the second-derivative guard
        ctx.inverse, ctx.kernel, ctx.name = inverse, kernel, name

    @staticmethod
    def backward(ctx, grad, _grad_root, _grad_v):
        if grad is None:
            return None, None, None, None, None
        a, root, v = ctx.saved_tensors
        with torch.no_grad():
            k = ctx.kernel(root, ctx.inverse)
            g = v.mT @ (0.5 * (grad + grad.mT)) @ v
            g_a = v @ (g * k) @ v.mT
        return guard(g_a, ctx.name, a, grad), None, None, None, None


class _GramSpectral(torch.autograd.Function):
    """√(U Uᵀ) for U ``(B, d, M)`` from the eigendecomposition of the M×M Gram matrix G = Uᵀ U, with the
    forward and backward of :class:`_Spectral` on the d×d matrix Σ = U Uᵀ.

    G = W Λ Wᵀ gives Σ's eigenpairs (λ_i, u_i = U w_i/√λ_i) for λ_i > 0; all other directions of Σ have
    eigenvalue 0. With the floor φ = eps·λ_max, the directions R = {λ_i > φ} keep their eigenvalue and the
    rest get φ, as on the channel side, so

        f(Σ) = f(φ)·I + U W diag(h) Wᵀ Uᵀ,    h_i = (f(λ_i) − f(φ))/λ_i on R, 0 elsewhere,

    never dividing by an eigenvalue below the floor (the mean direction of a centred covariance, dead
    channels). Backward: Σ̄ = Σ_ij K_ij u_i u_iᵀ sym(Ḡ) u_j u_jᵀ with the backend's kernel K on the floored
    spectrum, and Ū = 2·Σ̄·U. Only the columns Σ̄·U w_j = Σ̄ u_j √λ_j are needed; with A = sym(Ḡ)·U W and
    C = (U W)ᵀ A they are

        Σ̄ U W = U W_R·[(K_Rj − κ_j)·C_Rj / λ_R] + A·diag(κ),    κ_j = K(φ, λ̃_j),

    where κ is the kernel between the floored directions (whose eigenvectors are never formed: they enter
    through the projector I − Σ_R u_i u_iᵀ) and each direction j; for j itself below the floor, κ_j is
    K's diagonal f'(φ). The pairs of two floored directions vanish on U. One d×d×M product each way, the
    rest d×M×M and M×M.
    """

    @staticmethod
    def forward(u: torch.Tensor, eps: float | None, kernel: KernelFn, name: str):
        lam, w = _eigh_checked(u.mT @ u)
        phi = _floor_value(lam, eps)
        root = torch.cat([phi, torch.maximum(lam, phi)], dim=-1).sqrt()
        keep = lam > phi
        h = torch.where(keep, (root[..., 1:] - root[..., :1]) / torch.where(keep, lam, 1.0), 0.0)
        uw = u @ w
        out = (uw * h.unsqueeze(-2)) @ uw.mT
        return out + eye(out) * root[..., :1, None], lam, w, root

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, eps, kernel, name = inputs
        _, lam, w, root = output
        ctx.mark_non_differentiable(lam, w, root)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u, lam, w, root)
        ctx.kernel, ctx.name = kernel, name

    @staticmethod
    def backward(ctx, grad, *_):
        if grad is None:
            return None, None, None, None
        u, lam, w, root = ctx.saved_tensors
        with torch.no_grad():
            keep = lam > root[..., :1].square()
            # root[0] is √φ (the floor), root[1:] the floored √λ̃: one kernel evaluation covers K_ij
            # (rows and columns 1:) and κ_j = K(φ, λ̃_j) (row 0; its diagonal entry is f'(φ)).
            k = ctx.kernel(root, False)
            kappa = torch.where(keep, k[..., 0, 1:], k[..., :1, 0])
            uw = u @ w
            a = (0.5 * (grad + grad.mT)) @ uw
            c = uw.mT @ a
            scale = torch.where(keep, lam, torch.ones_like(lam)).unsqueeze(-1)
            d = torch.where(keep.unsqueeze(-1), (k[..., 1:, 1:] - kappa.unsqueeze(-2)) * c / scale, 0.0)
            g_u = torch.baddbmm(a * kappa.unsqueeze(-2), uw, d).matmul(w.mT).mul_(2.0)
        return guard(g_u, ctx.name, u, grad), None, None, None


def _exact_kernel(root: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Daleckii–Krein divided differences of f = √· or 1/√·, written without λ_i − λ_j:
    (√λi − √λj)/(λi − λj) = 1/(√λi + √λj) and (1/√λi − 1/√λj)/(λi − λj) = −1/(√λi √λj (√λi + √λj))."""
    ri, rj = root.unsqueeze(-1), root.unsqueeze(-2)
    k = (ri + rj).reciprocal()
    return -k / (ri * rj) if inverse else k


def _approx_kernel(root: torch.Tensor, inverse: bool, series: Callable[[torch.Tensor], tuple]) -> torch.Tensor:
    """K_ij = f(λ_i) c_ij + f(λ_j) c_ji from eigenvector-gradient coefficients c_ij ≈ 1/(λ_i − λ_j).

    ``series(r)`` returns (a, b) with r = λ_min/λ_max of the pair, such that c = a/λ_max for the vector
    of the larger eigenvalue and c = −b/λ_max for the other. The diagonal is the exact f'(λ_i).
    """
    lam = root.square()
    f = root.reciprocal() if inverse else root
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    fi, fj = f.unsqueeze(-1), f.unsqueeze(-2)
    i_larger = li >= lj
    hi = torch.where(i_larger, li, lj)
    lo = torch.where(i_larger, lj, li)
    f_hi = torch.where(i_larger, fi, fj)
    f_lo = torch.where(i_larger, fj, fi)
    a, b = series(lo / hi)
    k = (f_hi * a - f_lo * b) / hi
    deriv = -0.5 * f / lam if inverse else 0.5 / root
    return torch.diagonal_scatter(k, deriv, dim1=-2, dim2=-1)


def _geometric(r: torch.Tensor, terms: int) -> torch.Tensor:
    """1 + r + … + r**(terms−1), by Horner."""
    out = torch.ones_like(r)
    for _ in range(terms - 1):
        out = out * r + 1
    return out


def _pi_kernel(num_iters: int) -> KernelFn:
    # Linearising `num_iters` deflated power-iteration steps at the converged eigenvectors gives
    # (1/λ_hi) Σ_{k<K} r^k for the larger vector and −(1/λ_hi) Σ_{k<K−1} r^k for the smaller (the
    # deflation of the larger vector enters the smaller one's iteration).
    def series(r):
        return _geometric(r, num_iters), _geometric(r, num_iters - 1)

    return lambda root, inverse: _approx_kernel(root, inverse, series)


def _taylor_kernel(degree: int) -> KernelFn:
    def series(r):
        g = _geometric(r, degree + 1)
        return g, g

    return lambda root, inverse: _approx_kernel(root, inverse, series)


def _pade_kernel(degree: tuple[int, int]) -> KernelFn:
    # Every [m/n] Padé approximant (n >= 1) of the geometric series 1/(1 - r) is 1/(1 - r) itself: its
    # Padé table is degenerate, and the published [50/50] coefficients reproduce the pole at r = 1 up
    # to rounding. covpool evaluates that rational function at the damped ratio ρr, ρ = 1 − 1/(m+n+1)²,
    # i.e. c = 1/(λ_hi − ρ λ_lo): within 1% of the exact term for r <= 0.5 and 7% at r = 0.9 at the
    # default degree (Taylor of degree 9: 0.1% and 35%),
    # bounded by (m+n+1)²/λ_hi for equal eigenvalues, smooth in between.
    rho = 1.0 - 1.0 / (sum(degree) + 1) ** 2

    def series(r):
        g = (1 - rho * r).reciprocal()
        return g, g

    return lambda root, inverse: _approx_kernel(root, inverse, series)


def _register(name: str, kernel: Callable[..., KernelFn], options: dict[str, Option], doc: str) -> None:
    """Register a spectral backend: exact eigendecomposition forward, ``kernel(**options)`` in the backward,
    on the matrix and on the Gram side."""
    def fn(a: torch.Tensor, inverse: bool, eps: float | None, **kw) -> torch.Tensor:
        return _Spectral.apply(a, inverse, eps, kernel(**kw), name)[0]

    def gram(u: torch.Tensor, eps: float | None, **kw) -> torch.Tensor:
        return _GramSpectral.apply(u, eps, kernel(**kw), name)[0]

    # Gram side from M < 0.9·d: measured crossover 0.93–0.97 (B = 32, d = 128 and 256, fwd+bwd, 2-core CPU).
    register_backend(name, fn, {**options, "eps": _EPS}, doc=doc, gram=gram, gram_below=0.9)


_EPS = Option(None, positive_float_or_none, "eigenvalue floor relative to the largest eigenvalue "
              "(None: 10 × machine epsilon of the working dtype)")

_register("eig", lambda: _exact_kernel, {},
          "eigh forward; exact Daleckii–Krein backward written as 1/(√λi+√λj), finite for repeated eigenvalues")
_register("svd_pi", _pi_kernel,
          {"num_iters": Option(10, int_at_least(2), "power-iteration steps the gradient is linearised over")},
          "eigh/SVD forward; power-iteration gradient (Wang et al., ICCV 2019)")
_register("svd_taylor", _taylor_kernel,
          {"degree": Option(9, int_at_least(0), "degree of the Taylor series of 1/(1 - λj/λi)")},
          "eigh/SVD forward; Taylor-expanded gradient (Wang et al., TPAMI 2021)")
_register("svd_pade", _pade_kernel, {"degree": Option((5, 5), degree_pair, "[m/n] Padé degree of the gradient term")},
          "eigh/SVD forward; Padé-approximated gradient (Song et al., ICCV 2021)")
