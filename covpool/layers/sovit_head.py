"""``SoViTHead``: the second-order classification head of So-ViT, in its two published forms.

- ``kind="svpn"``: the head of the So-ViT release (Xie et al., arXiv:2104.10935, github.com/jiangtaoxie/So-ViT,
  April 2021): cross-covariance of two reduced token branches, normalised by singular-value power
  normalisation (svPN, :func:`svpn`), the full matrix as features (:class:`SvPNCrossCov`).
- ``kind="mpa"``: the head of "Fast Differentiable Matrix Square Root" (Song et al., ICLR 2022,
  github.com/KingJamesSong/FastDifferentiableMatSqrt, folder So-ViT): covariance of one reduced branch, its
  matrix square root (MPA-Lya by default, any covpool backend) and the upper triangle: that is
  :class:`covpool.CovPool` on tokens.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from covpool.linalg import BackendSpec
from covpool.linalg._checks import check_int, check_number, work_dtype

from .covpool_layer import CovPool, _init_reduction, _reduction
from .functional import as_maps, check_layout

__all__ = ["SoViTHead", "SvPNCrossCov", "MultiHeadCrossCov", "cross_covariance", "svpn"]

_KINDS = ("svpn", "mpa", "sot")
_CENTERINGS = ("feature", "scalar")
# The released SoT centres a head's queries and keys by one mean over its tokens and channels: the `sot` preset
# and SoViTHead(kind="sot") use it by default, so that they compute SoT; "feature" is the cross-covariance.
SOT_CENTERING = "scalar"
_TOKEN_NORMALIZATIONS = ("svpn", "none")


def cross_covariance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-covariance (1/N) X_c Y_cᵀ of ``x`` ``(*, d1, N)`` and ``y`` ``(*, d2, N)``, each centred over its
    N samples: ``(*, d1, d2)``."""
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

    Returns ``(*, d1, d2)``. Caveats: the gradient of s^alpha grows without bound as s → 0; for the zero
    matrix (the cross-covariance of a single token) it is 0, the derivative of a constant. One power
    iteration is only an estimate of the top singular pair, which is what the published models used.
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


def _init_classifier(fc: nn.Module) -> None:
    # Both releases: trunc-normal (std 0.02) weights, zero biases.
    if isinstance(fc, nn.Linear):
        nn.init.trunc_normal_(fc.weight, std=0.02, a=-2.0, b=2.0)
        nn.init.zeros_(fc.bias)


