"""``SoViTHead``: the second-order classification head of So-ViT."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ._checks import check_backend, check_positive_int
from .functional import cov_pool

__all__ = ["SoViTHead"]


class SoViTHead(nn.Module):
    """Vision-transformer head that classifies from the class token *and* the covariance of the word tokens.

    Xie et al., "So-ViT: Mind Visual Tokens for Vision Transformer", 2021: logits are the sum of a linear
    classifier on the class token and one on the square-root-normalised covariance of the (reduced)
    word tokens. Song et al., "Fast Differentiable Matrix Square Root", ICLR 2022, compute that square
    root with MPA-Lya, the default here.

    Covariance branch: word tokens ``(B, N, C)`` → Linear(C, d) → ``norm_layer(d)`` → ``act_layer()``
    → Σ = (1/N) X_c X_cᵀ ``(B, d, d)`` → Σ^{1/2} by ``backend`` → upper triangle ``(B, d(d+1)/2)`` →
    dropout → ``fc_cov``. The default reduction uses LayerNorm and GELU, which normalise each token on its
    own (no batch statistics, so batch size 1 and any token count behave the same in train and eval) and
    match the transformer's own blocks; ``norm_layer`` must act on the last dimension.

    Default ``reduced_dim=64``: 2 080 covariance features, comparable to the embedding widths of small
    ViTs, so neither branch dominates the classifier parameters (d = 256 would give 32 896 features and a
    33 M-parameter ImageNet classifier).

    Args:
        embed_dim: C, the token width.
        num_classes: classes; 0 makes ``fc_cls``/``fc_cov`` identities and the forward returns features.
        reduced_dim: d, or None to use the C token channels as they are.
        backend: square-root backend, a name or ``{"name": ..., **options}``.
        drop_rate: dropout on the covariance vector before ``fc_cov``.
        norm_layer, act_layer: constructors of the reduction's normalisation (called with d) and
            activation (called without arguments).
        device, dtype: factory kwargs of the parameters.

    Attributes:
        cov_dim: d(d+1)/2, the covariance feature width.
        num_features: ``embed_dim + cov_dim``, the pre-logit width (timm's convention).

    Shapes: input ``(B, 1 + N, C)``, class token first, N >= 1 word tokens; output ``(B, num_classes)``,
    or ``(B, num_features)`` = ``[class token, covariance vector]`` with ``num_classes=0`` or
    ``pre_logits=True``.

    Numerical caveats: with N < d tokens the covariance is rank-deficient; ``mpa_lya`` then still returns
    a finite root and gradient. Half-precision tokens are pooled in float32.

    Example::

        >>> import torch
        >>> from covpool.layers import SoViTHead
        >>> head = SoViTHead(32, num_classes=10, reduced_dim=8)
        >>> head(torch.randn(2, 1 + 49, 32)).shape, head.num_features
        (torch.Size([2, 10]), 68)
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        reduced_dim: int | None = 64,
        backend: str | Mapping[str, Any] = "mpa_lya",
        drop_rate: float = 0.0,
        *,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("reduced_dim", reduced_dim, allow_none=True)
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be a number in [0, 1), got {drop_rate!r}")
        check_backend(backend)
        self.embed_dim = embed_dim
        self.reduced_dim = reduced_dim
        self.backend = backend
        dim = embed_dim if reduced_dim is None else reduced_dim
        self.cov_dim = dim * (dim + 1) // 2
        self.num_features = embed_dim + self.cov_dim
        if reduced_dim is None:
            self.reduce: nn.Module = nn.Identity()
        else:
            self.reduce = nn.Sequential(OrderedDict(
                fc=nn.Linear(embed_dim, reduced_dim, device=device, dtype=dtype),
                norm=norm_layer(reduced_dim),
                act=act_layer(),
            ))
            self.reduce.norm.to(device=device, dtype=dtype)
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = 0
        self.fc_cls: nn.Module = nn.Identity()
        self.fc_cov: nn.Module = nn.Identity()
        self.reset_classifier(num_classes, device=device, dtype=dtype)

    def reset_classifier(self, num_classes: int, *, device: Any = None, dtype: torch.dtype | None = None) -> None:
        """Rebuild ``fc_cls`` and ``fc_cov`` for ``num_classes`` (0: identities, the forward returns features).

        The new layers go to the device and dtype of the head's current parameters unless given.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        current = next(self.parameters(), None)
        if current is not None:
            device = current.device if device is None else device
            dtype = current.dtype if dtype is None else dtype
        self.num_classes = num_classes
        if num_classes:
            self.fc_cls = nn.Linear(self.embed_dim, num_classes, device=device, dtype=dtype)
            self.fc_cov = nn.Linear(self.cov_dim, num_classes, device=device, dtype=dtype)
        else:
            self.fc_cls = nn.Identity()
            self.fc_cov = nn.Identity()

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1 + N, C)`` → class token ``(B, C)`` and covariance vector ``(B, cov_dim)`` (after dropout)."""
        if x.dim() != 3 or x.shape[1] < 2 or x.shape[2] != self.embed_dim:
            raise ValueError(f"SoViTHead expects tokens (B, 1 + N, {self.embed_dim}) with a class token and "
                             f"N >= 1 word tokens, got shape {tuple(x.shape)}")
        words = self.reduce(x[:, 1:])
        return x[:, 0], self.head_drop(cov_pool(words.transpose(1, 2), self.backend))

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits ``(B, num_classes)``, or features ``(B, num_features)`` when ``pre_logits`` or
        ``num_classes == 0``."""
        cls_token, cov = self._features(x)
        if pre_logits or not self.num_classes:
            return torch.cat([cls_token, cov], dim=-1)
        return self.fc_cls(cls_token) + self.fc_cov(cov)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, reduced_dim={self.reduced_dim}, "
                f"backend={self.backend!r}, cov_dim={self.cov_dim}")
