"""Matrix-product backends: ``ns`` (iSQRT-COV), ``mtp_lya`` and ``mpa_lya`` (Song et al., ICLR 2022).

They use only batched products (and, for ``mpa_lya``, one Cholesky solve), which is what makes them
fast on GPUs. Inputs are ``(B, n, n)`` float32/float64, already validated by the public functions.
"""
from __future__ import annotations

import math

import torch

from . import _coefficients
from ._double import guard
from ._registry import Option, degree_pair, int_at_least, one_of, register_backend

__all__ = ["lyapunov_sign"]


def _eye(a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale·I of the matrix size, broadcast over the batch (never materialised per matrix)."""
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).mul_(scale)


def _norm(a: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-matrix normaliser (B, 1, 1), floored at the smallest normal number so a zero matrix gives 0.

    The Frobenius norm is taken of A / max|a_ij| and scaled back: its squares would overflow float32 for
    entries above ~1e19 and underflow below ~1e-19 (then A/‖A‖ is inf or NaN). The trace needs no care
    below ~1e38 / n.
    """
    tiny = torch.finfo(a.dtype).tiny
    if kind == "trace":
        c = a.diagonal(dim1=-2, dim2=-1).sum(-1)
    else:
        m = a.abs().amax(dim=(-2, -1)).clamp_min(tiny)
        c = torch.linalg.matrix_norm(a / m[:, None, None]) * m
    return c.clamp_min(tiny)[:, None, None]


# ---------------------------------------------------------------------------------------------- ns
class _NewtonSchulz(torch.autograd.Function):
    """Coupled Newton–Schulz iteration of iSQRT-COV (Li et al., CVPR 2018) with a hand-written backward.

    Y₀ = A/c, Z₀ = I; T = ½(3I − Z Y), Y ← Y T, Z ← T Z; √A ≈ √c·Y, A^{-1/2} ≈ Z/√c. With N =
    ``num_iters`` the forward costs 3N − 3 products (the first step has Z₀ = I, the last updates only
    the output). The backward is reverse-mode differentiation of exactly these steps applied to the
    symmetrised upstream gradient sym(Ḡ) (the symmetric part of autograd through the loop), with every
    Y, Z, T symmetric (they are polynomials in A) so transposes are free, and each adjoint update fused
    into one ``baddbmm``: 6N − 6 products and no other full-size passes besides the normalisation.
    Under ``create_graph=True`` it re-runs the iteration under autograd instead, so that second
    derivatives are exact.
    """

    @staticmethod
    def forward(a: torch.Tensor, inverse: bool, num_iters: int, norm: str):
        out, c, ys, zs, ts = _ns_iterate(a, inverse, num_iters, norm, keep=True)
        # Z₁ is T₁: return each tensor once (torch.compile rejects an output listed twice).
        return (out, c, *ys, *zs[2:], *ts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, inverse, num_iters, norm = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # the intermediates get no gradient: don't fill zeros for them
        ctx.save_for_backward(a, *output)
        ctx.inverse, ctx.num_iters, ctx.norm = inverse, num_iters, norm

    @staticmethod
    def backward(ctx, grad, *_):
        if grad is None:
            return None, None, None, None
        a, out, c, *rest = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the iteration again, with autograd, from the saved input,
            # so that a second derivative is exact (the fast path below works on constants).
            with torch.enable_grad():
                root = _ns_iterate(a, ctx.inverse, ctx.num_iters, ctx.norm, keep=False)[0]
                (g_a,) = torch.autograd.grad(root, a, 0.5 * (grad + grad.mT), create_graph=True)
            return g_a, None, None, None
        n_it = ctx.num_iters
        n_z = max(n_it - 2, 0)
        ys, ts = rest[:n_it], rest[n_it + n_z:]
        zs = [None, ts[0], *rest[n_it:n_it + n_z]]
        # torch's convention for functions of symmetric matrices (and every other backend's): the
        # gradient is the one w.r.t. symmetric perturbations, symmetric for any upstream gradient. The
        # iteration is a polynomial in A, so symmetrising Ḡ symmetrises the result.
        grad = 0.5 * (grad + grad.mT)
        g_out = grad * (c.rsqrt() if ctx.inverse else c.sqrt())
        # The output is out_n·c^(±½): c̄ = ±½ <Ḡ, out>/c.
        g_c = (grad * out).sum(dim=(-2, -1), keepdim=True) / c * (-0.5 if ctx.inverse else 0.5)
        # Every adjoint update is a fresh product followed by an in-place baddbmm_: no extra
        # allocation or copy per step.
        if n_it == 1:
            g_t = g_out if ctx.inverse else ys[0] @ g_out
            g_y = -0.5 * g_t if ctx.inverse else (g_out @ ts[0]).add_(g_t, alpha=-0.5)
        else:
            y, z, t = ys[-1], zs[-1], ts[-1]
            if ctx.inverse:  # out = T Z
                g_t = g_out @ z
                g_z = (t @ g_out).baddbmm_(g_t, y, alpha=-0.5)
                g_y = (z @ g_t).mul_(-0.5)
            else:  # out = Y T
                g_t = y @ g_out
                g_y = (g_out @ t).baddbmm_(z, g_t, alpha=-0.5)
                g_z = (g_t @ y).mul_(-0.5)
            for k in range(n_it - 2, 0, -1):
                y, z, t = ys[k], zs[k], ts[k]
                # Y' = Y T, Z' = T Z, T = 1.5I − ½ Z Y:
                # T̄ = Y Ȳ' + Z̄' Z;  Ȳ = Ȳ' T − ½ Z T̄;  Z̄ = T Z̄' − ½ T̄ Y.
                g_t = (y @ g_y).baddbmm_(g_z, z)
                g_y = (g_y @ t).baddbmm_(z, g_t, alpha=-0.5)
                g_z = (t @ g_z).baddbmm_(g_t, y, alpha=-0.5)
            # First step: Y₁ = Y₀ T₁, Z₁ = T₁ = 1.5I − ½ Y₀.
            g_t = g_z.baddbmm_(ys[0], g_y)
            g_y = (g_y @ ts[0]).add_(g_t, alpha=-0.5)
        # Y₀ = A/c: Ā = Ȳ₀/c and c̄ −= <Ȳ₀, Y₀>/c; then c̄ reaches A through ∂c/∂A (I or A/c).
        y0 = ys[0]
        g_c = g_c - (g_y * y0).sum(dim=(-2, -1), keepdim=True) / c
        g_a = g_y.div_(c)
        if ctx.norm == "trace":
            g_a.diagonal(dim1=-2, dim2=-1).add_(g_c.squeeze(-1))
        else:
            g_a.add_(g_c * y0)
        return g_a, None, None, None


def _ns_iterate(a: torch.Tensor, inverse: bool, num_iters: int, norm: str, keep: bool):
    """The iteration; with ``keep`` it also returns Y₀…Y_{N−1}, Z₁…Z_{N−1}, T₁…T_N for the backward.
    Without it intermediates are freed as it goes, so the allocator reuses their memory."""
    c = _norm(a, norm)
    eye15 = _eye(a, 1.5)
    y = a / c
    # Out of place (no in-place update of a diagonal view): exportable to ONNX and differentiable
    # twice, at the cost of no extra pass.
    t = torch.add(eye15, y, alpha=-0.5)
    ys, zs, ts = ([y], [None], [t]) if keep else ([], [], [])
    if num_iters == 1:
        out = t if inverse else y @ t
    else:
        y, z = y @ t, t
        for step in range(num_iters - 1):
            if keep:
                ys.append(y)
                zs.append(z)
            t = torch.baddbmm(eye15, z, y, alpha=-0.5)
            if keep:
                ts.append(t)
            if step < num_iters - 2:  # the last step only forms the requested root, below
                y, z = y @ t, t @ z
        out = t @ z if inverse else y @ t
    out = out * (c.rsqrt() if inverse else c.sqrt())
    return out, c, ys, zs, ts


def _ns(a: torch.Tensor, inverse: bool, num_iters: int, norm: str) -> torch.Tensor:
    if torch.is_grad_enabled() and a.requires_grad:
        return _NewtonSchulz.apply(a, inverse, num_iters, norm)[0]
    return _ns_iterate(a, inverse, num_iters, norm, keep=False)[0]


def _ns_products(inverse: bool, num_iters: int, norm: str) -> tuple[int, int]:
    """3N − 3 products forward (for N = 1: one, none for the inverse root, which is T₁ itself); the
    exact backward costs two per forward product."""
    fwd = 3 * num_iters - 3 if num_iters > 1 else int(not inverse)
    return fwd, 3 * fwd


register_backend(
    "ns",
    _ns,
    {
        "num_iters": Option(5, int_at_least(1), "Newton–Schulz iterations"),
        "norm": Option("trace", one_of("trace", "fro"), "pre-normalisation: 'trace' (iSQRT-COV) or 'fro' "
                       "(Frobenius norm: larger eigenvalues after scaling, so faster convergence)"),
    },
    doc="coupled Newton–Schulz iteration (Li et al., CVPR 2018); exact (symmetric) gradient of the iteration",
    products=_ns_products,
)


# ------------------------------------------------------------------------------ polynomial helpers
def _split(degree: int, num_polys: int) -> int:
    """Block size s of Paterson–Stockmeyer evaluation minimising the products for ``num_polys``
    polynomials of ``degree`` that share the powers X², …, X^s."""
    def cost(s: int) -> int:
        return (s - 1) + num_polys * max(0, -(-(degree + 1) // s) - 1)

    return min(range(1, degree + 2), key=cost)


def _powers(x: torch.Tensor, s: int) -> list[torch.Tensor]:
    powers = [x]
    for _ in range(s - 1):
        powers.append(powers[-1] @ x)
    return powers  # X, X², …, X^s


def _poly(coeffs: tuple[float, ...], powers: list[torch.Tensor]) -> torch.Tensor:
    """Σ_k c_k X^k by Paterson–Stockmeyer: Horner in X^s over blocks of s coefficients."""
    s = len(powers)

    def block(cs: tuple[float, ...]) -> torch.Tensor:
        # c₀·I + c₁·X in one pass with a broadcast identity; no in-place update of a diagonal view,
        # which ONNX export cannot functionalise.
        eye = _eye(powers[0], cs[0])
        out = torch.add(eye, powers[0], alpha=cs[1]) if len(cs) > 1 else eye.expand_as(powers[0]).clone()
        for k in range(2, len(cs)):
            out.add_(powers[k - 1], alpha=cs[k])
        return out

    blocks = [coeffs[i:i + s] for i in range(0, len(coeffs), s)]
    out = block(blocks[-1])
    for cs in reversed(blocks[:-1]):
        out = block(cs).baddbmm_(powers[-1], out)
    return out


# ------------------------------------------------------------------------------------- Lyapunov
def lyapunov_sign(b: torch.Tensor, c: torch.Tensor, num_iters: int) -> torch.Tensor:
    """Solve B X + X B = C for symmetric B (eigenvalues in (0, 1]) and symmetric C by the coupled
    Newton–Schulz iteration for sign([[B, C], [0, −B]]) = [[I, 2X], [0, −I]] (Song et al., ICLR 2022).

    B ← ½B(3I − B²), C ← ½(3C − B²C − CB² + BCB); X = ½C. C stays symmetric, so CB² = (B²C)ᵀ and one
    step costs 5 products (3 in the last). Eigen-directions with tiny eigenvalues of B are not fully
    converged after ``num_iters`` steps, which bounds the solution there (a feature on rank-deficient
    input: the exact solution is infinite).
    """
    # D_k = 2^k C_k obeys the same recursion without the ½, which saves a pass per step.
    for k in range(num_iters):
        e = b @ c
        bbc = b @ e
        c = (e @ b).sub_(bbc).sub_(bbc.mT).add_(c, alpha=3.0)
        if k < num_iters - 1:
            b = b.mul(1.5).baddbmm_(b @ b, b, alpha=-0.5)
    # Rounding leaves an antisymmetric part that the iteration does not damp (measured 1e-5 relative
    # after 30 steps in float64); the solution is symmetric, so return the symmetric part.
    return (c + c.mT).mul_(0.5 ** (num_iters + 2))


class _LyaRoot(torch.autograd.Function):
    """Approximate root in the forward (``approx(x, inverse)`` of X = I − A/‖A‖_F), Lyapunov backward.

    The backward is the exact derivative of the matrix square root evaluated at the computed root S:
    S·Ā + Ā·S = sym(Ḡ). For the inverse root Y, S = A·Y and the right-hand side is −Y Ḡ Y.
    """

    @staticmethod
    def forward(a: torch.Tensor, inverse: bool, approx, lya_iters: int, refine: int, name: str):
        c = _norm(a, "fro")
        x = torch.addcdiv(_eye(a), a, c, value=-1.0)  # I − A/‖A‖_F in one pass, out of place (exportable)
        a_n = a / c if refine else None  # only the refinement needs A/‖A‖_F
        root = approx(x, inverse) if refine == 0 else _refine(a_n, approx(x, True), inverse, refine)
        s = c.sqrt()
        return root / s if inverse else root * s, root, s

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, inverse, _, lya_iters, _, name = inputs
        _, root, s = output
        ctx.mark_non_differentiable(root, s)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(a, root, s)  # a: the inverse root's S = A·Y, and the second-derivative guard
        ctx.inverse, ctx.lya_iters, ctx.name = inverse, lya_iters, name

    @staticmethod
    def backward(ctx, grad, _grad_root, _grad_s):
        if grad is None:
            return None, None, None, None, None, None
        a, root, s = ctx.saved_tensors
        with torch.no_grad():
            g = 0.5 * (grad + grad.mT)
            if ctx.inverse:
                # root = (A/c)^{-1/2}; S_n = (A/c)·root; RHS −Y Ḡ Y = −root Ḡ root / c, then /√c for
                # S = √c·S_n. Divide by s and s² in turn: s³ overflows float32 for ‖A‖ > 1e25.
                sqrt_n = (a @ root).div_(s.square())
                rhs = root @ g @ root
                g_a = lyapunov_sign(sqrt_n, rhs, ctx.lya_iters).div_(s).div_(s.square()).neg_()
            else:
                g_a = lyapunov_sign(root, g, ctx.lya_iters).div_(s)
        return guard(g_a, ctx.name, a, grad), None, None, None, None, None


def _refine(a_n: torch.Tensor, z: torch.Tensor, inverse: bool, steps: int) -> torch.Tensor:
    """Coupled Newton–Schulz steps started from Z ≈ A^{-1/2} and Y = A·Z ≈ A^{1/2}.

    The steps keep Y Z⁻¹ = A and square the error ‖I − Z A Z‖, so a rough approximant (the Padé
    inverse root of an ill-conditioned whitening matrix, say) becomes accurate in one or two steps of
    3 products each. The last step updates only the requested root.
    """
    eye15 = _eye(a_n, 1.5)
    y = a_n @ z
    for step in range(steps):
        t = torch.baddbmm(eye15, z, y, alpha=-0.5)
        last = step == steps - 1
        if not last or not inverse:
            y = y @ t
        if not last or inverse:
            z = t @ z
    return z if inverse else y


def _mtp_lya(a: torch.Tensor, inverse: bool, degree: int, lya_iters: int, refine: int) -> torch.Tensor:
    """Matrix Taylor Polynomial: √A ≈ √‖A‖ Σ_k c_k X^k, X = I − A/‖A‖_F (1/√ series for the inverse)."""
    def approx(x, inv):
        coeffs = _coefficients.taylor_sqrt(degree, inv)
        return _poly(coeffs, _powers(x, _split(degree, 1)))

    return _LyaRoot.apply(a, inverse, approx, lya_iters, refine, "mtp_lya")[0]


def _mpa_lya(a: torch.Tensor, inverse: bool, degree: tuple[int, int], lya_iters: int, refine: int) -> torch.Tensor:
    """Matrix Padé Approximant: √A ≈ √‖A‖ Q(X)⁻¹P(X); the inverse root swaps P and Q. P and Q are
    polynomials of the same symmetric X, so they commute and are symmetric positive definite for
    normalised input: one Cholesky factorisation and a triangular solve, never an explicit inverse."""
    m, n = degree

    def approx(x, inv):
        p, q = _coefficients.pade_sqrt(m, n)
        powers = _powers(x, _split(max(m, n), 2))
        num, den = _poly(p, powers), _poly(q, powers)
        if inv:
            num, den = den, num
        if torch.onnx.is_in_onnx_export():
            # ONNX has no Cholesky or linear solve: products only (see _spd_inverse).
            p_lo, p_hi, q_lo, q_hi = _coefficients.pade_range(m, n)
            return _spd_inverse(den, *((p_lo, p_hi) if inv else (q_lo, q_hi))) @ num
        chol = torch.linalg.cholesky_ex(den)[0]
        # The solve returns column-major matrices; the result is symmetric (P and Q commute), so its
        # transpose is the same matrix in the row-major layout the batched products run fastest on.
        return torch.cholesky_solve(num, chol).mT

    return _LyaRoot.apply(a, inverse, approx, lya_iters, refine, "mpa_lya")[0]


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
    eye2 = _eye(d, 2.0)
    z = torch.add(_eye(d, 2.0 * alpha), d, alpha=-alpha * alpha)  # the first step, without a product
    for _ in range(steps - 1):
        z = z @ torch.baddbmm(eye2, d, z, alpha=-1.0)
    return z


def _mpa_degree(key, value):
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


def _mtp_products(inverse: bool, degree: int, lya_iters: int, refine: int) -> tuple[int, int]:
    """Paterson–Stockmeyer: powers X², …, X^s, then one product per Horner step."""
    s = _split(degree, 1)
    return _lya_products((s - 1) + math.ceil((degree + 1) / s) - 1, inverse, lya_iters, refine)


def _mpa_products(inverse: bool, degree: tuple[int, int], lya_iters: int, refine: int) -> tuple[int, int]:
    """Shared powers, one Horner chain per polynomial, and the Cholesky solve counted as one product."""
    m, n = degree
    s = _split(max(m, n), 2)
    fwd = (s - 1) + (math.ceil((m + 1) / s) - 1) + (math.ceil((n + 1) / s) - 1) + 1
    return _lya_products(fwd, inverse, lya_iters, refine)


_LYA = Option(8, int_at_least(1), "coupled sign iterations of the Lyapunov solver in the backward")
_REFINE = Option(0, int_at_least(0), "Newton–Schulz refinement steps after the approximant (3 products each; "
                 "0 is the published method)")

register_backend(
    "mtp_lya",
    _mtp_lya,
    {"degree": Option(10, int_at_least(1), "degree of the Taylor polynomial"), "lya_iters": _LYA, "refine": _REFINE},
    doc="Matrix Taylor Polynomial forward, Lyapunov backward (Song et al., ICLR 2022)",
    products=_mtp_products,
)
register_backend(
    "mpa_lya",
    _mpa_lya,
    {"degree": Option((5, 5), _mpa_degree, "[m/n] degree of the Padé approximant"), "lya_iters": _LYA,
     "refine": _REFINE},
    doc="Matrix Padé Approximant forward, Lyapunov backward (Song et al., ICLR 2022)",
    products=_mpa_products,
)
