"""The pieces of :mod:`covpool.layers.functional` chosen for their gradients (internal): the signed square root
with a bounded backward, and a group's batch mean and covariance for ZCA whitening, pooled over the ranks of a
process group by collectives that have an autograd formula."""
from __future__ import annotations

from typing import Any

import torch

from covpool.linalg._checks import full_precision

__all__ = ["SignedSqrt", "batch_statistics"]


class SignedSqrt(torch.autograd.Function):
    """sign(x)·√|x| with a bounded gradient: ½/√(|x| + eps), the bilinear-CNN package's (the exact derivative
    ½/√|x| is infinite at 0, an exactly-zero entry: a dead channel's moment), or with ``smoothing`` > 0
    ½/(√|x| + smoothing), the compact bilinear code's."""

    @staticmethod
    def forward(x: torch.Tensor, eps: float, smoothing: float) -> torch.Tensor:
        return x.sign() * x.abs().sqrt()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.eps, ctx.smoothing = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors

        def bound(magnitude: torch.Tensor) -> torch.Tensor:
            if ctx.smoothing:
                return 0.5 / magnitude.sqrt().add_(ctx.smoothing)
            return magnitude.add(ctx.eps).rsqrt_().mul_(0.5)

        # In float32 at least: eps = 1e-8 vanishes in half precision and the bound with it.
        return grad * full_precision(bound, x.abs(), dtype=grad.dtype), None, None


def _all_reduce_sum(t: torch.Tensor, group: Any) -> torch.Tensor:
    # The functional collective has an autograd formula (its backward all-reduces the gradient), so
    # the statistics stay differentiable across ranks; the in-place dist.all_reduce would cut the graph.
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))


def batch_statistics(xg: torch.Tensor, process_group: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
