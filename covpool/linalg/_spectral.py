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

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ._checks import check_number, check_square, full_precision
from ._double import guard
from ._matrix import eye, onnx_exporting
from ._registry import Option, degree_pair, int_at_least, register_backend

__all__ = ["matrix_power"]

KernelFn = Callable[[torch.Tensor, bool], torch.Tensor]


def _floor_value(lam: torch.Tensor, eps: float | None) -> torch.Tensor:
    """The floor ``eps`` × the largest eigenvalue (``lam`` ascending), ``(*, 1)``; ``eps=None`` means
    10 × machine epsilon of the dtype."""
    rel = 10 * torch.finfo(lam.dtype).eps if eps is None else eps
    return rel * lam[..., -1:].clamp_min(torch.finfo(lam.dtype).tiny)


@dataclasses.dataclass(frozen=True)
class _Fn:
    """A function f of a symmetric PSD matrix, applied to its eigenvalues, with the rule for the eigenvalues
    at or below the floor φ = eps·λ_max and the kernel K of its backward on the effective eigenvalues.

    ``cut=False`` (the square-root backends): those eigenvalues are raised to φ, so f and K stay finite.
    ``cut=True`` (:func:`matrix_power`, as MPN-COV): they count as 0, and K must be finite at 0.
    """

    f: Callable[[torch.Tensor], torch.Tensor]
    kernel: Callable[[torch.Tensor], torch.Tensor]
    eps: float | None
    cut: bool = False
    power: float = 0.5  # f(t·λ) = t^power·f(λ): what a scale of the features does to f of their covariance

    def homogeneity(self, scale: torch.Tensor | None) -> torch.Tensor | None:
        """The factor scale^(2·power) that f of the covariance of features multiplied by ``scale`` gains."""
        if scale is None:
            return None
        return scale if self.power == 0.5 else scale.pow(2 * self.power)

    def effective(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective eigenvalues, and the value ``(*, 1)`` of the directions outside the floor."""
        phi = _floor_value(lam, self.eps)
        if self.cut:
            return torch.where(lam > phi, lam, 0.0), torch.zeros_like(phi)
        return torch.maximum(lam, phi), phi


def _root_fn(inverse: bool, eps: float | None, kernel: KernelFn) -> _Fn:
    """√· or 1/√· with a kernel written on the roots (``kernel(root, inverse)``).

    The directions raised to the floor share one eigenvalue, φ, whose eigenvectors are any basis of their
    span: between two of them K is f'(φ), K's diagonal there (as ``eig``'s exact kernel has it), not what
    an approximate kernel gives a pair of *equal* eigenvalues (0 for Taylor and Padé), which would make the
    gradient depend on the basis LAPACK returns (and differ from the Gram side, which forms no such basis).
    """
    def k(lam: torch.Tensor) -> torch.Tensor:
        out = kernel(lam.sqrt(), inverse)
        floored = lam <= _floor_value(lam, eps)
        both = floored.unsqueeze(-1) & floored.unsqueeze(-2)
        return torch.where(both, out.diagonal(dim1=-2, dim2=-1).unsqueeze(-1), out)

    return _Fn(torch.rsqrt if inverse else torch.sqrt, k, eps, power=-0.5 if inverse else 0.5)


def _no_onnx(name: str) -> None:
    """Raise at ONNX export time: ONNX has no eigendecomposition operator, so the exporter would fail later,
    in its translation step, with a message about ``linalg_eigh``."""
    if not onnx_exporting():
        return
    if name == "matrix_power":
        raise RuntimeError(
            "ONNX has no eigendecomposition operator, and the matrix power of normalization='power' (the mpn_cov "
            "head, covpool.matrix_power) has no product-only form: export this model with torch.export "
            "(AOTInductor, ExecuTorch), or use a square-root head, which exports to ONNX once "
            "covpool.set_backend(model, \"ns\") has given it a product backend (docs/guides/export.md)")
    raise RuntimeError(
        f"the {name!r} backend needs a symmetric eigendecomposition (torch.linalg.eigh), which ONNX has no operator "
        f"for: call covpool.set_backend(model, \"ns\") (or \"mtp_lya\", \"mpa_lya\") before torch.onnx.export; "
        f"torch.export itself (AOTInductor, ExecuTorch) takes {name!r} as it is (docs/guides/export.md)")


def _eigh_checked(a: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh``, redone in float64 for the matrices whose lower-precision decomposition failed.

    LAPACK's float32 solver (``ssyevd``) can fail to converge on covariances whose channels are mostly
    exact zeros (dead ReLUs after a reduction layer): batched, torch returns NaN for those matrices without
    a word; for a single matrix it raises. Measured on such a 64×64 covariance (51 zero channels), in
    training with the SVD backends. Those matrices, only, are decomposed again in float64 and rounded back,
    so a healthy batch costs one finiteness check (a host sync on CUDA, where ``eigh`` itself already
    synchronises). Input that is itself non-finite raises a ``LinAlgError`` that says so (LAPACK itself
    blames the conditioning, or returns NaN).

    Under ``torch.export`` (and so ONNX, AOTInductor, ExecuTorch) the decomposition is ``eigh`` alone: an
    exported program cannot branch on the data, so a matrix that LAPACK fails on gives NaN there, as a
    batched ``eigh`` does. ``name`` (the backend, or ``"matrix_power"``) names the caller in the ONNX error.
    """
    _no_onnx(name)
    if torch.compiler.is_exporting():
        return torch.linalg.eigh(a)
    try:
        lam, v = torch.linalg.eigh(a)
        failed = ~torch.isfinite(lam).all(dim=-1)
        if failed.any():
            if a.dtype != torch.float64:
                lam64, v64 = torch.linalg.eigh(a[failed].double())
                lam[failed], v[failed] = lam64.to(lam.dtype), v64.to(v.dtype)
            if not torch.isfinite(lam).all():
                raise torch.linalg.LinAlgError("linalg.eigh: the eigenvalues are not finite")
        return lam, v
    except torch.linalg.LinAlgError as err:
        bad = ~torch.isfinite(a).flatten(1).all(-1)
        if not bad.any():
            if a.dtype == torch.float64:
                raise
            lam, v = torch.linalg.eigh(a.double())  # a single float32 matrix that LAPACK refused
            return lam.to(a.dtype), v.to(a.dtype)
        # LAPACK reports NaN input as an ill-conditioned matrix, or returns NaN; the cause is the input. Still a
        # LinAlgError, so callers that stop on one (covpool train) keep doing so.
        raise torch.linalg.LinAlgError(
            f"the eigendecomposition backends got a matrix with NaN or inf entries (index "
            f"{int(bad.nonzero()[0, 0])} of a batch of {a.shape[0]}), whose eigendecomposition is undefined; "
            "non-finite features usually come from a diverged loss (lower the learning rate) or from a layer "
            "before the pooling") from err


class _Spectral(torch.autograd.Function):
    """Exact eigendecomposition forward ``V f(Λ̃) Vᵀ``; backward ``V (K ∘ Vᵀ sym(Ḡ) V) Vᵀ`` with the
    function's kernel K on the effective eigenvalues Λ̃. With ``scale`` ``(B, 1, 1)``, f of scale²·A:
    ``fn.homogeneity(scale)`` times f(A), folded into f(Λ̃) and K rather than applied to the result."""

    @staticmethod
    def forward(
        a: torch.Tensor, fn: _Fn, name: str, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lam, v = _eigh_checked(a, name)
        lam, _ = fn.effective(lam)
        f = fn.f(lam)
        factor = fn.homogeneity(scale)
        if factor is not None:
            f = f * factor.squeeze(-1)
        return (v * f.unsqueeze(-2)) @ v.mT, lam, v

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        a, fn, name, *scale = inputs
        _, lam, v = output
        ctx.mark_non_differentiable(lam, v)
        ctx.set_materialize_grads(False)
        # a only anchors the second-derivative guard
        ctx.save_for_backward(a, lam, v, fn.homogeneity(scale[0] if scale else None))
        ctx.fn, ctx.name = fn, name

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor | None, _grad_lam: torch.Tensor | None, _grad_v: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None, None]:
        if grad is None:
            return None, None, None, None
        a, lam, v, factor = ctx.saved_tensors
        with torch.no_grad():
            k = ctx.fn.kernel(lam)
            if factor is not None:
                k = k * factor
            g = v.mT @ (0.5 * (grad + grad.mT)) @ v
            g_a = v @ (g * k) @ v.mT
        return guard(g_a, ctx.name, a, grad), None, None, None


class _GramSpectral(torch.autograd.Function):
    """f(U Uᵀ) for U ``(B, d, M)`` from the eigendecomposition of the M×M Gram matrix G = Uᵀ U, with the
    forward and backward of :class:`_Spectral` on the d×d matrix Σ = U Uᵀ.

    G = W Λ Wᵀ gives Σ's eigenpairs (λ_i, u_i = U w_i/√λ_i) for λ_i > 0; all other directions of Σ have
    eigenvalue 0. With the floor φ = eps·λ_max, the directions R = {λ_i > φ} keep their eigenvalue and the
    rest get the function's floor value ν (φ, or 0 for a cut), as on the channel side, so

        f(Σ) = f(ν)·I + U W diag(h) Wᵀ Uᵀ,    h_i = (f(λ_i) − f(ν))/λ_i on R, 0 elsewhere,

    never dividing by an eigenvalue below the floor (the mean direction of a centred covariance, dead
    channels). Backward: Σ̄ = Σ_ij K_ij u_i u_iᵀ sym(Ḡ) u_j u_jᵀ with the kernel K on the effective
    spectrum, and Ū = 2·Σ̄·U. Only the columns Σ̄·U w_j = Σ̄ u_j √λ_j are needed; with A = sym(Ḡ)·U W and
    C = (U W)ᵀ A they are

        Σ̄ U W = U W_R·[(K_Rj − κ_j)·C_Rj / λ_R] + A·diag(κ),    κ_j = K(ν, λ̃_j),

    where κ is the kernel between the floored directions (whose eigenvectors are never formed: they enter
    through the projector I − Σ_R u_i u_iᵀ) and each direction j; for j itself below the floor, κ_j is
    K's diagonal f'(ν). The pairs of two floored directions vanish on U. One d×d×M product each way, the
    rest d×M×M and M×M.

    ``scale`` ``(B, 1, 1)`` or None: U is the factor divided by ``scale`` (so that Uᵀ U stays in range), and the
    result is f of the unscaled factor's Σ, which is ``fn.homogeneity(scale)`` times f(Σ): that factor goes into
    h and f(ν) in the forward and into κ and the M×M correction in the backward, never over a d×d matrix.
    """

    @staticmethod
    def forward(
        u: torch.Tensor, fn: _Fn, name: str, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        lam, w = _eigh_checked(u.mT @ u, name)
        eff, nu = fn.effective(lam)
        keep = lam > _floor_value(lam, fn.eps)
        ext = torch.cat([nu, eff], dim=-1)  # the floored directions' value, then G's effective spectrum
        f = fn.f(ext)
        h = torch.where(keep, (f[..., 1:] - f[..., :1]) / torch.where(keep, lam, 1.0), 0.0)
        f0 = f[..., :1, None]
        factor = fn.homogeneity(scale)
        if factor is not None:
            h, f0 = h * factor.squeeze(-1), f0 * factor
        uw = u @ w
        out = (uw * h.unsqueeze(-2)) @ uw.mT
        return out + eye(out) * f0, lam, w, ext

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        u, fn, name, *rest = inputs
        factor = fn.homogeneity(rest[0] if rest else None)
        _, lam, w, ext = output
        ctx.mark_non_differentiable(lam, w, ext)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u, lam, w, ext, factor)
        ctx.fn, ctx.name = fn, name

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor | None, *_: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None, None]:
        if grad is None:
            return None, None, None, None
        u, lam, w, ext, factor = ctx.saved_tensors
        with torch.no_grad():
            keep = lam > _floor_value(lam, ctx.fn.eps)
            # ext[0] is the floored directions' value, ext[1:] G's effective spectrum: one kernel covers
            # K_ij (rows and columns 1:) and κ_j = K(ν, λ̃_j) (row 0; its diagonal entry is f'(ν)).
            k = ctx.fn.kernel(ext)
            if factor is not None:
                k = k * factor
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


SeriesFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _approx_kernel(root: torch.Tensor, inverse: bool, series: SeriesFn) -> torch.Tensor:
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
    def series(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _geometric(r, num_iters), _geometric(r, num_iters - 1)

    return lambda root, inverse: _approx_kernel(root, inverse, series)


def _taylor_kernel(degree: int) -> KernelFn:
    def series(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def series(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = (1 - rho * r).reciprocal()
        return g, g

    return lambda root, inverse: _approx_kernel(root, inverse, series)


# ------------------------------------------------------------------------------------ matrix power
def _power_kernel(alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Daleckii–Krein divided differences of x^α on effective eigenvalues that may be 0, without a
    difference in the denominator: (λ_hi^α − λ_lo^α)/(λ_hi − λ_lo) = λ_hi^(α−1)·expm1(α·ln r)/expm1(ln r),
    r = λ_lo/λ_hi, which is α·λ^(α−1) at r = 1 and λ_hi^(α−1) at r = 0 (the exact value with f(0) = 0). Two
    zero eigenvalues get 0: f'(0) is infinite for α < 1, and for a covariance of features those pairs never
    reach the features' gradient (they vanish on U; see :class:`_GramSpectral`)."""
    def kernel(lam: torch.Tensor) -> torch.Tensor:
        li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
        hi, lo = torch.maximum(li, lj), torch.minimum(li, lj)
        pos = hi > 0
        hi_safe = torch.where(pos, hi, 1.0)
        log_r = torch.log(lo / hi_safe)
        same = log_r == 0
        ratio = torch.where(same, alpha, torch.expm1(alpha * log_r) / torch.where(same, 1.0, torch.expm1(log_r)))
        return torch.where(pos, hi_safe.pow(alpha - 1.0) * ratio, 0.0)

    return kernel


def _power_fn(alpha: float, eps: float | None) -> _Fn:
    return _Fn(lambda lam: lam.pow(alpha), _power_kernel(alpha), eps, cut=True, power=alpha)


def _check_power(alpha: float, eps: float | None) -> None:
    check_number("alpha", alpha, 0.0, open_low=True, note="the power of the matrix")
    check_number("eps", eps, 0.0, 1.0, open_low=True, open_high=True, allow_none=True,
                 note="eigenvalues at or below eps·λ_max count as zero")


def matrix_power(a: torch.Tensor, alpha: float = 0.5, *, eps: float | None = None) -> torch.Tensor:
    """A^α of symmetric positive semi-definite matrices by eigendecomposition, with its gradient: the matrix
    power normalisation of MPN-COV (Li, Xie, Wang, Zuo, "Is Second-order Information Helpful for Large-scale
    Visual Recognition?", ICCV 2017).

    Args:
        a: ``(*, n, n)`` symmetric PSD matrices; float16/bfloat16 are computed in float32, as :func:`sqrtm`.
        alpha: the power, > 0 (0.5 in MPN-COV: the square root).
        eps: eigenvalues at or below ``eps`` × the largest count as zero, as MPN-COV does (it zeroes those
            at or below the float spacing of the largest); None: 10 × machine epsilon of the working dtype.

    Returns:
        ``(*, n, n)`` in the input dtype. The gradient is the exact Daleckii–Krein one of this function
        (MPN-COV's own backward drops the coupling between kept and zeroed eigenvalues instead;
        :doc:`/guides/heads`), and for a symmetric input it is symmetric. For ``alpha`` = 0.5 this differs
        from ``sqrtm(a, "eig")`` only on the null space, which ``eig`` raises to its floor.

    Example::

        >>> import torch, covpool
        >>> a = torch.diag(torch.tensor([4.0, 1.0, 0.0]))
        >>> covpool.matrix_power(a, 0.5).diagonal()
        tensor([2., 1., 0.])
    """
    check_square(a)
    _check_power(alpha, eps)
    n = a.shape[-1]
    if n == 0:
        return a.clone()
    fn = _power_fn(float(alpha), eps)
    return full_precision(lambda w: _Spectral.apply(w.reshape(-1, n, n), fn, "matrix_power")[0].reshape(a.shape), a)


def power_matrix(a: torch.Tensor, alpha: float, eps: float | None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(scale²·A)^α of ``a`` ``(B, n, n)`` (float32/float64, autocast off): :func:`matrix_power`'s computation,
    with the scale folded in (:class:`_Spectral`)."""
    return _Spectral.apply(a, _power_fn(float(alpha), eps), "matrix_power", scale)[0]


def power_gram(u: torch.Tensor, alpha: float, eps: float | None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(U Uᵀ)^α from the Gram side (:class:`_GramSpectral`); ``u`` ``(B, d, M)``, divided by ``scale``."""
    return _GramSpectral.apply(u, _power_fn(float(alpha), eps), "matrix_power", scale)[0]


def _register(name: str, kernel: Callable[..., KernelFn], options: dict[str, Option], doc: str) -> None:
    """Register a spectral backend: exact eigendecomposition forward, ``kernel(**options)`` in the backward,
    on the matrix and on the Gram side."""
    def fn(a: torch.Tensor, inverse: bool, eps: float | None, scale: torch.Tensor | None = None,
           **kw: Any) -> torch.Tensor:
        return _Spectral.apply(a, _root_fn(inverse, eps, kernel(**kw)), name, scale)[0]

    def gram(u: torch.Tensor, eps: float | None, scale: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        return _GramSpectral.apply(u, _root_fn(False, eps, kernel(**kw)), name, scale)[0]

    # Gram side from M < 0.9·d: measured crossover 0.93–0.97 (B = 32, d = 128 and 256, fwd+bwd, 2-core CPU).
    register_backend(name, fn, {**options, "eps": _EPS}, doc=doc, gram=gram, gram_below=0.9)


def _relative_floor(key: str, value: object) -> float | None:
    return check_number(key, value, 0.0, 1.0, open_low=True, open_high=True, allow_none=True,
                        note="the eigenvalue floor relative to the largest eigenvalue: at 1 or more every "
                             "eigenvalue would be raised to the largest or beyond")


_EPS = Option(None, _relative_floor, "eigenvalue floor relative to the largest eigenvalue, in (0, 1) "
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
