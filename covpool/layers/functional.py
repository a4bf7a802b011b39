"""The maths of the meta-layers as functions: covariance pooling and its element normalisations, the compact
(sketch) bilinear pooling, So-ViT's and SoT's cross-covariances with svPN, DropCov's adaptive channel dropout and
grouped ZCA whitening.

The modules in :mod:`covpool.layers` are thin wrappers that own the parameters and buffers and call these.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from covpool.linalg import (
    BackendSpec,
    covariance,
    covariance_power,
    covariance_sqrtm,
    inv_sqrtm,
    triu_vectorize,
)
from covpool.linalg._checks import check_int, check_number, full_precision, is_int

from ._autograd import SignedSqrt, batch_statistics
from ._options import check_option, check_used, normalization_mode, vectorize_mode

__all__ = ["cov_pool", "second_moment", "signed_sqrt", "l2_normalize", "tensor_sketch", "random_maclaurin",
           "compact_bilinear", "cross_covariance", "svpn", "multi_head_cross_covariance", "adaptive_channel_drop",
           "zca_batch_norm"]


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
        backend: a name from :func:`covpool.list_backends` or a dict ``{"name": ..., **options}``, passed
            untouched to :func:`covpool.linalg.covariance_sqrtm`, which takes the root on the cheaper side
            (``normalization="sqrt"``).
        vectorize: ``"triu"`` (or True) the upper triangle (``(*, d(d+1)/2)``, ``torch.triu_indices``
            order); ``"full"`` the whole matrix row by row (``(*, d²)``, bilinear pooling's); ``"matrix"``
            (or False) the ``(*, d, d)`` matrix.
        gram: compute the matrix function from the N×N Gram matrix instead of the d×d covariance (same value
            and gradient, (N/d)³ of the backend's products): ``"auto"`` where it is cheaper, True, False
            (:func:`covpool.linalg.covariance_sqrtm`).
        centered: the covariance; False the uncentred second moment (1/N)·X Xᵀ (bilinear pooling).
        normalization: ``"sqrt"`` the square root by ``backend``; ``"power"`` Σ^``alpha`` by
            eigendecomposition (:func:`covpool.linalg.matrix_power`, MPN-COV); ``"none"`` (or None).
        alpha: the power of ``normalization="power"``, > 0.
        signed_sqrt: then sign(z)·√|z| per entry z of the vector (:func:`signed_sqrt`).
        l2: then ℓ2 normalisation of the vector (:func:`l2_normalize`), after the signed square root.
        sqrt_smoothing: δ > 0 makes the signed square root's backward ``½/(√|z| + δ)``, z the statistic *summed* over
            the N positions, as the compact bilinear pooling code computes it (Gao et al.: 0.1 in their MatConvNet
            layers, 0.03 in Caffe's, whose Tensor Sketch is also D times larger: 0.03/√D here); covpool averages,
            so it applies δ/√N to the average. 0 (default): the bilinear-CNN package's ``½/√(|z| + 1e-8)``.

    A ``backend`` other than the default without ``normalization="sqrt"``, or an ``alpha`` other than 0.5 without
    ``"power"``, would have no effect: a ValueError, as in :class:`covpool.CovPool` (one rule for both).

    Returns:
        ``(*, features)`` or ``(*, d, d)`` in the dtype of ``x``. float16/bfloat16 input (and autocast
        regions) are pooled in float32, because the covariance of half-precision features loses most
        of its significant digits. Integer or bool features are promoted to
        ``torch.get_default_dtype()``, and so is the result.

    Raises:
        ValueError: ``x`` is not a tensor of shape ``(*, d, N)`` with N >= 1; an unknown ``vectorize`` or
            ``normalization``; ``signed_sqrt`` or ``l2`` with ``vectorize="matrix"``; an option the head never
            reads (above); an unknown backend name, a bad backend option value, ``gram``, ``alpha`` or
            ``sqrt_smoothing`` out of range.
        TypeError: complex features; a backend option the backend does not have.

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
    check_used({"normalization": norm, "signed_sqrt": signed_sqrt, "backend": backend, "alpha": alpha,
                "sqrt_smoothing": sqrt_smoothing})
    smoothing = check_option("sqrt_smoothing", sqrt_smoothing) / math.sqrt(x.shape[-1])
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
    return full_precision(lambda o: _element_norm(o, signed_sqrt, l2, smoothing), out)


def second_moment(x: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """(1/N)·X_c X_cᵀ (the covariance, :func:`covpool.covariance`) or, with ``centered=False``, the
    uncentred (1/N)·X Xᵀ of ``x`` ``(*, d, N)``, in float32 for half-precision input (autocast off) and
    returned in the input dtype (integers promoted to the default dtype)."""
    return full_precision(lambda f: covariance(f, centered=centered), x)


# ----------------------------------------------------------------------------- element normalisation
def signed_sqrt(x: torch.Tensor, eps: float = 1e-8, smoothing: float = 0.0) -> torch.Tensor:
    """Element-wise ``sign(x)·√|x|`` (Perronnin et al.'s power normalisation), as bilinear and compact bilinear
    pooling apply it: the forward is exact, the gradient is bounded at 0: ``½/√(|x| + eps)``, the bilinear-CNN
    package's backward (``eps`` = 1e-8), or with ``smoothing`` > 0 ``½/(√|x| + smoothing)``, the compact
    bilinear code's (0.1 in its MatConvNet layer, 0.03 in Caffe's, on sums over positions: :func:`cov_pool`'s
    ``sqrt_smoothing``).

    Args:
        x: a real tensor of any shape.
        eps: added to ``|x|`` under the square root of the backward (not of the forward); used when ``smoothing``
            is 0.
        smoothing: δ > 0 makes the backward ½/(√|x| + δ) instead; 0 (default) uses ``eps``.

    Returns:
        ``sign(x)·√|x|``, the shape and dtype of ``x``; the backward's bound is computed in float32 at least.

    Example::

        >>> import torch
        >>> from covpool.layers.functional import signed_sqrt
        >>> signed_sqrt(torch.tensor([-4.0, 0.0, 9.0]))
        tensor([-2.,  0.,  3.])
    """
    return SignedSqrt.apply(x, float(eps), float(smoothing))


def _element_norm(out: torch.Tensor, signed: bool, l2: bool, smoothing: float = 0.0) -> torch.Tensor:
    """The element normalisations of the bilinear heads, in their order: signed square root (its backward
    smoothed by ``smoothing``, :func:`signed_sqrt`), then ℓ2."""
    if signed:
        out = signed_sqrt(out, smoothing=smoothing)
    return l2_normalize(out) if l2 else out


def l2_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``x`` / √(‖x‖² + ``eps``) over the last dimension (the bilinear-CNN package's ℓ2 layer): ``x`` ``(*, D)``
    to unit-norm rows of the same shape and dtype; ``eps`` keeps a zero row finite (it stays zero)."""
    return x * (x.square().sum(-1, keepdim=True) + eps).rsqrt()


