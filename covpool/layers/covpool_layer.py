"""``CovPool``: global covariance pooling with matrix square-root normalisation (iSQRT-COV)."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from covpool.linalg import BackendSpec, resolve_backend
from covpool.linalg._checks import check_int

from .functional import as_maps, cov_pool

__all__ = ["CovPool"]


def _reduction(in_channels: int, out_channels: int, factory: dict) -> nn.Sequential:
    """The 1×1 conv → BatchNorm → ReLU channel reduction of iSQRT-COV and both So-ViT heads."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False, **factory),
        bn=nn.BatchNorm2d(out_channels, **factory),
        act=nn.ReLU(inplace=True),
    ))


def _init_reduction(module: nn.Module) -> None:
    """The releases' initialisation of the reductions in ``module``: Kaiming-normal (fan-out) convolutions,
    unit/zero BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()


class CovPool(nn.Module):
    """Global covariance pooling with matrix square-root normalisation, the head of iSQRT-COV.

    Li et al., "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square
    Root Normalization", CVPR 2018. Replaces global average pooling: optional channel reduction
    (1×1 conv → BatchNorm → ReLU to ``reduced_dim``), covariance Σ = (1/N) X_c X_cᵀ over the N
    positions, Σ^{1/2} by ``backend``, and the upper triangle as the feature vector.

    Two input layouts, told apart by ``ndim``:

    - ``(B, C, H, W)`` feature maps: N = H·W positions;
    - ``(B, N, C)`` tokens (e.g. a ViT's patch tokens): N tokens, channels last.

    Tokens go through the same reduction as a ``(B, C, N, 1)`` map, so one set of parameters serves both
    layouts: the 1×1 conv is a Linear on each token and the BatchNorm normalises each reduced channel over
    all B·N tokens (BatchNorm1d over tokens).

    Args:
        in_channels: C of the input.
        reduced_dim: d, the channels after reduction (256 in the paper: 32 896 output features), or None
            to pool the C input channels as they are.
        backend: square-root backend, a name or ``{"name": ..., **options}``; the default ``"ns"`` is the
            paper's Newton–Schulz iteration (5 iterations).
        vectorize: output the upper triangle ``(B, d(d+1)/2)``; False gives the matrix ``(B, d, d)``.
        gram: where the root is computed. With N < d positions (7×7 maps of 256 channels) the covariance
            has rank below N and the same root, and gradient, comes from the N×N Gram matrix for (N/d)³ of
            the products; ``"auto"`` (default) takes that side where it measured cheaper, True or False
            force it (:func:`covpool.linalg.covariance_sqrtm`).
        device, dtype: factory kwargs of the reduction's parameters.

    Attributes:
        dim: d, the side of the covariance matrix.
        out_features: the output width: d(d+1)/2 when vectorising; d (the last dimension of the
            ``(B, d, d)`` matrix) otherwise.

    Numerical caveats: N < d gives a rank-deficient covariance whose square root every backend computes
    finitely, but the gradient of ``eig``/``svd_*`` near zero eigenvalues is large; ``ns`` (trace
    normalised) is the robust default. Half-precision input is pooled in float32 and cast back; integer
    features (``reduced_dim=None``) are promoted to the default float dtype, and so is the output.

    Example::

        >>> import torch
        >>> from covpool.layers import CovPool
        >>> pool = CovPool(32, reduced_dim=8)
        >>> pool(torch.randn(2, 32, 7, 7)).shape
        torch.Size([2, 36])
        >>> pool(torch.randn(2, 49, 32)).shape, pool.out_features
        (torch.Size([2, 36]), 36)
    """

    def __init__(
        self,
        in_channels: int,
        reduced_dim: int | None = 256,
        backend: BackendSpec = "ns",
        vectorize: bool = True,
        *,
        gram: bool | str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("reduced_dim", reduced_dim, allow_none=True)
        entry, _ = resolve_backend(backend)
        entry.uses_gram(1, 1, gram)  # checks the value, and that a forced Gram side exists for the backend
        self.gram = gram
        self.in_channels = in_channels
        self.reduced_dim = reduced_dim
        self.backend = backend
        self.vectorize = bool(vectorize)
        self.dim = in_channels if reduced_dim is None else reduced_dim
        self.out_features = self.dim * (self.dim + 1) // 2 if self.vectorize else self.dim
        if reduced_dim is None:
            self.reduce: nn.Module = nn.Identity()
        else:
            self.reduce = _reduction(in_channels, reduced_dim, {"device": device, "dtype": dtype})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` or ``(B, N, C)`` → ``(B, d(d+1)/2)`` (or ``(B, d, d)``)."""
        maps = as_maps(x, self.in_channels, "CovPool")
        return cov_pool(self.reduce(maps).flatten(2), self.backend, self.vectorize, self.gram)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, reduced_dim={self.reduced_dim}, backend={self.backend!r}, "
                f"vectorize={self.vectorize}, gram={self.gram!r}, out_features={self.out_features}")
