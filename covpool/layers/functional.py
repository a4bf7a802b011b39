"""The maths of the meta-layers as functions: covariance pooling and grouped ZCA whitening.

The modules in :mod:`covpool.layers` are thin wrappers that own the parameters and buffers and call
these.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from einops import rearrange

from covpool.linalg import (
    BackendSpec,
    covariance,
    covariance_power,
    covariance_sqrtm,
    inv_sqrtm,
    triu_vectorize,
)
from covpool.linalg._checks import check_number, is_int, work_dtype

__all__ = ["cov_pool", "second_moment", "signed_sqrt", "l2_normalize", "tensor_sketch", "random_maclaurin",
           "zca_batch_norm"]


LAYOUTS = ("auto", "maps", "tokens")


def check_layout(layout: Any, allowed: tuple[str, ...] = LAYOUTS) -> None:
    """The ``layout`` option of the pooling layers: one of ``allowed``, else a ValueError listing them."""
    if layout not in allowed:
        raise ValueError(f"layout must be one of {', '.join(map(repr, allowed))}, got {layout!r}")


def as_maps(x: torch.Tensor, channels: int, name: str, layout: str = "auto") -> torch.Tensor:
    """Feature maps ``(B, C, H, W)`` as they are, tokens ``(B, N, C)`` as ``(B, C, N, 1)`` maps (internal:
    what the pooling layers accept). ``layout`` ``"auto"`` tells them apart by ``ndim``, and refuses a 3-D
    ``(B, C, C)`` input, which could be tokens or channels-first features; ``"maps"`` / ``"tokens"`` accept
    only that layout. Anything else, and input without a position, is an error naming the layer ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a tensor, got {type(x).__name__}")
    maps = x.dim() == 4 and x.shape[1] == channels and layout in ("auto", "maps")
    tokens = x.dim() == 3 and x.shape[2] == channels and layout in ("auto", "tokens")
    if tokens and layout == "auto" and x.shape[1] == channels:
        raise ValueError(f"{name}: input of shape {tuple(x.shape)} is ambiguous: tokens (B, N, {channels}) or "
                         f"channels-first features (B, {channels}, N)? Build the layer with layout='tokens' "
                         f"for tokens, or pass channels-first features as maps x.unsqueeze(-1)")
    if not (maps or tokens):
        expected = {"auto": f"feature maps (B, {channels}, H, W) or tokens (B, N, {channels})",
                    "maps": f"feature maps (B, {channels}, H, W) (layout='maps')",
                    "tokens": f"tokens (B, N, {channels}) (layout='tokens')"}[layout]
        raise ValueError(f"{name} expects {expected}, got shape {tuple(x.shape)}")
    if x.shape[2:].numel() == 0 if maps else x.shape[1] == 0:
        raise ValueError(f"{name} needs at least one position to pool, got shape {tuple(x.shape)} (an empty "
                         f"{'feature map' if maps else 'token sequence'})")
    return x if maps else rearrange(x, "b n c -> b c n 1")


NORMALIZATIONS = ("sqrt", "power", "none")
VECTORIZE = ("triu", "full", "matrix")


def vectorize_mode(vectorize: Any) -> str:
    """``vectorize`` as one of :data:`VECTORIZE`: True is ``"triu"`` and False ``"matrix"`` (covpool ≤ 0.1)."""
    mode = {True: "triu", False: "matrix"}.get(vectorize, vectorize) if isinstance(vectorize, bool) else vectorize
    if mode not in VECTORIZE:
        raise ValueError(f"vectorize must be one of {', '.join(map(repr, VECTORIZE))} (or True/False), "
                         f"got {vectorize!r}")
    return mode


def normalization_mode(normalization: Any) -> str:
    mode = "none" if normalization is None else normalization
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(map(repr, NORMALIZATIONS))} (None is 'none'), "
                         f"got {normalization!r}")
    return mode


# The options that only some heads read, the value that means "not given", and when a head reads them.
_CONDITIONAL_OPTIONS = {
    "backend": ("ns", lambda norm, sketch, signed: norm == "sqrt" and sketch is None),
    "alpha": (0.5, lambda norm, sketch, signed: norm == "power" and sketch is None),
    "sketch_dim": (8192, lambda norm, sketch, signed: sketch is not None),
    "sketch_seed": (0, lambda norm, sketch, signed: sketch is not None),
    "sqrt_smoothing": (0.0, lambda norm, sketch, signed: signed),
}


