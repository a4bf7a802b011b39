"""The ``ns`` backend: the coupled Newton–Schulz iteration of iSQRT-COV (Li et al., CVPR 2018), on a
matrix or on the Gram side of a covariance.

Inputs are ``(B, n, n)`` float32/float64 (or ``(B, d, M)`` factors for the Gram side), already validated by
the public functions.
"""
from __future__ import annotations

from typing import Any

import torch

from ._matrix import dot, eye, normaliser, products_in_tf32
from ._registry import Option, bool_option, int_at_least, one_of, register_backend

__all__: list[str] = []


class _NewtonSchulz(torch.autograd.Function):
    """Coupled Newton–Schulz iteration with a hand-written backward.

    Y₀ = A/c, Z₀ = I; T = ½(3I − Z Y), Y ← Y T, Z ← T Z; √A ≈ √c·Y, A^{-1/2} ≈ Z/√c. With N =
    ``num_iters`` the forward costs 3N − 3 products (the first step has Z₀ = I, the last updates only
    the output). The backward is reverse-mode differentiation of exactly these steps applied to the
    symmetrised upstream gradient sym(Ḡ) (the symmetric part of autograd through the loop), with every
    Y, Z, T symmetric (they are polynomials in A) so transposes are free, and each adjoint update fused
    into one ``baddbmm``: 6N − 6 products and no other full-size passes besides the normalisation.
    Under ``create_graph=True`` it re-runs the iteration under autograd instead, so that second
    derivatives are exact.

    Saved for backward: A, Y₁…Y_{N−1}, Z₂…Z_{N−1}, T₁…T_N (3N − 2 matrices; 13 for N = 5, as many as the
    published layer keeps). Y₀ = A/c is recomputed (one elementwise pass), and the output is not kept:
    ⟨Ḡ, output⟩, which the normaliser's gradient needs, is read off the last adjoint product.
    """

    @staticmethod
    def forward(a: torch.Tensor, inverse: bool, num_iters: int, norm: str, tf32: bool,
                factor: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        out, c, ys, zs, ts = _ns_iterate(a, inverse, num_iters, norm, keep=True, factor=factor)
        # Z₁ is T₁: return each tensor once (torch.compile rejects an output listed twice).
        return (out, c, *ys[1:], *zs[1:], *ts)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        a, inverse, num_iters, norm, tf32, *factor = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # the intermediates get no gradient: don't fill zeros for them
        ctx.save_for_backward(a, factor[0] if factor else None, *output[1:])
        ctx.inverse, ctx.num_iters, ctx.norm, ctx.tf32 = inverse, num_iters, norm, tf32

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None, *_: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if grad is None:
            return None, None, None, None, None, None
        with products_in_tf32(grad.device, ctx.tf32):
            return _NewtonSchulz._backward(ctx, grad), None, None, None, None, None

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        a, factor, c, *rest = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the iteration again, with autograd, from the saved input,
            # so that a second derivative is exact (the fast path below works on constants).
            with torch.enable_grad():
                root = _ns_iterate(a, ctx.inverse, ctx.num_iters, ctx.norm, keep=False, factor=factor)[0]
                (g_a,) = torch.autograd.grad(root, a, 0.5 * (grad + grad.mT), create_graph=True)
            return g_a
        n_it = ctx.num_iters
        n_z = max(n_it - 2, 0)
        y0 = a / c
        ys, ts = [y0, *rest[:n_it - 1]], rest[n_it - 1 + n_z:]
        zs = [None, ts[0], *rest[n_it - 1:n_it - 1 + n_z]]
        # torch's convention for functions of symmetric matrices (and every other backend's): the
        # gradient is the one w.r.t. symmetric perturbations, symmetric for any upstream gradient. The
        # iteration is a polynomial in A, so symmetrising Ḡ symmetrises the result.
        out_scale = c.rsqrt() if ctx.inverse else c.sqrt()
        g_out = torch.add(grad, grad.mT).mul_((out_scale if factor is None else out_scale * factor) * 0.5)
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
        # The output is out_n·c^(±½), so c̄ = ±½⟨Ḡ, out⟩/c, and ⟨Ḡ, out⟩/c = ⟨T̄_N, T_N⟩/c: out_n = Y T
        # (or T Z) and T̄_N = Y·Ḡ·√c (or Ḡ·Z/√c) with Y, Z symmetric.
        g_c = dot(g_t, ts[-1]) / c * (-0.5 if ctx.inverse else 0.5)
        if n_it > 1:
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
        # Y₀ = A/c: Ā = Ȳ₀/c and c̄ −= ⟨Ȳ₀, Y₀⟩/c; then c̄ reaches A through ∂c/∂A (I or A/c).
        g_c = g_c - dot(g_y, y0) / c
        g_a = g_y.div_(c)
        if ctx.norm == "trace":
            g_a.diagonal(dim1=-2, dim2=-1).add_(g_c.squeeze(-1))
        else:
            g_a.add_(g_c * y0)
        return g_a


def _ns_iterate(
    a: torch.Tensor, inverse: bool, num_iters: int, norm: str, keep: bool, factor: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The iteration; with ``keep`` it also returns Y₀…Y_{N−1}, Z₁…Z_{N−1}, T₁…T_N for the backward.
    Without it intermediates are freed as it goes, so the allocator reuses their memory. ``factor``
    ``(B, 1, 1)`` multiplies the output, folded into the √c (or 1/√c) multiplication."""
    c = normaliser(a, norm)
    eye15 = eye(a, 1.5)
    y = a / c
    # Out of place (no in-place update of a diagonal view): exportable to ONNX and differentiable
    # twice, at the cost of no extra pass.
    t = torch.add(eye15, y, alpha=-0.5)
    ys: list[torch.Tensor] = [y] if keep else []
    zs: list[torch.Tensor] = []  # from Z₁: Z₀ = I is never formed
    ts: list[torch.Tensor] = [t] if keep else []
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
    scale = c.rsqrt() if inverse else c.sqrt()
    if factor is not None:
        scale = scale * factor
    # In place unless the output is an iterate that is kept (one step, inverse root: T₁) or differentiated.
    out = out * scale if (keep and out is t) or torch.is_grad_enabled() else out.mul_(scale)
    return out, c, ys, zs, ts


def _ns(a: torch.Tensor, inverse: bool, num_iters: int, norm: str, tf32: bool,
        scale: torch.Tensor | None = None) -> torch.Tensor:
    """The root of ``scale``²·A (``scale`` ``(B, 1, 1)`` or None): ``scale``^(±1) times that of A."""
    factor = None if scale is None else (scale.reciprocal() if inverse else scale)
    with products_in_tf32(a.device, tf32):
        if torch.is_grad_enabled() and a.requires_grad:
            return _NewtonSchulz.apply(a, inverse, num_iters, norm, tf32, factor)[0]
        return _ns_iterate(a, inverse, num_iters, norm, keep=False, factor=factor)[0]


def _ns_gram(u: torch.Tensor, num_iters: int, norm: str, tf32: bool, scale: torch.Tensor | None = None) -> torch.Tensor:
    """√(U Uᵀ) from the Gram side. The iteration keeps Y_k = (A/c)·Z_k, so its square root is
    √c·(A/c)·Z_N(A/c) = U·Z_N(G/c)·Uᵀ/√c by the push-through identity: the *inverse* root that the same
    iteration gives for G = UᵀU (same trace and Frobenius norm as U Uᵀ), between U and Uᵀ. The same
    polynomial, so the same matrix and, through autograd, the same gradient; the M×M steps keep M×M
    intermediates for the backward. With ``scale`` (U divided by it), the root of the unscaled factor's Σ:
    ``scale`` times the M×M inner matrix."""
    r = _ns(u.mT @ u, True, num_iters, norm, tf32)
    return (u @ (r if scale is None else r * scale)) @ u.mT


def _ns_products(inverse: bool, num_iters: int, norm: str, tf32: bool) -> tuple[int, int]:
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
        "tf32": Option(False, bool_option, "CUDA: the iteration's products in TF32 (within the iteration's own "
                       "error: docs/guides/backends.md, 'TF32 and bf16 products')"),
    },
    doc="coupled Newton–Schulz iteration (Li et al., CVPR 2018); exact (symmetric) gradient of the iteration",
    products=_ns_products,
    gram=_ns_gram,
    gram_below=0.85,  # measured crossover 0.9 (B = 32, d = 128 and 256, fwd+bwd, 2-core CPU)
)
