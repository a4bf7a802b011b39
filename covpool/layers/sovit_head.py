"""``SoViTHead``: a vision transformer's classification head on the class token and the second-order statistics of
the word tokens, with any registered head as its pooling; three are published:

- ``head="svpn"``: the head of the So-ViT release (Xie et al., arXiv:2104.10935, github.com/jiangtaoxie/So-ViT,
  April 2021): cross-covariance of two reduced token branches, normalised by singular-value power
  normalisation (svPN, :func:`covpool.layers.functional.svpn`), the full matrix as features
  (:class:`covpool.layers.SvPNCrossCov`).
- ``head="mpa_cov"``: the head of "Fast Differentiable Matrix Square Root" (Song et al., ICLR 2022,
  github.com/KingJamesSong/FastDifferentiableMatSqrt, folder So-ViT): covariance of one reduced branch, its
  matrix square root (MPA-Lya by default, any covpool backend) and the upper triangle: :class:`covpool.CovPool`
  on tokens.
- ``head="sot"``: SoT's multi-headed cross-covariance (Xie et al., 2021, github.com/jiangtaoxie/SoT;
  :class:`covpool.layers.MultiHeadCrossCov`), also the head of DropCov's transformers without svPN.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from covpool.linalg import BackendSpec
from covpool.linalg._checks import check_int, check_number

from .._deprecation import moved_names
from ._common import Factory, out_features_of
from .heads import get_head, list_heads
from .pooling import _init_reduction

__all__ = ["SoViTHead"]

# SoViTHead(kind=...) before covpool 0.2, and the head name each kind is now.
_KINDS = {"svpn": "svpn", "mpa": "mpa_cov", "sot": "sot"}
# Names that lived here before covpool 0.2, and where they are now.
__getattr__ = moved_names(__name__, {
    "SvPNCrossCov": ("covpool.layers.pooling:SvPNCrossCov", "covpool.layers.SvPNCrossCov"),
    "MultiHeadCrossCov": ("covpool.layers.pooling:MultiHeadCrossCov", "covpool.layers.MultiHeadCrossCov"),
    "cross_covariance": "covpool.layers.functional:cross_covariance",
    "svpn": "covpool.layers.functional:svpn",
})


def _init_classifier(fc: nn.Module) -> None:
    # Both releases: trunc-normal (std 0.02) weights, zero biases.
    if isinstance(fc, nn.Linear):
        nn.init.trunc_normal_(fc.weight, std=0.02, a=-2.0, b=2.0)
        nn.init.zeros_(fc.bias)


class SoViTHead(nn.Module):
    """Vision-transformer head that classifies from the class token *and* the second-order statistics of the
    word tokens: logits = ``fc_cls(class token) + fc_cov(dropout(pool(word tokens)))``.

    The pooling is a registered head (:func:`covpool.list_heads`) that pools tokens, chosen by name:

    - ``"mpa_cov"`` (default; Song et al., ICLR 2022): :class:`covpool.CovPool` with ``reduced_dim=d`` and
      ``backend`` (default ``mpa_lya``), ``d(d+1)/2`` features; any covariance head of the registry likewise;
    - ``"svpn"`` (So-ViT release, Xie et al. 2021): :class:`covpool.layers.SvPNCrossCov` with
      ``reduced_dim=(d1, d2)``, ``d1·d2`` features;
    - ``"sot"`` (SoT, Xie et al. 2021): :class:`covpool.layers.MultiHeadCrossCov` with
      ``reduced_dim=(heads, d_r)``, ``heads·d_r²`` features (SoT-Small: (6, 24)).

    ``"svpn"`` and the covariance heads reduce the tokens with 1×1 conv → BatchNorm → ReLU (BatchNorm over all
    B·N tokens, as the releases do), ``"sot"`` with a linear projection. Classifiers are initialised as the
    releases do (trunc-normal std 0.02, zero bias), the reduction convolutions Kaiming-normal (fan-out).

    Args:
        embed_dim: C, the token width.
        num_classes: classes of both classifiers; 0 makes them identities (the forward returns features).
        reduced_dim: the head's reduction: d (an int, or None to pool the C channels as they are) for the
            covariance heads; (d1, d2) for ``"svpn"``; (heads, d_r) for ``"sot"``.
        backend: square-root backend of a head with a square root, a name or ``{"name": ..., **options}``
            (None: the head's, ``mpa_lya`` for ``"mpa_cov"``). svPN is not a square root of a symmetric
            matrix, so ``"svpn"`` and ``"sot"`` refuse one.
        drop_rate: dropout on the covariance features before ``fc_cov`` (0.5 in So-ViT-14/19, SoT-Small).
        head: a name of :func:`covpool.list_heads` whose head pools tokens.
        centering: for a head that takes it (``"sot"``): ``"scalar"`` (None, the default: the release's one mean
            per head over its tokens and channels) or ``"feature"`` (each channel's mean, the cross-covariance);
            with tokens that have per-channel means, as real ones do, the two are ~100% apart
            (:doc:`/guides/heads`).
        pool_options: further keyword options of the head (e.g. ``{"iters": 3}`` for ``"svpn"``;
            ``{"normalization": "none", "token_drop": 0.2}`` makes DropCov's transformer head of ``"sot"``).
        device: device of the parameters and buffers (None: torch's default).
        dtype: dtype of the parameters and buffers (None: torch's default).
        kind: the name before covpool 0.2 (``"mpa"``, ``"svpn"``, ``"sot"``): still accepted for one release,
            with a FutureWarning; use ``head``.

    Raises:
        ValueError: an unknown ``head`` or ``kind``, or a head that pools feature maps only; ``backend`` for a
            head without a matrix square root, ``centering`` for one that takes none, or either given twice
            (also in ``pool_options``); ``embed_dim`` or ``num_classes`` not an integer (>= 1, >= 0);
            ``drop_rate`` outside [0, 1); a bad value of the head's own options.
        TypeError: an option the head's module does not take (naming the closest), or a module without an
            integer ``out_features``.

    Attributes:
        head_name: the head's name.
        pool: its pooling module.
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
        >>> SoViTHead(32, num_classes=10, reduced_dim=(8, 4), head="svpn").num_features
        64
        >>> SoViTHead(32, num_classes=10, reduced_dim=(6, 4), head="sot").num_features
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
        head: str = "mpa_cov",
        centering: str | None = None,
        pool_options: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim)
        if kind is not None:
            if kind not in _KINDS:
                raise ValueError(f"kind must be one of {tuple(_KINDS)}, got {kind!r}; kind= is now head=, a name "
                                 f"of covpool.list_heads()")
            warnings.warn(f"SoViTHead(kind={kind!r}) is now SoViTHead(head={_KINDS[kind]!r}); kind= goes in the "
                          "next release", FutureWarning, stacklevel=2)
            head = _KINDS[kind]
        spec = get_head(head)
        if "tokens" not in spec.layouts:
            raise ValueError(f"head {head!r} pools feature maps only; SoViTHead pools word tokens")
        check_number("drop_rate", drop_rate, 0.0, 1.0, open_high=True)
        options = dict(pool_options or {})
        for name, value in (("backend", backend), ("centering", centering)):
            if value is None:
                continue
            if name not in spec.keywords or (name == "backend" and not spec.uses_backend):
                reason = "has no matrix square root" if name == "backend" else f"takes no {name}"
                raise ValueError(f"head {head!r} {reason}: {name}={value!r} does not apply; the token heads that "
                                 f"take it: {', '.join(_heads_taking(name))}")
            if name in options:
                raise ValueError(f"{name} is given twice: as {name}= and in pool_options; give one")
            options[name] = value
        if "layout" in spec.keywords:
            options.setdefault("layout", "tokens")
        self.embed_dim = embed_dim
        self.head_name = head
        self.reduced_dim = reduced_dim
        # Only the factory kwargs given: a registered head's module need not take them.
        factory: Factory = {}
        if device is not None:
            factory["device"] = device
        if dtype is not None:
            factory["dtype"] = dtype
        self.pool: nn.Module = spec.build(embed_dim, reduced_dim=reduced_dim, **options, **factory)
        self.cov_dim = out_features_of(self.pool, f"SoViTHead(head={head!r})")
        self.num_features = embed_dim + self.cov_dim
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = 0
        self.fc_cls: nn.Module = nn.Identity()
        self.fc_cov: nn.Module = nn.Identity()
        self.reset_classifier(num_classes, device=device, dtype=dtype)
        self.reset_parameters()

    @property
    def kind(self) -> str:
        """The head's name as ``kind`` spelled it before covpool 0.2 (deprecated: :attr:`head_name`)."""
        warnings.warn("SoViTHead.kind is now SoViTHead.head_name; kind goes in the next release", FutureWarning,
                      stacklevel=2)
        return {new: old for old, new in _KINDS.items()}.get(self.head_name, self.head_name)

    @property
    def backend(self) -> BackendSpec | None:
        """The square-root backend of the pooling (which :func:`covpool.set_backend` changes); None for a head
        without one (svPN has no matrix square root)."""
        backend: BackendSpec | None = getattr(self.pool, "backend", None)
        return backend if getattr(self.pool, "uses_backend", False) else None

    def reset_parameters(self) -> None:
        """The releases' initialisation: Kaiming-normal (fan-out) reduction convolutions, unit/zero BatchNorm,
        trunc-normal (std 0.02) classifier weights and zero biases (svPN: standard-normal start vector); a
        pooling with a ``reset_parameters`` of its own initialises itself."""
        getattr(self.pool, "reset_parameters", functools.partial(_init_reduction, self.pool))()
        for fc in (self.fc_cls, self.fc_cov):
            _init_classifier(fc)

    def reset_classifier(self, num_classes: int, *, device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None) -> None:
        """Fresh ``fc_cls`` and ``fc_cov`` for ``num_classes`` (0: identities, the forward returns features),
        trunc-normal (std 0.02) weights and zero biases. The new layers go to the ``device`` and ``dtype`` of the
        head's current parameters unless given. A ValueError unless ``num_classes`` is an integer >= 0."""
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
        """Logits ``(B, num_classes)`` of tokens ``x`` ``(B, 1 + N, C)`` (class token first), or features
        ``(B, num_features)`` when ``pre_logits`` or ``num_classes == 0``. A ValueError names any other shape."""
        cls_token, cov = self._features(x)
        if pre_logits or not self.num_classes:
            return torch.cat([cls_token, cov], dim=-1)
        return self.fc_cls(cls_token) + self.fc_cov(cov)

    def extra_repr(self) -> str:
        backend = f", backend={self.backend!r}" if self.backend is not None else ""
        return (f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, head={self.head_name!r}, "
                f"reduced_dim={self.reduced_dim}{backend}, cov_dim={self.cov_dim}")


def _heads_taking(option: str) -> list[str]:
    """The registered token heads that take ``option`` (for ``"backend"``: that have a square root)."""
    return [h for h in list_heads() if "tokens" in get_head(h).layouts and option in get_head(h).keywords
            and (option != "backend" or get_head(h).uses_backend)]