# ------------------------------------------------------------------------------------ compact sketches
def tensor_sketch(x: torch.Tensor, h1: torch.Tensor, s1: torch.Tensor, h2: torch.Tensor, s2: torch.Tensor,
                  dim: int) -> torch.Tensor:
    """Tensor Sketch of the second moment (Gao et al., "Compact Bilinear Pooling", CVPR 2016; Pham and Pagh,
    KDD 2013): (1/N)·Σ_n FFT⁻¹(FFT(Ψ₁x_n) ⊙ FFT(Ψ₂x_n)) for features ``x`` ``(B, d, N)``, with the count
    sketches Ψ_t(x)_k = Σ_{i: h_t(i) = k} s_t(i)·x_i (``h_t`` ``(d,)`` in [0, dim), ``s_t`` ``(d,)`` in ±1).

    Its entry k is Σ_{(i, j): h₁(i) + h₂(j) ≡ k} s₁(i)s₂(j)·M_ij of M = (1/N) X Xᵀ. The sum over positions is
    taken in the frequency domain (one inverse FFT per image). Returns ``(B, dim)`` in the dtype of ``x``.

    Args:
        x: ``(B, d, N)`` features: d channels at N positions.
        h1: ``(d,)`` integer hashes in [0, ``dim``) of the first count sketch.
        s1: ``(d,)`` signs ±1 of the first count sketch (cast to the dtype of ``x``).
        h2: ``(d,)`` hashes of the second count sketch, drawn independently of ``h1``.
        s2: ``(d,)`` signs of the second count sketch.
        dim: D, the sketch's width.
    """
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
    return ((w1.to(x.dtype).mT @ x) * (w2.to(x.dtype).mT @ x)).mean(-1)


