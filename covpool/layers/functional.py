"""The maths of the meta-layers as functions: covariance pooling and grouped ZCA whitening.

The modules in :mod:`covpool.layers` are thin wrappers that own the parameters and buffers and call
these.
"""
from __future__ import annotations

from typing import Any

import torch
from einops import rearrange

from covpool.linalg import BackendSpec, covariance_sqrtm, inv_sqrtm, triu_vectorize
from covpool.linalg._checks import check_number, is_int, work_dtype

__all__ = ["cov_pool", "zca_batch_norm"]


def as_maps(x: torch.Tensor, channels: int, name: str) -> torch.Tensor:
    """Feature maps ``(B, C, H, W)`` as they are, tokens ``(B, N, C)`` as ``(B, C, N, 1)`` maps (internal:
    what the pooling layers accept); anything else is an error naming the layer ``name``."""
    if x.dim() == 4 and x.shape[1] == channels:
        return x
    if x.dim() == 3 and x.shape[2] == channels:
        return rearrange(x, "b n c -> b c n 1")
    raise ValueError(f"{name} expects feature maps (B, {channels}, H, W) or tokens (B, N, {channels}), "
                     f"got shape {tuple(x.shape)}")


def cov_pool(
    x: torch.Tensor, backend: BackendSpec = "ns", vectorize: bool = True, gram: bool | str = "auto"
) -> torch.Tensor:
    """Global covariance pooling with matrix square-root normalisation (iSQRT-COV).

    Li et al., "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square
    Root Normalization", CVPR 2018: Σ = (1/N) X_c X_cᵀ over the N positions, then Σ^{1/2} by
    ``backend`` (``"ns"`` is their coupled Newton–Schulz iteration with trace pre-normalisation and
    post-compensation), then the upper triangle as the image representation.

    Args:
        x: ``(*, d, N)`` features: d channels at N positions (pixels or tokens). N < d is fine (the
            covariance is then rank-deficient; every backend returns a finite square root).
        backend: a name from :func:`covpool.list_backends` or a dict ``{"name": ..., **options}``,
            passed to :func:`covpool.linalg.sqrtm` untouched.
        vectorize: return the upper triangle (``(*, d(d+1)/2)``, ``torch.triu_indices`` order) rather
            than the ``(*, d, d)`` matrix.
        gram: compute the root from the N×N Gram matrix instead of the d×d covariance (same value and
            gradient, (N/d)³ of the backend's products): ``"auto"`` where it is cheaper, True, False
            (:func:`covpool.linalg.covariance_sqrtm`).

    Returns:
        ``(*, d(d+1)/2)`` or ``(*, d, d)`` in the dtype of ``x``. float16/bfloat16 input (and autocast
        regions) are pooled in float32, because the covariance of half-precision features loses most
        of its significant digits. Integer or bool features are promoted to
        ``torch.get_default_dtype()``, and so is the result.

    Example::

        >>> import torch
        >>> from covpool.layers import cov_pool
        >>> cov_pool(torch.randn(2, 8, 49)).shape
        torch.Size([2, 36])
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"cov_pool expects features of shape (*, d, N) with N >= 1, got {shape}")
    if x.is_complex():
        raise TypeError(f"cov_pool expects real features, got dtype {x.dtype}")
    # Integer features are promoted, not truncated back: the pooled covariance root is not an integer.
    root = covariance_sqrtm(x, backend, gram=gram)
    return triu_vectorize(root) if vectorize else root


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