def check_used(normalization: str, sketch: str | None, signed_sqrt: bool = False, **options: Any) -> None:
    """The one rule of :class:`covpool.CovPool` and :func:`cov_pool`: an option given a value other than its
    default that the chosen head never reads (``backend`` without ``normalization="sqrt"``, ``alpha`` without
    ``"power"``, ``sketch_dim`` / ``sketch_seed`` without a sketch, ``sqrt_smoothing`` without ``signed_sqrt``)
    is a mistake to report, not to ignore."""
    unused = [f"{name}={value!r}" for name, value in options.items()
              if value != _CONDITIONAL_OPTIONS[name][0]
              and not _CONDITIONAL_OPTIONS[name][1](normalization, sketch, signed_sqrt)]
    if unused:
        raise ValueError(f"{', '.join(unused)} would have no effect: backend needs normalization='sqrt', alpha "
                         f"normalization='power', sketch_dim and sketch_seed a sketch, sqrt_smoothing signed_sqrt "
                         f"(this head: normalization={normalization!r}, sketch={sketch!r}, "
                         f"signed_sqrt={signed_sqrt!r})")


def element_norm(out: torch.Tensor, signed: bool, l2: bool, smoothing: float = 0.0) -> torch.Tensor:
    """The element normalisations of the bilinear heads, in their order: signed square root (its backward
    smoothed by ``smoothing``, :func:`signed_sqrt`), then ℓ2."""
    if signed:
        out = signed_sqrt(out, smoothing=smoothing)
    return l2_normalize(out) if l2 else out


def check_smoothing(sqrt_smoothing: Any) -> float:
    return check_number("sqrt_smoothing", sqrt_smoothing, 0.0,
                        note="added to √|z| in the signed square root's backward, z summed over the positions")