def _tensor_sketch(f: torch.Tensor, projection: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    h1, s1, h2, s2 = projection
    return tensor_sketch(f, h1, s1, h2, s2, dim)


def _random_maclaurin(f: torch.Tensor, projection: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    w1, w2 = projection
    return random_maclaurin(f, w1, w2)


_SKETCHES: dict[str, Callable[[torch.Tensor, Sequence[torch.Tensor], int], torch.Tensor]] = {
    "tensor": _tensor_sketch,
    "maclaurin": _random_maclaurin,
}


def compact_bilinear(x: torch.Tensor, sketch: str, projection: Sequence[torch.Tensor], dim: int, *,
                     centered: bool = True, signed_sqrt: bool = False, l2: bool = False,
                     sqrt_smoothing: float = 0.0) -> torch.Tensor:
    """Compact bilinear pooling (Gao, Beijbom, Zhang, Darrell, CVPR 2016) of features ``x`` ``(B, d, N)``: the
    second moment (centred first with ``centered``) projected to ``dim`` features by ``sketch``, then the
    element normalisations, as :func:`cov_pool`'s.

    Args:
        x: ``(B, d, N)`` features: d channels at N positions.
        sketch: ``"tensor"`` (:func:`tensor_sketch`, ``projection`` = (h₁, s₁, h₂, s₂)) or ``"maclaurin"``
            (:func:`random_maclaurin`, ``projection`` = (W₁, W₂) of shape ``(d, dim)``).
        dim: D, the sketch's width.
        centered: subtract each channel's mean over the positions first (False: the second moment, as the
            published compact bilinear heads).
        signed_sqrt: then sign(z)·√|z| per entry (:func:`signed_sqrt`).
        l2: then ℓ2 normalisation of the vector (:func:`l2_normalize`).
        sqrt_smoothing: δ of the signed square root's backward, on the sum over positions: δ/√N on the average
            (as :func:`cov_pool`'s).

    Returns:
        ``(B, dim)`` in the dtype of ``x``, computed in float32 for half-precision input and autocast regions.

    Raises:
        ValueError: an unknown ``sketch``, or a ``projection`` of the wrong length for it.
    """
    try:
        project = _SKETCHES[sketch]
    except KeyError:
        raise ValueError(f"sketch must be one of {', '.join(map(repr, _SKETCHES))}, got {sketch!r}") from None

    def pool(f: torch.Tensor) -> torch.Tensor:
        if centered:
            f = f - f.mean(-1, keepdim=True)
        return _element_norm(project(f, projection, dim), signed_sqrt, l2, sqrt_smoothing / math.sqrt(f.shape[-1]))

    return full_precision(pool, x)


# ------------------------------------------------------------------------ cross-covariances and svPN
def cross_covariance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-covariance (1/N) X_c Y_cᵀ of ``x`` ``(*, d1, N)`` and ``y`` ``(*, d2, N)``, each centred over its
    N samples: ``(*, d1, d2)``. A ValueError unless both have the same leading dimensions and N >= 1."""
    if x.dim() < 2 or x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1] or x.shape[-1] < 1:
        raise ValueError(f"cross_covariance expects (*, d1, N) and (*, d2, N) with the same * and N >= 1, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    xc = x - x.mean(dim=-1, keepdim=True)
    yc = y - y.mean(dim=-1, keepdim=True)
    return xc @ yc.mT / x.shape[-1]


def svpn(c: torch.Tensor, v0: torch.Tensor, alpha: float = 0.5, iters: int = 1, eps: float = 1e-5) -> torch.Tensor:
    """Singular-value power normalisation of ``c`` ``(*, d1, d2)`` as So-ViT's release computes it.

    The top singular triplet (s, v, u) of ``c`` is estimated by ``iters`` power iterations started from
    ``v0`` ``(d1,)`` (u = normalise(cᵀv), v = normalise(c u), s = vᵀ c u ≥ 0); the top singular value is
    raised to ``alpha`` and the remainder divided by s^(1−alpha) + eps:

        svPN(C) = s^alpha v uᵀ + (C − s v uᵀ) / (s^(1−alpha) + eps).

    Caveats: the gradient of s^alpha grows without bound as s → 0; for the zero matrix (the cross-covariance of
    a single token) it is 0, the derivative of a constant. One power iteration is only an estimate of the top
    singular pair, which is what the published models used.

    Args:
        c: ``(*, d1, d2)`` matrices (a cross-covariance, :func:`cross_covariance`).
        v0: ``(d1,)`` start vector of the power iteration (a learned parameter in So-ViT), shared by the batch.
        alpha: the power of the top singular value, 0.5 in the release.
        iters: power iterations, an integer >= 1.
        eps: added to the divisor s^(1−alpha) of the remainder, 1e-5 in the release.

    Returns:
        ``(*, d1, d2)`` in the dtype of ``c``.

    Raises:
        ValueError: ``c`` is not ``(*, d1, d2)`` with ``v0`` of shape ``(d1,)``, or ``iters`` is not an integer
            >= 1.
    """
    if c.dim() < 2 or v0.shape != c.shape[-2:-1]:
        raise ValueError(f"svpn expects c (*, d1, d2) and v0 (d1,), got {tuple(c.shape)} and {tuple(v0.shape)}")
    check_int("iters", iters)
    v = v0.to(c.dtype).expand(*c.shape[:-1]).unsqueeze(-1)
    u = v
    for _ in range(iters):
        u = F.normalize(c.mT @ v, dim=-2)
        v = F.normalize(c @ u, dim=-2)
    # s = ‖c u‖ ≥ 0; it is 0 for a zero matrix (one token: its centred cross-covariance), where s^alpha has an
    # infinite derivative. Below the smallest normal number the clamp passes no gradient, and the forward is
    # unchanged there (the rank-one term is zero with c).
    s = (v.mT @ c @ u).clamp_min(torch.finfo(c.dtype).tiny)
    rank1 = v @ u.mT
    return s.pow(alpha) * rank1 + (c - s * rank1) / (s.pow(1.0 - alpha) + eps)


def multi_head_cross_covariance(q: torch.Tensor, k: torch.Tensor, v0: torch.Tensor | None = None, *,
                                centering: str = "feature", alpha: float = 0.5, iters: int = 1, eps: float = 1e-5,
                                token_drop: float = 0.0) -> torch.Tensor:
    """SoT's multi-headed cross-covariance (Xie, Zeng, Wang, Zhou, Li, 2021) of queries ``q`` and keys ``k``
    ``(B, h, N, d)``: per head P = Q_cᵀ K_c / N ``(d, d)``, normalised by svPN from ``v0`` ``(d,)`` when it is
    given (SoT iterates from the right, P·v0: :func:`svpn` of Pᵀ, transposed), flattened: ``(B, h·d²)``.

    ``centering``: ``"feature"`` subtracts each channel's mean over the tokens (the cross-covariance);
    ``"scalar"`` one mean over all of a head's tokens and channels (the released code's). ``token_drop`` > 0
    zeroes each (image, head, token)'s query and key rows together with that probability and scales the kept
    ones by 1/(1 − p), drawn as DropCov's ``Dropout2d`` on a ``(B·h, N, ·)`` tensor draws it (one Bernoulli per
    row, in that order; pass 0 outside training).

    Args:
        q: ``(B, h, N, d)`` queries: h heads of N tokens of width d.
        k: ``(B, h, N, d)`` keys.
        v0: ``(d,)`` start vector of svPN's power iteration, shared by the heads; None: no svPN, the plain
            cross-covariances.
        centering: ``"feature"`` or ``"scalar"`` (above).
        alpha: svPN's power of the top singular value (:func:`svpn`).
        iters: svPN's power iterations.
        eps: svPN's divisor guard.
        token_drop: the probability p of dropping a token's rows, in [0, 1); 0 draws nothing.
    """
    if token_drop > 0:
        b, heads, n, _ = q.shape
        mask = F.dropout1d(q.new_ones(b * heads, n, 1), token_drop, training=True)
        mask = rearrange(mask, "(b h) n 1 -> b h n 1", b=b)
        q, k = q * mask, k * mask
    dims = (-2,) if centering == "feature" else (-2, -1)
    q, k = q - q.mean(dims, keepdim=True), k - k.mean(dims, keepdim=True)
    p = q.mT @ k / q.shape[-2]
    out = p if v0 is None else svpn(p.mT, v0, alpha, iters, eps).mT
    return out.flatten(1)


# ------------------------------------------------------------------------------------------ DropCov
def adaptive_channel_drop(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DropCov's adaptive channel dropout of features ``x`` ``(B, d, N)`` in training (Wang et al., NeurIPS
    2022; :class:`covpool.layers.AdaptiveChannelDrop`); ``weight`` ``(1, 1, 3)`` is the channel-weight
    convolution's.

    Channel weights a = softmax over the channels of a 3-tap 1-D convolution of the channels' means,
    x' = x·(1 + a); one drop rate for the batch, p = clamp(1 − (10/log₂ d)·mean_b cos(a_b, r_b), 0, 1), r_b the
    row sums of image b's covariance of x'; whole channels of x' zeroed with probability p, the kept ones scaled
    by 1/(1 − p). p stays a tensor (no host synchronisation), and the row sums are two matrix–vector products
    instead of the d×d covariance."""
    a = torch.softmax(F.conv1d(x.mean(-1).unsqueeze(1), weight, padding=1).squeeze(1), dim=-1)
    x = x * (1 + a).unsqueeze(-1)
    with torch.no_grad():
        xc = x - x.mean(-1, keepdim=True)
        rows = (xc @ xc.sum(1, keepdim=True).mT).squeeze(-1) / x.shape[-1]  # Σ_j Cov(x')_ij
        cosine = F.cosine_similarity(a, rows, dim=-1, eps=1e-8)
        p = (1 - 10 / math.log2(x.shape[-2]) * cosine.mean()).clamp(0.0, 1.0)
        keep = torch.rand(x.shape[:2], device=x.device) >= p
        mask = keep.to(x.dtype) * torch.where(p < 1, 1 / (1 - p), 0.0).to(x.dtype)
    return x * mask.unsqueeze(-1)


