"""Building blocks of the product backends (internal): the broadcast identity, the per-matrix normaliser,
Paterson–Stockmeyer polynomial evaluation, and the algebra of matrices ``α·I + U W Uᵀ`` that lets an
iteration on a d×d covariance Σ = U Uᵀ run on its M×M Gram matrix G = Uᵀ U instead.

The Gram side. Every iterate of the product backends is a polynomial (or, for the Padé approximant, a
rational function) of Σ, and for a polynomial p the push-through identity p(Σ)·U = U·p(G) gives

    p(Σ) = p(0)·I + U h(G) Uᵀ,        h(λ) = (p(λ) − p(0)) / λ,

so a d×d iterate is held as its null-space value α = p(0) (a number) and its M×M *inner* matrix W = h(G), and
acts on the range of U through its *outer* M×M matrix P = p(G) = α·I + G W. A product of two such
iterates is again one: (α, W)(β, V) = (αβ, α·V + W·P_V), whose outer matrix is P_W·P_V. Nothing is divided by
G, so the mean direction of a centred covariance (G·1 = 0) and dead channels cost nothing special.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

_onnx_flags: ModuleType | None
try:  # the ONNX exporter's own flag; see onnx_exporting
    from torch.onnx._internal.exporter import _flags as _onnx_flags
except ImportError:  # pragma: no cover - a torch without the dynamo exporter
    _onnx_flags = None

__all__: list[str] = []


def onnx_exporting() -> bool:
    """Whether ``torch.onnx.export`` is capturing the model. ``torch.onnx.is_in_onnx_export()`` says so under
    its first capture strategy (non-strict ``torch.export``), but dynamo folds that call to False, and the
    exporter's fallback strategy (strict ``torch.export``, tried when the first raises) runs under dynamo: there
    the exporter's flag is read directly, so an ONNX-only path (or error) holds under both."""
    return torch.onnx.is_in_onnx_export() or bool(getattr(_onnx_flags, "_is_onnx_exporting", False))


def eye(a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale·I of the matrix size, broadcast over the batch (never materialised per matrix)."""
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).mul_(scale)


def normaliser(a: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-matrix normaliser (B, 1, 1), floored at the smallest normal number so a zero matrix gives 0.

    The Frobenius norm is taken of A / max|a_ij| and scaled back: its squares would overflow float32 for
    entries above ~1e19 and underflow below ~1e-19 (then A/‖A‖ is inf or NaN). The trace needs no care
    below ~1e38 / n. Both are the same for Σ = U Uᵀ and its Gram matrix Uᵀ U (same non-zero spectrum).
    """
    tiny = torch.finfo(a.dtype).tiny
    if kind == "trace":
        c = a.diagonal(dim1=-2, dim2=-1).sum(-1)
    else:
        m = a.abs().amax(dim=(-2, -1)).clamp_min(tiny)
        c = torch.linalg.matrix_norm(a / m[:, None, None]) * m
    return c.clamp_min(tiny)[:, None, None]


def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """⟨X, Y⟩ = Σ_ij x_ij y_ij per matrix, ``(B, 1, 1)``, as a batched 1×n² by n²×1 product: no n×n
    temporary (``(x * y).sum()`` writes one)."""
    b, n, m = x.shape
    return torch.bmm(x.reshape(b, 1, n * m), y.reshape(b, n * m, 1))


def split(degree: int, num_polys: int) -> int:
    """Block size s of Paterson–Stockmeyer evaluation minimising the products for ``num_polys``
    polynomials of ``degree`` that share the powers X², …, X^s."""
    def cost(s: int) -> int:
        return (s - 1) + num_polys * max(0, -(-(degree + 1) // s) - 1)

    return min(range(1, degree + 2), key=cost)


def powers(x: torch.Tensor, s: int) -> list[torch.Tensor]:
    """X, X², …, X^s (``s - 1`` products), the shared powers of :func:`poly`."""
    out = [x]
    for _ in range(s - 1):
        out.append(out[-1] @ x)
    return out


def poly(coeffs: tuple[float, ...], xs: list[torch.Tensor]) -> torch.Tensor:
    """Σ_k c_k X^k by Paterson–Stockmeyer: Horner in X^s over blocks of s coefficients (``xs`` from
    :func:`powers`)."""
    s = len(xs)

    def block(cs: tuple[float, ...]) -> torch.Tensor:
        # c₀·I + c₁·X in one pass with a broadcast identity; no in-place update of a diagonal view,
        # which ONNX export cannot functionalise.
        identity = eye(xs[0], cs[0])
        out = torch.add(identity, xs[0], alpha=cs[1]) if len(cs) > 1 else identity.expand_as(xs[0]).clone()
        for k in range(2, len(cs)):
            out.add_(xs[k - 1], alpha=cs[k])
        return out

    blocks = [coeffs[i:i + s] for i in range(0, len(coeffs), s)]
    out = block(blocks[-1])
    for cs in reversed(blocks[:-1]):
        out = block(cs).baddbmm_(xs[-1], out)
    return out


def outer(alpha: float, inner: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The outer matrix P = α·I + G·W of the Gram-side iterate (α, W) (module docstring)."""
    return torch.baddbmm(eye(g, alpha), g, inner)


def lift(alpha: float, inner: torch.Tensor, u: torch.Tensor, scale: torch.Tensor,
         factor: torch.Tensor | None = None) -> torch.Tensor:
    """The d×d matrix scale·(α·I + U W Uᵀ / scale²) = α·scale·I + U W Uᵀ / scale of a Gram-side iterate,
    from U ``(B, d, M)``: two products (d·M² and d²·M multiply-adds), the second the only one of full size.
    ``factor`` ``(B, 1, 1)`` multiplies the result, applied to W and α (M×M and a number), not to the d×d matrix."""
    if factor is not None:
        inner, scale_i = inner * factor, scale * factor
    else:
        scale_i = scale
    out = ((u @ inner) @ u.mT).div_(scale)
    if alpha:
        out.add_(eye(out) * (alpha * scale_i))
    return out


class _TF32Switch:
    """CUDA's float32 product precision is one setting for the whole process: the outermost of any number of
    nested or concurrent :func:`products_in_tf32` regions switches it to TF32 and the last one out restores
    what it was (a lock and a depth count, so that two threads, e.g. ``nn.DataParallel`` replicas, cannot
    leave it on)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.before = "ieee"

    def enter(self) -> None:
        with self.lock:
            if self.depth == 0:
                self.before = torch.backends.cuda.matmul.fp32_precision
                torch.backends.cuda.matmul.fp32_precision = "tf32"
            self.depth += 1

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                torch.backends.cuda.matmul.fp32_precision = self.before


_TF32 = _TF32Switch()


@contextlib.contextmanager
def products_in_tf32(device: torch.device, enabled: bool) -> Iterator[None]:
    """Run the enclosed float32 matrix products in TF32 on CUDA (operands rounded to a 10-bit mantissa,
    float32 accumulation) when ``enabled``, whatever the global setting, and restore that setting after.
    A no-op elsewhere (CPUs have no TF32 products) and while ``torch.compile`` traces (the compiled graph
    follows the global setting: dynamo cannot trace the switch)."""
    if not enabled or device.type != "cuda" or torch.compiler.is_compiling():
        yield
        return
    _TF32.enter()
    try:
        yield
    finally:
        _TF32.exit()