def cov_pool(
    x: torch.Tensor,
    backend: BackendSpec = "ns",
    vectorize: bool | str = True,
    gram: bool | str = "auto",
    *,
    centered: bool = True,
    normalization: str | None = "sqrt",
    alpha: float = 0.5,
    signed_sqrt: bool = False,
    l2: bool = False,
    sqrt_smoothing: float = 0.0,
) -> torch.Tensor:
    """Global second-order pooling: covariance (or second moment), matrix normalisation, vectorisation and
    element normalisation; the defaults are iSQRT-COV.

    Li et al., "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square
    Root Normalization", CVPR 2018: Σ = (1/N) X_c X_cᵀ over the N positions, then Σ^{1/2} by
    ``backend`` (``"ns"`` is their coupled Newton–Schulz iteration with trace pre-normalisation and
    post-compensation), then the upper triangle as the image representation. The other options give the
    rest of the family (:func:`covpool.list_heads`).

    Args:
        x: ``(*, d, N)`` features: d channels at N positions (pixels or tokens). N < d is fine (the
            covariance is then rank-deficient; every backend returns a finite square root).
        backend: a name from :func:`covpool.list_backends` or a dict ``{"name": ..., **options}``,
            passed to :func:`covpool.linalg.sqrtm` untouched (``normalization="sqrt"``).
        vectorize: ``"triu"`` (or True) the upper triangle (``(*, d(d+1)/2)``, ``torch.triu_indices``
            order); ``"full"`` the whole matrix row by row (``(*, d²)``, bilinear pooling's); ``"matrix"``
            (or False) the ``(*, d, d)`` matrix.
        gram: compute the matrix function from the N×N Gram matrix instead of the d×d covariance (same value
            and gradient, (N/d)³ of the backend's products): ``"auto"`` where it is cheaper, True, False
            (:func:`covpool.linalg.covariance_sqrtm`).
        centered: the covariance; False the uncentred second moment (1/N)·X Xᵀ (bilinear pooling).
        normalization: ``"sqrt"`` the square root by ``backend``; ``"power"`` Σ^``alpha`` by
            eigendecomposition (:func:`covpool.linalg.matrix_power`, MPN-COV); ``"none"`` (or None).
        alpha: the power of ``normalization="power"``.
        signed_sqrt, l2: then sign(x)·√|x| per entry (:func:`signed_sqrt`) and ℓ2 normalisation of the vector.
        sqrt_smoothing: δ > 0 makes the signed square root's backward ``½/(√|z| + δ)``, z the statistic *summed* over
            the N positions, as the compact bilinear pooling code computes it (Gao et al.: 0.1 in their MatConvNet
            layers, 0.03 in Caffe's, whose Tensor Sketch is also D times larger: 0.03/√D here); covpool averages,
            so it applies δ/√N to the average. 0 (default): the bilinear-CNN package's ``½/√(|z| + 1e-8)``.

    A ``backend`` other than the default without ``normalization="sqrt"``, or an ``alpha`` other than 0.5 without
    ``"power"``, would have no effect: a ValueError, as in :class:`covpool.CovPool` (one rule, ``check_used``).

    Returns:
        ``(*, features)`` or ``(*, d, d)`` in the dtype of ``x``. float16/bfloat16 input (and autocast
        regions) are pooled in float32, because the covariance of half-precision features loses most
        of its significant digits. Integer or bool features are promoted to
        ``torch.get_default_dtype()``, and so is the result.

    Example::

        >>> import torch
        >>> from covpool.layers import cov_pool
        >>> cov_pool(torch.randn(2, 8, 49)).shape
        torch.Size([2, 36])
        >>> cov_pool(torch.randn(2, 8, 49), centered=False, normalization="none", vectorize="full",
        ...          signed_sqrt=True, l2=True).shape     # bilinear CNN
        torch.Size([2, 64])
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"cov_pool expects features of shape (*, d, N) with N >= 1, got {shape}")
    if x.is_complex():
        raise TypeError(f"cov_pool expects real features, got dtype {x.dtype}")
    mode, norm = vectorize_mode(vectorize), normalization_mode(normalization)
    check_used(norm, None, signed_sqrt, backend=backend, alpha=alpha, sqrt_smoothing=sqrt_smoothing)
    smoothing = check_smoothing(sqrt_smoothing) / math.sqrt(x.shape[-1])
    if mode == "matrix" and (signed_sqrt or l2):
        raise ValueError("signed_sqrt and l2 normalise a vector: use vectorize='triu' or 'full'")
    # Integer features are promoted, not truncated back: the pooled covariance root is not an integer.
    if norm == "sqrt":
        stat = covariance_sqrtm(x, backend, centered=centered, gram=gram)
    elif norm == "power":
        stat = covariance_power(x, alpha, centered=centered, gram=gram)
    else:
        stat = second_moment(x, centered)
    if mode == "matrix":
        return stat
    out = triu_vectorize(stat) if mode == "triu" else stat.flatten(-2)
    if not (signed_sqrt or l2):
        return out
    with torch.autocast(device_type=x.device.type, enabled=False):
        return element_norm(out.to(work_dtype(out.dtype)), signed_sqrt, l2, smoothing).to(out.dtype)


def second_moment(x: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """(1/N)·X_c X_cᵀ (the covariance, :func:`covpool.covariance`) or, with ``centered=False``, the
    uncentred (1/N)·X Xᵀ of ``x`` ``(*, d, N)``, in float32 for half-precision input (autocast off) and
    returned in the input dtype (integers promoted to the default dtype)."""
    out_dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    with torch.autocast(device_type=x.device.type, enabled=False):
        stat = covariance(x.to(work_dtype(out_dtype)), centered=centered)
    return stat.to(out_dtype)


# ----------------------------------------------------------------------------- element normalisation
class _SignedSqrt(torch.autograd.Function):
    """sign(x)·√|x| with a bounded gradient: ½/√(|x| + eps), the bilinear-CNN package's (the exact derivative
    ½/√|x| is infinite at 0, an exactly-zero entry: a dead channel's moment), or with ``smoothing`` > 0
    ½/(√|x| + smoothing), the compact bilinear code's."""

    @staticmethod
    def forward(x: torch.Tensor, eps: float, smoothing: float) -> torch.Tensor:
        return x.sign() * x.abs().sqrt()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.eps, ctx.smoothing = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # In float32 at least: eps = 1e-8 vanishes in half precision and the bound with it.
        magnitude = x.abs().to(work_dtype(x.dtype))
        if ctx.smoothing:
            bound = 0.5 / magnitude.sqrt_().add_(ctx.smoothing)
        else:
            bound = magnitude.add_(ctx.eps).rsqrt_().mul_(0.5)
        return grad * bound.to(grad.dtype), None, None


def signed_sqrt(x: torch.Tensor, eps: float = 1e-8, smoothing: float = 0.0) -> torch.Tensor:
    """Element-wise ``sign(x)·√|x|`` (Perronnin et al.'s power normalisation), as bilinear and compact bilinear
    pooling apply it: the forward is exact, the gradient is bounded at 0: ``½/√(|x| + eps)``, the bilinear-CNN
    package's backward (``eps`` = 1e-8), or with ``smoothing`` > 0 ``½/(√|x| + smoothing)``, the compact
    bilinear code's (0.1 in its MatConvNet layer, 0.03 in Caffe's, on sums over positions: :func:`cov_pool`'s
    ``sqrt_smoothing``)."""
    return _SignedSqrt.apply(x, float(eps), float(smoothing))


