"""``mtp_lya`` and ``mpa_lya`` (Song et al., "Fast Differentiable Matrix Square Root", ICLR 2022): a Taylor
or Padé approximant of the root in the forward, the Lyapunov equation of the exact root's derivative in
the backward, on a matrix or on the Gram side of a covariance.

They use only batched products (and, for ``mpa_lya``, one Cholesky solve), which is what makes them fast
on GPUs. Inputs are ``(B, n, n)`` float32/float64 (or ``(B, d, M)`` factors for the Gram side), already
validated by the public functions.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from . import _coefficients
from ._checks import check_int
from ._coefficients import Degree
from ._double import guard
from ._matrix import eye, lift, normaliser, onnx_exporting, outer, poly, powers, products_in_tf32, split
from ._registry import Option, bool_option, degree_pair, int_at_least, register_backend

__all__ = ["lyapunov_sign"]


def lyapunov_sign(b: torch.Tensor, c: torch.Tensor, num_iters: int) -> torch.Tensor:
    """Solve B X + X B = C for symmetric B (eigenvalues in (0, 1]) and symmetric C by the coupled
    Newton–Schulz iteration for sign([[B, C], [0, −B]]) = [[I, 2X], [0, −I]] (Song et al., ICLR 2022).

    B ← ½B(3I − B²), C ← ½(3C − B²C − CB² + BCB); X = ½C. The loop runs D_k = 2^k·C_k, the same recursion
    without the ½. With E = B·D, B·D·B = E·B is symmetric, so D ← W + Wᵀ with W = 1.5·D + ½·E·B − B·E: three
    products, the last two accumulated into W, and one pass, and D stays exactly symmetric; B's update is a
    product and an accumulated product: 5 products per step (3 in the last). Eigen-directions with tiny
    eigenvalues of B are not fully converged after ``num_iters`` steps, which bounds the solution there (a
    feature on rank-deficient input: the exact solution is infinite).

    Args:
        b: ``(batch, n, n)`` symmetric, eigenvalues in (0, 1] (a normalised square root, in the backward of
            ``mtp_lya`` and ``mpa_lya``); one batch dimension exactly (batched products).
        c: ``(batch, n, n)`` symmetric right-hand side, same dtype and device.
        num_iters: sign-iteration steps, >= 1 (ValueError otherwise).

    Returns:
        X, ``(batch, n, n)``, symmetric.

    Example::

        >>> import torch
        >>> from covpool.linalg import lyapunov_sign
        >>> b = torch.diag(torch.tensor([1.0, 0.5], dtype=torch.float64))[None]
        >>> x = lyapunov_sign(b, torch.ones(1, 2, 2, dtype=torch.float64), num_iters=8)
        >>> torch.allclose(b @ x + x @ b, torch.ones(1, 2, 2, dtype=torch.float64))
        True
    """
    check_int("num_iters", num_iters)
    for k in range(num_iters):
        e = b @ c
        w = torch.baddbmm(c, e, b, beta=1.5, alpha=0.5).baddbmm_(b, e, alpha=-1.0)
        c = w + w.mT
        if k < num_iters - 1:
            b = torch.baddbmm(b, b @ b, b, beta=1.5, alpha=-0.5)
    return c * 0.5 ** (num_iters + 1)


# ------------------------------------------------------------------------------------ approximants
def _solve(den: torch.Tensor, num: torch.Tensor, den_range: tuple[float, float]) -> torch.Tensor:
    """den⁻¹·num for commuting symmetric positive definite polynomials of one matrix: one Cholesky
    factorisation and a triangular solve, never an explicit inverse (torch 2.14's batched LU on the CPU
    fails at some sizes). ONNX has no Cholesky or solve: under export, products only (:func:`_spd_inverse`,
    with ``den_range`` the polynomial's range on [0, 1])."""
    if onnx_exporting():
        return _spd_inverse(den, *den_range) @ num
    chol = torch.linalg.cholesky_ex(den)[0]
    # The solve returns column-major matrices; the result is symmetric (the polynomials commute), so its
    # transpose is the same matrix in the row-major layout the batched products run fastest on.
    return torch.cholesky_solve(num, chol).mT


def _spd_inverse(d: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """D⁻¹ for symmetric D with spectrum in [lo, hi] (known a priori: D is a Padé polynomial of the
    normalised X, whose eigenvalues lie in [0, 1]) by the Newton–Schulz inverse iteration
    Z ← Z(2I − D Z) from Z₀ = 2/(lo + hi)·I. The error contracts from r = (κ − 1)/(κ + 1) as r^(2^k), so
    the step count is fixed by κ = hi/lo and the dtype: 10 steps (20 products) for the [5/5] forward in
    float32, 14 for its inverse root (κ ≈ 93 and 1024). Used only for ONNX export."""
    lo, hi = 0.9 * lo, 1.1 * hi  # margin for the grid estimate of the range and for rounding
    r = (hi - lo) / (hi + lo)
    steps = max(1, math.ceil(math.log2(math.log(1 / torch.finfo(d.dtype).eps) / -math.log(r))))
    alpha = 2.0 / (lo + hi)
    eye2 = eye(d, 2.0)
    z = torch.add(eye(d, 2.0 * alpha), d, alpha=-alpha * alpha)  # the first step, without a product
    for _ in range(steps - 1):
        z = z @ torch.baddbmm(eye2, d, z, alpha=-1.0)
    return z


def _den_range(degree: Degree, inverse: bool) -> tuple[float, float]:
    """The range on [0, 1] of the approximant's denominator: 1 for a Taylor polynomial (an int degree)."""
    if isinstance(degree, int):
        return 1.0, 1.0
    p_lo, p_hi, q_lo, q_hi = _coefficients.pade_range(*degree)
    return (p_lo, p_hi) if inverse else (q_lo, q_hi)


def _approx(x: torch.Tensor, kind: str, degree: Degree, inverse: bool) -> torch.Tensor:
    """The approximant num(X)/den(X) of (I − X)^(±1/2), Paterson–Stockmeyer with shared powers."""
    num, den = _coefficients.approximant(kind, degree, inverse)
    xs = powers(x, split(max(len(num), len(den)) - 1, 1 if len(den) == 1 else 2))
    out = poly(num, xs)
    return out if len(den) == 1 else _solve(poly(den, xs), out, _den_range(degree, inverse))


def _refine(a_n: torch.Tensor, z: torch.Tensor, inverse: bool, steps: int) -> torch.Tensor:
    """Coupled Newton–Schulz steps started from Z ≈ A^{-1/2} and Y = A·Z ≈ A^{1/2}.

    The steps keep Y Z⁻¹ = A and square the error ‖I − Z A Z‖, so a rough approximant (the Padé
    inverse root of an ill-conditioned whitening matrix, say) becomes accurate in one or two steps of
    3 products each. The last step updates only the requested root.
    """
    eye15 = eye(a_n, 1.5)
    y = a_n @ z
    for step in range(steps):
        t = torch.baddbmm(eye15, z, y, alpha=-0.5)
        last = step == steps - 1
        if not last or not inverse:
            y = y @ t
        if not last or inverse:
            z = t @ z
    return z if inverse else y


def _gram_approx(g_n: torch.Tensor, kind: str, degree: Degree, inverse: bool) -> tuple[float, torch.Tensor]:
    """The approximant of (I − X)^(±1/2) at X = A/‖A‖_F as a Gram-side iterate α·I + U_n W U_nᵀ, from
    G_n = U_nᵀ U_n (``_matrix``): α = r(1) and W = h(G_n) = −den(Y)⁻¹·ñ(Y), Y = I − G_n, with the
    coefficients of :func:`_coefficients.gram_form`."""
    alpha, tail = _coefficients.gram_form(kind, degree, inverse)
    _, den = _coefficients.approximant(kind, degree, inverse)
    y = torch.add(eye(g_n), g_n, alpha=-1.0)
    xs = powers(y, split(max(len(tail), len(den)) - 1, 1 if len(den) == 1 else 2))
    num = poly(tail, xs)
    return alpha, -(num if len(den) == 1 else _solve(poly(den, xs), num, _den_range(degree, inverse)))


def _gram_refined(g_n: torch.Tensor, kind: str, degree: Degree, steps: int) -> torch.Tensor:
    """:func:`_refine` on the Gram side, for the square root, coupled as there (an uncoupled Z-only form
    amplifies rounding step by step on ill-conditioned input). Z starts as the inverse-root approximant
    ζ·I + U_n W_Z U_nᵀ and acts on U_n through its outer matrix P_Z; Y = A_n Z has null value 0 and inner
    matrix W_Y = P_Z. A step: T = 1.5·I − ½·Z·Y (outer P_T = 1.5·I − ½·P_Z·G_n·W_Y), Y ← Y·T (W_Y ← W_Y·P_T),
    Z ← T·Z (P_Z ← P_T·P_Z): four M×M products. Returns the inner matrix of the refined Y."""
    zeta, w_z = _gram_approx(g_n, kind, degree, True)
    p_z = outer(zeta, w_z, g_n)
    w_y = p_z
    for step in range(steps):
        # Z·Y = U_n (P_Zᵀ W_Y) U_nᵀ and G_n P_Zᵀ = P_Z G_n: grouped so, rounding keeps the coupling.
        p_t = torch.baddbmm(eye(g_n, 1.5), p_z @ g_n, w_y, alpha=-0.5)
        w_y = w_y @ p_t
        if step < steps - 1:  # the last step forms only Y
            p_z = p_t @ p_z
    return w_y


# ------------------------------------------------------------------------------------ autograd
ApproxFn = Callable[[torch.Tensor, bool], torch.Tensor]
"""``approx(x, inverse)``: the approximant of (I − X)^(±1/2) (:func:`_approx` with its kind and degree bound)."""


class _LyaRoot(torch.autograd.Function):
    """Approximate root in the forward (the approximant of X = I − A/‖A‖_F), Lyapunov backward.

    The backward is the exact derivative of the matrix square root evaluated at the computed root S:
    S·Ā + Ā·S = sym(Ḡ). For the inverse root Y, S = A·Y and the right-hand side is −Y Ḡ Y.
    """

    @staticmethod
    def forward(a: torch.Tensor, inverse: bool, approx: ApproxFn, lya_iters: int, refine: int, name: str,
                tf32: bool, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = normaliser(a, "fro")
        x = torch.addcdiv(eye(a), a, c, value=-1.0)  # I − A/‖A‖_F in one pass, out of place (exportable)
        root = approx(x, inverse) if refine == 0 else _refine(a / c, approx(x, True), inverse, refine)
        s = c.sqrt()
        out_s = s if scale is None else s * scale  # the root of scale²·A: scale^(±1) times A's
        return root / out_s if inverse else root * out_s, root, s

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        a, inverse, _, lya_iters, _, name, tf32, *scale = inputs
        _, root, s = output
        ctx.mark_non_differentiable(root, s)
        ctx.set_materialize_grads(False)
        # a: the inverse root's S = A·Y, and the second-derivative guard
        ctx.save_for_backward(a, root, s, scale[0] if scale else None)
        ctx.inverse, ctx.lya_iters, ctx.name, ctx.tf32 = inverse, lya_iters, name, tf32

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor | None, _grad_root: torch.Tensor | None, _grad_s: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None, None, None, None, None, None]:
        if grad is None:
            return None, None, None, None, None, None, None, None
        a, root, s, scale = ctx.saved_tensors
        # The output is scale^(±1) times the root of A: so is its gradient, folded into the last division.
        out_s = s if scale is None else s * scale
        with torch.no_grad(), products_in_tf32(grad.device, ctx.tf32):
            g = grad + grad.mT  # 2·sym(Ḡ): the solution is linear in it, the ½ joins the last scaling
            if ctx.inverse:
                # root = (A/c)^{-1/2}; S_n = (A/c)·root; RHS −Y Ḡ Y = −root Ḡ root / c, then /√c for
                # S = √c·S_n. Divide by s and s² in turn: s³ overflows float32 for ‖A‖ > 1e25.
                sqrt_n = (a @ root).div_(s.square())
                rhs = root @ g @ root
                g_a = lyapunov_sign(sqrt_n, rhs, ctx.lya_iters).div_(out_s * -2.0).div_(s.square())
            else:
                g_a = lyapunov_sign(root, g, ctx.lya_iters).div_(s * 2.0 if scale is None else s * 2.0 / scale)
        return guard(g_a, ctx.name, a, grad), None, None, None, None, None, None, None


class _GramLyaRoot(torch.autograd.Function):
    """√(U Uᵀ) for U ``(B, d, M)``, computed on the M×M Gram side with the same forward and backward as
    :class:`_LyaRoot` on the d×d matrix.

    Forward: the normalised root is S_n = α·I + U_n W U_nᵀ (U_n = U/√c, c = ‖UᵀU‖_F = ‖U Uᵀ‖_F), α the
    approximant's value on the null space (r(1); 0 after a refinement), W from :func:`_gram_approx` or
    :func:`_gram_refined`; the root is √c·S_n.

    Backward: the channel side solves S_n X + X S_n = sym(Ḡ) by :func:`lyapunov_sign` and returns
    Σ̄ = X/√c, so Ū = 2·Σ̄·U. Only X·U is needed. The sign iteration's right-hand sides C_k act on U as
    V_k = C_k·U, and B_k = β·I + U_n W U_nᵀ (a polynomial in Σ, so B_k·U = U·P) turns its step into
    V ← V·Φ + U·Ψ with M×M matrices Φ = βP − P² + (3 − β²)·I and Ψ = W·(S P − P S − β S), S = Uᵀ V/c.
    So V_k = V₀·A_k + U·B_k throughout, and the whole iteration runs on M×M matrices: one d×d×M product
    (V₀ = sym(Ḡ)·U) and three d×M×M ones in all, a dozen M×M×M per step. The B_k follow ½B(3I − B²) in
    the (β, W, P) form.

    ``scale`` ``(B, 1, 1)`` or None: U is the factor divided by ``scale``, and the result is the root of the
    unscaled factor's Σ, ``scale`` times √(U Uᵀ) (the root is homogeneous): the factor goes into W and α in the
    forward and into the last scaling of Ū in the backward, never over a d×d matrix.
    """

    @staticmethod
    def forward(
        u: torch.Tensor, alpha: float, inner: Callable[[torch.Tensor], torch.Tensor], lya_iters: int, name: str,
        tf32: bool, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = u.mT @ u
        c = normaliser(g, "fro")
        w = inner(g / c)
        s = c.sqrt()
        return lift(alpha, w, u, s, scale), w, c

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        u, alpha, _, lya_iters, name, tf32, *rest = inputs
        _, w, c = output
        ctx.mark_non_differentiable(w, c)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u, w, c, rest[0] if rest else None)
        ctx.alpha, ctx.lya_iters, ctx.name, ctx.tf32 = alpha, lya_iters, name, tf32

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor | None, _grad_w: torch.Tensor | None, _grad_c: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None, None, None, None, None]:
        if grad is None:
            return None, None, None, None, None, None, None
        u, w, c, scale = ctx.saved_tensors
        with torch.no_grad(), products_in_tf32(grad.device, ctx.tf32):
            g_n = (u.mT @ u) / c
            beta, p = ctx.alpha, outer(ctx.alpha, w, g_n)
            v0 = (0.5 * (grad + grad.mT)) @ u
            s_v = (u.mT @ v0) / c  # S = Uᵀ V / c
            # V = V₀ A + U B (A = I, B = 0 at the start: formed from the first step's Φ and Ψ)
            coef_a: torch.Tensor | None = None
            coef_b: torch.Tensor | None = None
            for k in range(ctx.lya_iters):
                p2 = p @ p
                psi = w @ (s_v @ p - p @ s_v - beta * s_v)
                phi = torch.add(eye(p, 3.0 - beta * beta), p, alpha=beta).sub_(p2)
                coef_a = phi if coef_a is None else coef_a @ phi
                coef_b = psi if coef_b is None else torch.baddbmm(psi, coef_b, phi)
                s_v = torch.baddbmm(g_n @ psi, s_v, phi)
                if k < ctx.lya_iters - 1:
                    w = w * 1.5 - 0.5 * (w @ torch.add(p2, p, alpha=beta).add_(eye(p, beta * beta)))
                    p = p * 1.5 - 0.5 * (p2 @ p)
                    beta = 1.5 * beta - 0.5 * beta ** 3
            assert coef_a is not None and coef_b is not None  # lya_iters >= 1: its option's check
            v = torch.baddbmm(u @ coef_b, v0, coef_a)
            # X·U = V·2^-(iters+1) (the D_k scaling of lyapunov_sign), Σ̄ = X/√c, Ū = 2Σ̄U; times the scale.
            g_u = v.mul_(0.5 ** ctx.lya_iters).div_(c.sqrt() if scale is None else c.sqrt() / scale)
        return guard(g_u, ctx.name, u, grad), None, None, None, None, None, None


# ------------------------------------------------------------------------------------ backends
def _lya(kind: str, a: torch.Tensor, inverse: bool, degree: Degree, lya_iters: int, refine: int,
         tf32: bool = False, scale: torch.Tensor | None = None) -> torch.Tensor:
    def approx(x: torch.Tensor, inv: bool) -> torch.Tensor:
        return _approx(x, kind, degree, inv)

    with products_in_tf32(a.device, tf32):
        return _LyaRoot.apply(a, inverse, approx, lya_iters, refine, _NAMES[kind], tf32, scale)[0]


def _lya_gram(kind: str, u: torch.Tensor, degree: Degree, lya_iters: int, refine: int, tf32: bool = False,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    # The null value α must be known before the autograd function runs (its backward needs it): r(1) of the
    # approximant, or 0 after a refinement (Y = A_n Z vanishes on A's null space).
    alpha = 0.0 if refine else _coefficients.gram_form(kind, degree, False)[0]

    def inner(g_n: torch.Tensor) -> torch.Tensor:
        return _gram_refined(g_n, kind, degree, refine) if refine else _gram_approx(g_n, kind, degree, False)[1]

    with products_in_tf32(u.device, tf32):
        return _GramLyaRoot.apply(u, alpha, inner, lya_iters, _NAMES[kind], tf32, scale)[0]


_NAMES = {"taylor": "mtp_lya", "pade": "mpa_lya"}


def _mtp_lya(a: torch.Tensor, inverse: bool, degree: int, lya_iters: int, refine: int, tf32: bool,
             scale: torch.Tensor | None = None) -> torch.Tensor:
    """Matrix Taylor Polynomial: √A ≈ √‖A‖ Σ_k c_k X^k, X = I − A/‖A‖_F (1/√ series for the inverse)."""
    return _lya("taylor", a, inverse, degree, lya_iters, refine, tf32, scale)


def _mpa_lya(a: torch.Tensor, inverse: bool, degree: tuple[int, int], lya_iters: int, refine: int,
             scale: torch.Tensor | None = None) -> torch.Tensor:
    """Matrix Padé Approximant: √A ≈ √‖A‖ Q(X)⁻¹P(X); the inverse root swaps P and Q. P and Q are
    polynomials of the same symmetric X, so they commute and are symmetric positive definite for
    normalised input: one Cholesky factorisation and a triangular solve, never an explicit inverse. No TF32
    option: rounding the products' operands to TF32 multiplies its error by 7 (docs/guides/backends.md)."""
    return _lya("pade", a, inverse, degree, lya_iters, refine, scale=scale)


def _mtp_gram(u: torch.Tensor, degree: int, lya_iters: int, refine: int, tf32: bool,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    return _lya_gram("taylor", u, degree, lya_iters, refine, tf32, scale)


def _mpa_gram(u: torch.Tensor, degree: tuple[int, int], lya_iters: int, refine: int,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    return _lya_gram("pade", u, degree, lya_iters, refine, scale=scale)


def _mpa_degree(key: str, value: Any) -> tuple[int, int]:
    m, n = degree_pair(key, value)
    try:
        _coefficients.pade_sqrt(m, n)
    except ValueError as err:
        raise ValueError(f"{key}={value!r}: {err}; (5, 5) is the default") from None
    return m, n


def _lya_products(approx_fwd: int, inverse: bool, lya_iters: int, refine: int) -> tuple[int, int]:
    """The approximant's products, 3 per refinement step; backward: 5 per Lyapunov step (3 in the
    last), and for the inverse root the right-hand side −Y Ḡ Y and S = A·Y (3 more)."""
    fwd = approx_fwd + 3 * refine
    return fwd, fwd + 5 * (lya_iters - 1) + 3 + (3 if inverse else 0)


def _mtp_products(inverse: bool, degree: int, lya_iters: int, refine: int, tf32: bool) -> tuple[int, int]:
    """Paterson–Stockmeyer: powers X², …, X^s, then one product per Horner step."""
    s = split(degree, 1)
    return _lya_products((s - 1) + math.ceil((degree + 1) / s) - 1, inverse, lya_iters, refine)


def _mpa_products(inverse: bool, degree: tuple[int, int], lya_iters: int, refine: int) -> tuple[int, int]:
    """Shared powers, one Horner chain per polynomial, and the Cholesky solve counted as one product."""
    m, n = degree
    s = split(max(m, n), 2)
    fwd = (s - 1) + (math.ceil((m + 1) / s) - 1) + (math.ceil((n + 1) / s) - 1) + 1
    return _lya_products(fwd, inverse, lya_iters, refine)


_LYA = Option(8, int_at_least(1), "coupled sign iterations of the Lyapunov solver in the backward")
_REFINE = Option(0, int_at_least(0), "Newton–Schulz refinement steps after the approximant (3 products each; "
                 "0 is the published method)")

register_backend(
    "mtp_lya",
    _mtp_lya,
    {"degree": Option(10, int_at_least(1), "degree of the Taylor polynomial"), "lya_iters": _LYA, "refine": _REFINE,
     "tf32": Option(False, bool_option, "CUDA: the products in TF32 (within the Taylor polynomial's own error: "
                    "docs/guides/backends.md, 'TF32 and bf16 products')")},
    doc="Matrix Taylor Polynomial forward, Lyapunov backward (Song et al., ICLR 2022)",
    products=_mtp_products,
    gram=_mtp_gram,
    gram_below=0.7,  # measured crossover 0.75 (B = 32, d = 128 and 256, fwd+bwd, 2-core CPU)
)
register_backend(
    "mpa_lya",
    _mpa_lya,
    {"degree": Option((5, 5), _mpa_degree, "[m/n] degree of the Padé approximant"), "lya_iters": _LYA,
     "refine": _REFINE},
    doc="Matrix Padé Approximant forward, Lyapunov backward (Song et al., ICLR 2022)",
    products=_mpa_products,
    gram=_mpa_gram,
    gram_below=0.7,
)