class SvPNCrossCov(nn.Module):
    """So-ViT's cross-covariance pooling with svPN normalisation (the release's ``Covariance(cov_type='cross')``
    followed by ``svPN``).

    Two branches 1×1 conv → BatchNorm → ReLU reduce the C channels to d1 and d2; the cross-covariance
    ``(d1, d2)`` of the two (means removed over the N positions) is normalised by :func:`svpn` with a learned
    power-iteration start vector ``v0`` ``(d1,)``, and flattened row-major: ``d1·d2`` features.

    Args:
        in_channels: C.
        dims: (d1, d2), (48, 24) for So-ViT-7/10, (64, 48) for So-ViT-14, (96, 48) for So-ViT-19.
        alpha, iters, eps: svPN's exponent, power iterations and denominator guard (0.5, 1, 1e-5 released).
        layout: ``"auto"``, ``"maps"`` or ``"tokens"``, as :class:`covpool.CovPool`'s.
        device, dtype: factory kwargs.

    Shapes: ``(B, C, H, W)`` or tokens ``(B, N, C)`` → ``(B, d1·d2)``. The BatchNorms normalise over all
    B·N positions. Half-precision input is pooled in float32 and cast back.
    """

    def __init__(self, in_channels: int, dims: tuple[int, int] = (64, 48), alpha: float = 0.5, iters: int = 1,
                 eps: float = 1e-5, *, layout: str = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        if not isinstance(dims, (tuple, list)) or len(dims) != 2:
            raise ValueError(f"dims must be a pair (d1, d2) of branch widths, got {dims!r}")
        for d in dims:
            check_int("dims[i]", d)
        check_int("iters", iters)
        check_layout(layout)
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.dims = tuple(dims)
        self.alpha, self.iters, self.eps = float(alpha), iters, float(eps)
        self.layout = layout
        self.out_features = dims[0] * dims[1]
        self.reduce = nn.ModuleList([_reduction(in_channels, d, factory) for d in dims])
        self.v0 = nn.Parameter(torch.empty(dims[0], **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's initialisation: Kaiming-normal (fan-out) convolutions, unit/zero BatchNorm,
        standard-normal start vector."""
        _init_reduction(self.reduce)
        nn.init.normal_(self.v0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = as_maps(x, self.in_channels, "SvPNCrossCov", self.layout)
        a, b = (branch(maps).flatten(2) for branch in self.reduce)
        dtype = work_dtype(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            c = cross_covariance(a.to(dtype), b.to(dtype))
            out = svpn(c, self.v0, self.alpha, self.iters, self.eps)
        return out.flatten(-2).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, dims={self.dims}, alpha={self.alpha}, iters={self.iters}, eps={self.eps}"


class MultiHeadCrossCov(nn.Module):
    """SoT's multi-headed global cross-covariance pooling of transformer tokens (Xie, Zeng, Wang, Zhou, Li,
    "SoT: Delving Deeper into Classification Head for Transformer", 2021; jiangtaoxie/SoT,
    ``MultiHeadPooling``).

    The tokens ``(B, N, C)`` are projected without bias to 2·h·d_r channels (``proj``, their ``wr``) and split
    into h heads of a query and a key ``(N, d_r)``; each head's cross-covariance P = Q_cᵀ K_c / N is
    normalised by svPN with a learned start vector ``v0`` ``(d_r,)`` shared by the heads (their
    ``norm.weight``; SoT iterates from the right, P·v0, which is :func:`svpn` of Pᵀ, transposed), and the
    h matrices are flattened row-major: h·d_r² features.

    The transformers of DropCov (Wang, Gao, Zhang, Xie, Li, Hu, NeurIPS 2022; mingzeG/DropCov,
    ``Transformers/src``) use this pooling with ``normalization="none"`` and ``token_drop=0.2``: no svPN, and
    in training a token's query and key rows of one head are zeroed together.

    Args:
        in_channels: C, the token width.
        reduced_dim: (h, d_r): 6 heads of 14, 24 and 38 in SoT-Tiny, -Small and -Base.
        alpha, iters, eps: svPN's exponent, power iterations and denominator guard (0.5, 1, 1e-5 released).
        centering: ``"feature"`` (default) subtracts each channel's mean over the tokens, the
            cross-covariance; ``"scalar"`` subtracts one mean over all of a head's tokens and channels, which
            is what the released code computes (``adaptive_avg_pool2d`` on a 3-D tensor), and what the ``sot``
            preset and ``SoViTHead(kind="sot")`` use. With tokens that have per-channel means the two are ~100%
            apart (:doc:`second-order heads </guides/heads>`).
        normalization: ``"svpn"`` (default, SoT) or ``"none"`` (the plain matrices, DropCov's transformers;
            no ``v0`` then).
        token_drop: in training, each (image, head, token) has its query and key rows zeroed with this
            probability before the centring, the kept ones scaled by 1/(1 − p) (0.2 in DropCov's
            transformers). The mask is drawn as their ``Dropout2d`` on a ``(B·h, N, ·)`` tensor draws it (one
            Bernoulli per row, in that order), so a seeded run draws the same tokens. 0 (default): none.
        layout: ``"tokens"`` (default) or ``"auto"`` (also ``(B, C, H, W)`` maps, as positions).
        device, dtype: factory kwargs.

    Shapes: ``(B, N, C)`` → ``(B, h·d_r²)``. Half-precision input is pooled in float32 and cast back.
    """

    def __init__(self, in_channels: int, reduced_dim: tuple[int, int] = (6, 24), alpha: float = 0.5,
                 iters: int = 1, eps: float = 1e-5, *, centering: str = "feature", normalization: str = "svpn",
                 token_drop: float = 0.0, layout: str = "tokens", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        if not isinstance(reduced_dim, (tuple, list)) or len(reduced_dim) != 2:
            raise ValueError(f"reduced_dim must be a pair (heads, head width), got {reduced_dim!r}")
        heads, width = reduced_dim
        check_int("reduced_dim[0] (heads)", heads)
        check_int("reduced_dim[1] (head width)", width)
        check_int("iters", iters)
        check_number("alpha", alpha, 0.0, 1.0, open_low=True)
        check_number("eps", eps, 0.0)
        if centering not in _CENTERINGS:
            raise ValueError(f"centering must be one of {_CENTERINGS}, got {centering!r}")
        if normalization not in _TOKEN_NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {_TOKEN_NORMALIZATIONS}, got {normalization!r}")
        check_number("token_drop", token_drop, 0.0, 1.0, open_high=True)
        check_layout(layout, ("tokens", "auto"))
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.reduced_dim = (heads, width)
        self.alpha, self.iters, self.eps = float(alpha), iters, float(eps)
        self.centering, self.layout = centering, layout
        self.normalization, self.token_drop = normalization, float(token_drop)
        self.out_features = heads * width * width
        self.proj = nn.Linear(in_channels, 2 * heads * width, bias=False, **factory)
        self.v0 = nn.Parameter(torch.empty(width, **factory)) if normalization == "svpn" else None
        self.reset_parameters()

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments that build this pooling again (fresh parameters)."""
        return {"reduced_dim": self.reduced_dim, "alpha": self.alpha, "iters": self.iters, "eps": self.eps,
                "centering": self.centering, "normalization": self.normalization, "token_drop": self.token_drop,
                "layout": self.layout}

    def reset_parameters(self) -> None:
        """The release's initialisation: trunc-normal (std 0.02) projection, standard-normal start vector."""
        nn.init.trunc_normal_(self.proj.weight, std=0.02, a=-2.0, b=2.0)
        if self.v0 is not None:
            nn.init.normal_(self.v0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = as_maps(x, self.in_channels, "MultiHeadCrossCov", self.layout).flatten(2).mT  # (B, N, C)
        heads, width = self.reduced_dim
        qk = rearrange(self.proj(tokens), "b n (two h d) -> two b h n d", two=2, h=heads)
        dtype = work_dtype(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k = qk.to(dtype)
            if self.training and self.token_drop > 0:
                # Channel dropout of a (B·h, N, 1) tensor: one Bernoulli per (image, head, token), drawn in the
                # order of DropCov's Dropout2d on its (B·h, N, d_r) mask, so a seeded run drops their tokens.
                ones = q.new_ones(q.shape[0] * heads, q.shape[-2], 1)
                mask = F.dropout1d(ones, self.token_drop, training=True).view(*q.shape[:-1], 1)
                q, k = q * mask, k * mask
            dims = (-2,) if self.centering == "feature" else (-2, -1)
            q, k = q - q.mean(dims, keepdim=True), k - k.mean(dims, keepdim=True)
            p = q.mT @ k / q.shape[-2]
            out = p if self.v0 is None else svpn(p.mT, self.v0, self.alpha, self.iters, self.eps).mT
        return out.flatten(1).to(x.dtype)

    def extra_repr(self) -> str:
        drop = f", token_drop={self.token_drop}" if self.token_drop else ""
        return (f"{self.in_channels}, reduced_dim={self.reduced_dim}, normalization={self.normalization!r}, "
                f"alpha={self.alpha}, iters={self.iters}, centering={self.centering!r}{drop}, "
                f"out_features={self.out_features}")


class SoViTHead(nn.Module):
    """Vision-transformer head that classifies from the class token *and* the second-order statistics of the
    word tokens: logits = ``fc_cls(class token) + fc_cov(dropout(pool(word tokens)))``.

    Three published poolings, chosen by ``kind``:

    - ``"svpn"`` (So-ViT release, Xie et al. 2021): :class:`SvPNCrossCov` with ``reduced_dim=(d1, d2)``,
      ``d1·d2`` features;
    - ``"mpa"`` (Song et al., ICLR 2022): :class:`covpool.CovPool` with ``reduced_dim=d`` and ``backend``
      (default ``mpa_lya``), ``d(d+1)/2`` features;
    - ``"sot"`` (SoT, Xie et al. 2021): :class:`MultiHeadCrossCov` with ``reduced_dim=(heads, d_r)``,
      ``heads·d_r²`` features (SoT-Small: (6, 24)).

    ``"svpn"`` and ``"mpa"`` reduce the tokens with 1×1 conv → BatchNorm → ReLU (BatchNorm over all B·N
    tokens, as the releases do), ``"sot"`` with a linear projection. Classifiers are initialised as the
    releases do (trunc-normal std 0.02, zero bias), the reduction convolutions Kaiming-normal (fan-out).

    Args:
        embed_dim: C, the token width.
        num_classes: classes of both classifiers; 0 makes them identities (the forward returns features).
        reduced_dim: ``"mpa"``: d (an int, or None to pool the C channels as they are); ``"svpn"``: (d1, d2);
            ``"sot"``: (heads, d_r).
        backend: square-root backend of ``"mpa"``, a name or ``{"name": ..., **options}`` (None:
            ``mpa_lya``). svPN is not a square root of a symmetric matrix, so ``"svpn"`` and ``"sot"`` refuse
            one.
        drop_rate: dropout on the covariance features before ``fc_cov`` (0.5 in So-ViT-14/19, SoT-Small).
        kind: ``"mpa"`` (default), ``"svpn"`` or ``"sot"``.
        centering: ``"sot"`` only: ``"scalar"`` (None, the default: the release's one mean per head over its
            tokens and channels) or ``"feature"`` (each channel's mean, the cross-covariance); with tokens that
            have per-channel means, as real ones do, the two are ~100% apart (:doc:`/guides/heads`).
        pool_options: further keyword options of the pooling module (e.g. ``{"centering": "scalar"}`` for
            ``"sot"``; ``{"normalization": "none", "token_drop": 0.2}`` makes DropCov's transformer head).
        device, dtype: factory kwargs of the parameters.

    Attributes:
        cov_dim: width of the covariance features.
        num_features: ``embed_dim + cov_dim``, the pre-logit width.

    Shapes: input ``(B, 1 + N, C)``, class token first, N >= 1 word tokens; output ``(B, num_classes)``, or
    ``(B, num_features)`` = ``[class token, covariance features]`` with ``num_classes=0`` or ``pre_logits``.

    Numerical caveats: with N < d tokens the covariance is rank-deficient; ``mpa_lya`` then still returns a
    finite root and gradient. Half-precision tokens are pooled in float32.

    Example::

        >>> import torch
        >>> from covpool.layers import SoViTHead
        >>> head = SoViTHead(32, num_classes=10, reduced_dim=8)
        >>> head(torch.randn(2, 1 + 49, 32)).shape, head.num_features
        (torch.Size([2, 10]), 68)
        >>> SoViTHead(32, num_classes=10, reduced_dim=(8, 4), kind="svpn").num_features
        64
        >>> SoViTHead(32, num_classes=10, reduced_dim=(6, 4), kind="sot").num_features
        128
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int = 1000,
        reduced_dim: int | tuple[int, int] | None = 64,
        backend: BackendSpec | None = None,
        drop_rate: float = 0.0,
        *,
        kind: str = "mpa",
        centering: str | None = None,
        pool_options: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim)
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        check_number("drop_rate", drop_rate, 0.0, 1.0, open_high=True)
        if kind != "mpa" and backend is not None:
            raise ValueError(f"kind={kind!r} normalises by svPN, not by a matrix square root: backend={backend!r} "
                             "does not apply; kind='mpa' (head='mpa' in so_vit_*) pools with a square-root backend")
        if kind != "sot" and centering is not None:
            raise ValueError(f"centering={centering!r} applies to kind='sot' (SoT's multi-head cross-covariance); "
                             f"kind={kind!r} centres each channel")
        factory = {"device": device, "dtype": dtype}
        extra = dict(pool_options or {})
        self.embed_dim = embed_dim
        self.kind = kind
        self.reduced_dim = reduced_dim
        if kind == "mpa":
            if isinstance(reduced_dim, (tuple, list)):
                raise ValueError(f"kind='mpa' reduces to one width d (an int or None), got {reduced_dim!r}")
            self.pool: nn.Module = CovPool(embed_dim, reduced_dim=reduced_dim,
                                           backend="mpa_lya" if backend is None else backend,
                                           **{"layout": "tokens", **extra}, **factory)
        elif not isinstance(reduced_dim, (tuple, list)):
            what = "(d1, d2), the widths of its two branches" if kind == "svpn" else "(heads, head width)"
            raise ValueError(f"kind={kind!r} needs reduced_dim={what}, got {reduced_dim!r}")
        elif kind == "svpn":
            self.pool = SvPNCrossCov(embed_dim, tuple(reduced_dim), **{"layout": "tokens", **extra}, **factory)
        else:
            if centering is not None and "centering" in extra:
                raise ValueError("centering is given twice: as centering= and in pool_options; give one")
            extra.setdefault("centering", centering or SOT_CENTERING)
            self.pool = MultiHeadCrossCov(embed_dim, tuple(reduced_dim), **extra, **factory)
        self.cov_dim = self.pool.out_features
        self.num_features = embed_dim + self.cov_dim
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = 0
        self.fc_cls: nn.Module = nn.Identity()
        self.fc_cov: nn.Module = nn.Identity()
        self.reset_classifier(num_classes, **factory)
        self.reset_parameters()

    @property
    def backend(self) -> BackendSpec | None:
        """The square-root backend of the ``"mpa"`` head (its :class:`CovPool`'s, which
        :func:`covpool.set_backend` changes); None for svPN, which has no matrix square root."""
        return self.pool.backend if isinstance(self.pool, CovPool) else None

    def reset_parameters(self) -> None:
        """The releases' initialisation: Kaiming-normal (fan-out) reduction convolutions, unit/zero BatchNorm,
        trunc-normal (std 0.02) classifier weights and zero biases (svPN: standard-normal start vector)."""
        if isinstance(self.pool, CovPool):
            _init_reduction(self.pool)
        else:
            self.pool.reset_parameters()
        for fc in (self.fc_cls, self.fc_cov):
            _init_classifier(fc)

    def reset_classifier(self, num_classes: int, *, device: Any = None, dtype: torch.dtype | None = None) -> None:
        """Fresh ``fc_cls`` and ``fc_cov`` for ``num_classes`` (0: identities, the forward returns features),
        trunc-normal (std 0.02) weights and zero biases. The new layers go to the device and dtype of the
        head's current parameters unless given."""
        check_int("num_classes", num_classes, 0)
        current = next(self.parameters(), None)
        if current is not None:
            device = current.device if device is None else device
            dtype = current.dtype if dtype is None else dtype
        self.num_classes = num_classes
        if num_classes:
            self.fc_cls = nn.Linear(self.embed_dim, num_classes, device=device, dtype=dtype)
            self.fc_cov = nn.Linear(self.cov_dim, num_classes, device=device, dtype=dtype)
            for fc in (self.fc_cls, self.fc_cov):
                _init_classifier(fc)
        else:
            self.fc_cls = nn.Identity()
            self.fc_cov = nn.Identity()

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1 + N, C)`` → class token ``(B, C)`` and covariance features ``(B, cov_dim)`` (after dropout)."""
        if x.dim() != 3 or x.shape[1] < 2 or x.shape[2] != self.embed_dim:
            raise ValueError(f"SoViTHead expects tokens (B, 1 + N, {self.embed_dim}) with a class token and "
                             f"N >= 1 word tokens, got shape {tuple(x.shape)}")
        return x[:, 0], self.head_drop(self.pool(x[:, 1:]))

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits ``(B, num_classes)``, or features ``(B, num_features)`` when ``pre_logits`` or
        ``num_classes == 0``."""
        cls_token, cov = self._features(x)
        if pre_logits or not self.num_classes:
            return torch.cat([cls_token, cov], dim=-1)
        return self.fc_cls(cls_token) + self.fc_cov(cov)

    def extra_repr(self) -> str:
        backend = f", backend={self.backend!r}" if self.kind == "mpa" else ""
        return (f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, kind={self.kind!r}, "
                f"reduced_dim={self.reduced_dim}{backend}, cov_dim={self.cov_dim}")