# ----------------------------------------------------------------------------------------- ZCA
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
        weight: ``(C,)`` per-channel scale applied after whitening, or None.
        bias: ``(C,)`` per-channel shift applied after the scale, or None.
        training: use (and update) batch statistics.
        momentum: weight of the new batch in the running averages.
        eps: added to the covariance diagonal before the inverse square root.
        group_size: channels per whitening group; must divide C.
        backend: name or dict spec for :func:`covpool.linalg.inv_sqrtm`, passed untouched.
        process_group: a ``torch.distributed`` group to pool the batch statistics over (differentiably),
            or None for this process's batch only.

    Returns:
        ``(B, C, *)`` in the dtype of ``x``; float16/bfloat16 input is whitened in float32.

    Raises:
        ValueError: ``x`` is not ``(B, C, *)``; ``group_size`` does not divide C; ``eps`` < 0; only one of
            ``running_mean`` and ``running_cov``, or either of the wrong shape; batch statistics from a single
            value per channel (a batch of one, without spatial positions); a bad ``backend``.

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
    running = None if running_mean is None or running_cov is None else (running_mean, running_cov)
    if running is None and (running_mean is not None or running_cov is not None):
        raise ValueError("pass both running_mean and running_cov, or neither")
    groups = channels // group_size
    if running is not None and (running[0].shape != (channels,)
                                or running[1].shape != (groups, group_size, group_size)):
        raise ValueError(f"running_mean must be ({channels},) and running_cov ({groups}, {group_size}, {group_size}) "
                         f"for input shape {tuple(x.shape)} and group_size={group_size}, got "
                         f"{tuple(running[0].shape)} and {tuple(running[1].shape)}")

    def whiten(x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        # A group's channels as rows, every batch and spatial position as a column.
        xg = rearrange(x, "b (g m) ... -> g m (b ...)", m=group_size)
        if training or running is None:  # batch statistics, and in training the running ones updated
            if process_group is None and xg.shape[-1] < 2:
                raise ValueError(f"whitening with batch statistics needs more than one value per channel, got "
                                 f"input shape {tuple(x.shape)}; use a larger batch or eval mode")
            mean, cov, count = batch_statistics(xg, process_group)
            if running is not None:
                run_mean, run_cov = running
                with torch.no_grad():
                    unbiased = cov * (count / (count - 1).clamp_min(1))
                    run_mean.lerp_(mean.reshape(channels).to(run_mean.dtype), momentum)
                    run_cov.lerp_(unbiased.to(run_cov.dtype), momentum)
        else:
            mean = running[0].to(dtype).view(groups, group_size, 1)
            cov = running[1].to(dtype)
        eye = torch.eye(group_size, dtype=dtype, device=x.device)
        y = inv_sqrtm(cov + eps * eye, backend) @ (xg - mean)
        if weight is not None:
            y = y * weight.to(dtype).view(groups, group_size, 1)
        if bias is not None:
            y = y + bias.to(dtype).view(groups, group_size, 1)
        return rearrange(y, "g m (b s) -> b (g m) s", b=x.shape[0]).reshape(x.shape)

    return full_precision(whiten, x).contiguous()