def l2_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """x / √(‖x‖² + ``eps``) over the last dimension (the bilinear-CNN package's ℓ2 layer)."""
    return x * (x.square().sum(-1, keepdim=True) + eps).rsqrt()


# ------------------------------------------------------------------------------------ compact sketches
def tensor_sketch(x: torch.Tensor, h1: torch.Tensor, s1: torch.Tensor, h2: torch.Tensor, s2: torch.Tensor,
                  dim: int) -> torch.Tensor:
    """Tensor Sketch of the second moment (Gao et al., "Compact Bilinear Pooling", CVPR 2016; Pham and Pagh,
    KDD 2013): (1/N)·Σ_n FFT⁻¹(FFT(Ψ₁x_n) ⊙ FFT(Ψ₂x_n)) for features ``x`` ``(B, d, N)``, with the count
    sketches Ψ_t(x)_k = Σ_{i: h_t(i) = k} s_t(i)·x_i (``h_t`` ``(d,)`` in [0, dim), ``s_t`` ``(d,)`` in ±1).

    Its entry k is Σ_{(i, j): h₁(i) + h₂(j) ≡ k} s₁(i)s₂(j)·M_ij of M = (1/N) X Xᵀ. The sum over positions is
    taken in the frequency domain (one inverse FFT per image). Returns ``(B, dim)``."""
    b, _, n = x.shape
    positions = x.mT  # (B, N, d): each position's sketch contiguous, which the FFT runs 1.5× faster on

    def spectrum(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        sketch = positions.new_zeros(b, n, dim).index_add_(2, h, positions * s.to(x.dtype))
        return torch.fft.rfft(sketch, dim=-1)

    return torch.fft.irfft((spectrum(h1, s1) * spectrum(h2, s2)).mean(1), n=dim, dim=-1)


def random_maclaurin(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Random Maclaurin projection of the second moment (Gao et al., CVPR 2016; Kar and Karnick, AISTATS
    2012): z_k = (1/N)·Σ_n (w1_kᵀ x_n)(w2_kᵀ x_n) = w1_kᵀ M w2_k, for features ``x`` ``(B, d, N)`` and
    projections ``w1``, ``w2`` ``(d, D)``. Returns ``(B, D)``."""
    return ((w1.mT @ x) * (w2.mT @ x)).mean(-1)




# ----------------------------------------------------------------------------------------- ZCA
def _all_reduce_sum(t: torch.Tensor, group: Any) -> torch.Tensor:
    # The functional collective has an autograd formula (its backward all-reduces the gradient), so
    # the statistics stay differentiable across ranks; the in-place dist.all_reduce would cut the graph.
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))


def _batch_statistics(xg: torch.Tensor, process_group: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean ``(G, m, 1)``, biased covariance ``(G, m, m)`` and sample count of grouped features
    ``(G, m, M)``, pooled over the ranks of ``process_group`` when it is given.

    Across ranks: one all-reduce of [Σx, count] gives the global mean, a second of the scatter
    Σ(x − μ)(x − μ)ᵀ around that global mean gives the covariance. Two collectives rather than one of
    [Σx, Σxxᵀ, count], because Σxxᵀ/M − μμᵀ cancels catastrophically when |μ| ≫ σ.
    """
    count = xg.shape[-1]
    if process_group is None:
        mean = xg.mean(dim=-1, keepdim=True)
        xc = xg - mean
        return mean, xc @ xc.mT / count, torch.tensor(float(count), dtype=xg.dtype, device=xg.device)
    local = torch.cat([xg.sum(dim=-1).flatten(), xg.new_full((1,), float(count))])
    total = _all_reduce_sum(local, process_group)
    n = total[-1]
    mean = (total[:-1] / n).view(xg.shape[:-1] + (1,))
    xc = xg - mean
    return mean, _all_reduce_sum(xc @ xc.mT, process_group) / n, n


def zca_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_cov: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    group_size: int = 16,
    backend: BackendSpec = "eig",
    process_group: Any = None,
) -> torch.Tensor:
    """Grouped ZCA whitening batch normalisation, the functional form of :class:`ZCABatchNorm2d`.

    Decorrelated Batch Normalization (Huang et al., CVPR 2018): the C channels are split into
    G = C / ``group_size`` contiguous groups; each group's features over the M = B·(spatial) samples
    are centred and whitened, x̂ = (Σ + eps·I)^{-1/2} (x − μ), then scaled and shifted per channel.
    The inverse square root comes from ``backend`` (Song et al., "Fast Differentiable Matrix Square
    Root", ICLR 2022, whiten with MPA-Lya).

    Mirrors :func:`torch.nn.functional.batch_norm`: batch statistics are used when ``training`` is
    true or no running statistics are given; otherwise the running ones. In training with running
    statistics, they are updated in place, detached:
    ``running = (1 − momentum)·running + momentum·batch``, the covariance unbiased (M/(M − 1)).

    Args:
        x: ``(B, C, *)``, channels second (``(B, C)``, ``(B, C, L)``, ``(B, C, H, W)``, ...).
        running_mean: ``(C,)`` or None.
        running_cov: ``(G, group_size, group_size)`` or None (the covariance, not the whitening
            matrix: see :class:`ZCABatchNorm2d` for why).
        weight, bias: ``(C,)`` per-channel affine parameters, or None.
        training: use (and update) batch statistics.
        momentum: weight of the new batch in the running averages.
        eps: added to the covariance diagonal before the inverse square root.
        group_size: channels per whitening group; must divide C.
        backend: name or dict spec for :func:`covpool.linalg.inv_sqrtm`, passed untouched.
        process_group: a ``torch.distributed`` group to pool the batch statistics over (differentiably),
            or None for this process's batch only.

    Returns:
        ``(B, C, *)`` in the dtype of ``x``; float16/bfloat16 input is whitened in float32.

    Example::

        >>> import torch
        >>> from covpool.layers import zca_batch_norm
        >>> y = zca_batch_norm(torch.randn(64, 8, dtype=torch.float64), group_size=4, training=True)
        >>> cov = y.T @ y / 64
        >>> torch.allclose(cov[:4, :4], torch.eye(4, dtype=torch.float64), atol=1e-3)
        True
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"zca_batch_norm expects input of shape (B, C, *), got {shape}")
    channels = x.shape[1]
    if not is_int(group_size) or group_size < 1 or channels % group_size:
        raise ValueError(f"group_size must be a positive divisor of the {channels} channels of input shape "
                         f"{tuple(x.shape)}, got {group_size!r}")
    check_number("eps", eps, 0.0, note="added to the covariance diagonal")
    if (running_mean is None) != (running_cov is None):
        raise ValueError("pass both running_mean and running_cov, or neither")
    groups = channels // group_size
    if running_mean is not None and (running_mean.shape != (channels,)
                                     or running_cov.shape != (groups, group_size, group_size)):
        raise ValueError(f"running_mean must be ({channels},) and running_cov ({groups}, {group_size}, {group_size}) "
                         f"for input shape {tuple(x.shape)} and group_size={group_size}, got "
                         f"{tuple(running_mean.shape)} and {tuple(running_cov.shape)}")
    use_batch = training or running_mean is None
    dtype = work_dtype(x.dtype)

    with torch.autocast(device_type=x.device.type, enabled=False):
        # A group's channels as rows, every batch and spatial position as a column.
        xg = rearrange(x.to(dtype), "b (g m) ... -> g m (b ...)", m=group_size)
        if use_batch:
            if process_group is None and xg.shape[-1] < 2:
                raise ValueError(f"whitening with batch statistics needs more than one value per channel, got "
                                 f"input shape {tuple(x.shape)}; use a larger batch or eval mode")
            mean, cov, count = _batch_statistics(xg, process_group)
            if training and running_mean is not None:
                with torch.no_grad():
                    unbiased = cov * (count / (count - 1).clamp_min(1))
                    running_mean.lerp_(mean.reshape(channels).to(running_mean.dtype), momentum)
                    running_cov.lerp_(unbiased.to(running_cov.dtype), momentum)
        else:
            mean = running_mean.to(dtype).view(groups, group_size, 1)
            cov = running_cov.to(dtype)
        eye = torch.eye(group_size, dtype=dtype, device=x.device)
        y = inv_sqrtm(cov + eps * eye, backend) @ (xg - mean)
        if weight is not None:
            y = y * weight.to(dtype).view(groups, group_size, 1)
        if bias is not None:
            y = y + bias.to(dtype).view(groups, group_size, 1)
        out = rearrange(y, "g m (b s) -> b (g m) s", b=x.shape[0]).reshape(x.shape)
    return out.to(x.dtype).contiguous()
