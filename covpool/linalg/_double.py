"""Second derivatives: a backward that is not itself differentiable raises instead of answering wrongly.

A custom ``backward`` runs with grad mode on exactly when autograd records it (``create_graph=True``).
``once_differentiable`` only guards the case where the upstream gradient requires grad; when it does
not but the input does (``grad(sqrtm(w·z).sum(), z, create_graph=True)`` then ``grad(…, w)``), the
gradient comes back as a constant and the second derivative is silently wrong. :func:`guard` attaches a
node that raises when anything is backpropagated through the gradient.
"""
from __future__ import annotations

from typing import Any, NoReturn

import torch

__all__: list[str] = []


class _NoSecondDerivative(torch.autograd.Function):
    @staticmethod
    def forward(grad: torch.Tensor, message: str, *anchors: torch.Tensor) -> torch.Tensor:
        return grad.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx: Any, *_: torch.Tensor | None) -> NoReturn:
        raise RuntimeError(ctx.message)


def guard(grad_input: torch.Tensor, backend: str, *anchors: torch.Tensor | None) -> torch.Tensor:
    """``grad_input`` (computed without a graph), linked to ``anchors`` (the saved input, the upstream
    gradient) through a node that raises if a second derivative is taken through it."""
    live = [t for t in anchors if t is not None and t.requires_grad]
    if not torch.is_grad_enabled() or not live:
        return grad_input
    message = (
        f"covpool backend {backend!r} has no second derivative: its backward is a separate algorithm that is "
        "not differentiated again, so a gradient of this gradient would be wrong. Use backend='ns' (exact "
        "double backward of the iteration) or torch.linalg.matrix_sqrth for higher-order derivatives."
    )
    return _NoSecondDerivative.apply(grad_input, message, *live)
