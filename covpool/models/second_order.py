"""The models :func:`covpool.swap_pooling` builds: :class:`SecondOrderNet`, a timm backbone with a second-order
head, and :class:`TokenCovPool`, the pooling of a transformer's tokens; ``_build_pool`` (internal) is the one way
from a head's name and options to the pooling module of either layout, for every model of this package."""
from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
from einops import rearrange
from timm.layers import register_notrace_module
from torch import nn

from ..layers import get_head, list_heads
from ..layers._common import Factory, out_features_of
from ..layers.backend_switch import _rooted_heads
from ..linalg._checks import check_bool, check_int
from ._common import check_num_classes, check_vector_output

if TYPE_CHECKING:
    from typing_extensions import TypeIs

__all__ = ["SecondOrderNet", "TokenCovPool"]

_TOKEN_OPTIONS = ("use_class_token", "num_prefix_tokens")  # TokenCovPool's own, besides the head's
_TIMM_HOOKS = ("forward_features", "forward_head", "reset_classifier")


class _TimmModel(Protocol):
    """What :class:`SecondOrderNet` uses of a timm model: timm's hooks and attributes, which its models share by
    convention, not through a base class that declares them (:func:`_has_timm_hooks` checks the hooks)."""

    num_features: int
    num_classes: int

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...
    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None: ...
    def group_matcher(self, coarse: bool = False) -> dict[str, Any] | Callable[[str], Any]: ...
    def set_grad_checkpointing(self, enable: bool = True) -> None: ...
    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any: ...
    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]: ...


def _has_timm_hooks(model: object) -> TypeIs[_TimmModel]:
    """Whether ``model`` has timm's ``forward_features`` / ``forward_head`` / ``reset_classifier`` hooks."""
    return all(callable(getattr(model, hook, None)) for hook in _TIMM_HOOKS)


def _build_pool(layout: str, in_channels: int, options: Mapping[str, Any]) -> nn.Module:
    """The pooling of a second-order head whose output a classifier reads: ``options`` are ``head`` (a name of
    :func:`covpool.list_heads`, default ``"isqrt_cov"``) and its options, copied. ``layout="maps"``: the head's
    module, for feature maps (a token-only head is refused); ``"tokens"``: a :class:`TokenCovPool` around it,
    which also takes ``use_class_token`` and ``num_prefix_tokens``. Used to build and to rebuild (after
    ``reset_classifier(0, '')``) every swapped and registered CNN head."""
    copied = copy.deepcopy(dict(options))
    if layout == "tokens":
        return TokenCovPool(in_channels, **copied)
    if any(k in copied for k in _TOKEN_OPTIONS):
        raise ValueError("use_class_token / num_prefix_tokens are options of token models (ViTs) only")
    name = copied.pop("head", "isqrt_cov")
    head = get_head(name)
    if "maps" not in head.layouts:
        maps = ", ".join(h for h in list_heads() if "maps" in get_head(h).layouts)
        raise ValueError(f"head {name!r} pools transformer tokens (a timm ViT with num_prefix_tokens); this model "
                         f"gives feature maps: use one of {maps}")
    pool = head.build(in_channels, **copied)
    check_vector_output(pool)
    return pool


def _head_spec(head: str, reduced_dim: int | None, backend: Any = None) -> dict[str, Any]:
    """``{"head": head, "reduced_dim": ..., "backend": ...}`` for ``_build_pool`` (``backend`` only when
    given): what a model's ``reduced_dim`` and ``backend`` arguments make of its head; a backend for a head
    without a square root is refused, naming the head."""
    if backend is not None and not get_head(head).uses_backend:
        rooted = ", ".join(_rooted_heads())
        raise ValueError(f"backend={backend!r} would have no effect: head {head!r} has no matrix square root; for one, "
                         f"build resnet*_isqrt, or swap_pooling(model, head=...) with one of {rooted}")
    return {"head": head, "reduced_dim": reduced_dim, **({"backend": backend} if backend is not None else {})}


@register_notrace_module  # checks its input's shape in Python: a leaf for timm's FX tracer
class TokenCovPool(nn.Module):
    """Second-order pooling of a transformer's tokens, the So-ViT recipe on any timm ViT.

    Xie et al., "So-ViT: Mind Visual Tokens for Vision Transformer", arXiv:2104.10935: classify from the
    class token *and* the second-order statistics of the patch ("visual") tokens. The pooling is the head
    ``head`` (:func:`covpool.build_head`: :class:`covpool.CovPool` for the covariance heads, So-ViT's and SoT's
    cross-covariances for ``"svpn"`` and ``"sot"``, any registered head that pools tokens) on the tokens after
    the model's ``num_prefix_tokens`` prefix tokens (class, distillation and register tokens are not image
    positions); the class token, when the model has one, is concatenated in front, so one linear layer on the
    output is So-ViT's (and SoT's) sum of a class-token and a covariance classifier.

    Args:
        embed_dim: C, the token width.
        num_prefix_tokens: tokens before the patch tokens (timm's ``num_prefix_tokens``).
        use_class_token: put token 0 (the class token) in front of the covariance vector.
        head: a name from :func:`covpool.list_heads` (default ``"isqrt_cov"``).
        **options: the head's options (``reduced_dim``, ``backend``, ...).

    Attributes:
        out_features: ``embed_dim`` (with the class token) + the pooling's ``out_features``.

    Shapes: ``(B, num_prefix_tokens + N, C)`` → ``(B, out_features)``.
    """

    def __init__(self, embed_dim: int, num_prefix_tokens: int = 1, use_class_token: bool = True,
                 head: str = "isqrt_cov", **options: Any) -> None:
        super().__init__()
        check_int("num_prefix_tokens", num_prefix_tokens, 0)
        check_bool("use_class_token", use_class_token)
        if use_class_token and num_prefix_tokens < 1:
            raise ValueError("use_class_token needs a class token: num_prefix_tokens must be >= 1")
        _head_spec = get_head(head)
        if "tokens" not in _head_spec.layouts:
            raise ValueError(f"head {head!r} pools feature maps only; this model gives tokens: use one of "
                             f"{', '.join(h for h in list_heads() if 'tokens' in get_head(h).layouts)}")
        self.pool = _head_spec.build(embed_dim, **({"layout": "tokens"} if "layout" in _head_spec.keywords else {}),
                                    **options)
        check_vector_output(self.pool)
        self.head = head
        self.embed_dim = embed_dim
        self.num_prefix_tokens = num_prefix_tokens
        self.use_class_token = use_class_token
        self.out_features = out_features_of(self.pool, "TokenCovPool") + (embed_dim if self.use_class_token else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] <= self.num_prefix_tokens or x.shape[2] != self.embed_dim:
            raise ValueError(
                f"TokenCovPool expects tokens (B, {self.num_prefix_tokens} prefix + N patch tokens, "
                f"{self.embed_dim}), got shape {tuple(x.shape)}; a model whose forward_head pools even after "
                "reset_classifier(0, '') (e.g. distilled DeiT) cannot take a second-order head"
            )
        cov = self.pool(x[:, self.num_prefix_tokens:])
        return torch.cat([x[:, 0], cov], dim=-1) if self.use_class_token else cov

    def extra_repr(self) -> str:
        return (f"head={self.head!r}, num_prefix_tokens={self.num_prefix_tokens}, "
                f"use_class_token={self.use_class_token}")


def _prefix_regex(regex: str, prefix: str) -> str:
    # timm applies group regexes with re.match (anchored at the start); they are often alternations such as
    # "^cls_token|pos_embed|^patch_embed", so the prefix goes in front of a group of all alternatives, whose
    # own start anchors (after the start, "|" or "(") would now fail mid-name and are dropped.
    alternatives = re.sub(r"(^|[|(])\^", r"\1", regex)
    return f"^{re.escape(prefix)}(?:{alternatives})"


def _prefix_matcher(spec: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A timm ``group_matcher`` dict (each value a regex or a list of ``(regex, suffix)``) for parameters that
    now live under ``prefix``."""
    return {
        group: _prefix_regex(value, prefix) if isinstance(value, str)
        else [(_prefix_regex(regex, prefix), *rest) for regex, *rest in value]
        for group, value in spec.items()
    }


class SecondOrderNet(nn.Module):
    """A timm backbone with a second-order head, built by :func:`covpool.swap_pooling`.

    ``backbone`` is the original model with its head reset to timm's unpooled features
    (``reset_classifier(0, '')``); ``global_pool`` pools those (:class:`covpool.CovPool` for maps,
    :class:`TokenCovPool` for tokens) and ``fc`` classifies the vector. timm's model contract carries over:
    ``num_features`` is the backbone's (what ``forward_features`` returns), ``head_hidden_size`` the
    covariance width (``forward_head(x, pre_logits=True)``), ``reset_classifier(n)`` keeps the trained
    pooling, ``reset_classifier(0, '')`` gives unpooled features, and ``group_matcher`` (so layer-wise LR
    decay), ``no_weight_decay``, ``set_grad_checkpointing``, ``feature_info``, ``forward_intermediates``,
    ``prune_intermediate_layers`` and ``pretrained_cfg`` are the backbone's, re-rooted under ``backbone.``.

    Args:
        backbone: a timm model whose head is already reset to unpooled features.
        pool_kind: ``"maps"`` (``(B, C, H, W)``, or ``(B, H, W, C)`` with ``channels_last``, or plain
            ``(B, N, C)`` tokens) or ``"tokens"`` (prefix tokens first).
        in_channels: C of the unpooled features.
        num_classes: classes of ``fc`` (0: ``nn.Identity``, the forward returns the covariance vector).
        pool_options: keyword arguments of the pooling module, kept to rebuild it after
            ``reset_classifier(n, '')`` has dropped it.
        channels_last: the unpooled maps are ``(B, H, W, C)`` (timm's ``output_fmt="NHWC"``).

    Raises:
        TypeError: ``backbone`` lacks one of timm's ``forward_features`` / ``forward_head`` /
            ``reset_classifier`` hooks.
        ValueError: ``pool_kind`` is neither ``"maps"`` nor ``"tokens"``, ``num_classes`` is not an integer
            >= 0, or a pooling option is invalid.
    """

    backbone: _TimmModel

    def __init__(self, backbone: nn.Module, pool_kind: str, in_channels: int, num_classes: int,
                 pool_options: dict[str, Any], channels_last: bool = False) -> None:
        super().__init__()
        if pool_kind not in ("maps", "tokens"):
            raise ValueError(f"pool_kind must be 'maps' or 'tokens', got {pool_kind!r}")
        check_num_classes(num_classes)
        if not _has_timm_hooks(backbone):
            missing = ", ".join(h for h in _TIMM_HOOKS if not callable(getattr(backbone, h, None)))
            raise TypeError(f"SecondOrderNet needs a timm model as backbone; {type(backbone).__name__} has no "
                            f"{missing} (build it with covpool.swap_pooling, which also takes torchvision models)")
        self.backbone = backbone
        self.pool_kind = pool_kind
        self.in_channels = in_channels
        self.pool_options = pool_options
        self.channels_last = channels_last
        self.num_features = backbone.num_features
        self.num_classes = num_classes
        cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
        if cfg:
            first_conv = cfg.get("first_conv")
            if first_conv:
                cfg["first_conv"] = (f"backbone.{first_conv}" if isinstance(first_conv, str)
                                     else tuple(f"backbone.{c}" for c in first_conv))
            cfg.update(classifier="fc", num_classes=num_classes)
        self.pretrained_cfg = self.default_cfg = cfg
        info = getattr(backbone, "feature_info", None)
        if isinstance(info, list):
            self.feature_info = [dict(f, module=f"backbone.{f['module']}") if f.get("module") else dict(f)
                                 for f in info]
        self._set_head(self._build_pool(), num_classes)

    def _build_pool(self) -> nn.Module:
        return _build_pool(self.pool_kind, self.in_channels, self.pool_options)

    def _set_head(self, pool: nn.Module, num_classes: int) -> None:
        ref = next(self.backbone.parameters(), None)
        factory: Factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.global_pool = pool.to(**factory).train(self.training)
        self.head_hidden_size = getattr(pool, "out_features", self.in_channels)
        self.num_classes = num_classes
        self.fc = (nn.Linear(self.head_hidden_size, num_classes, **factory)
                   if num_classes > 0 else nn.Identity()).train(self.training)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any] | Callable[[str], Any]:
        matcher = self.backbone.group_matcher(coarse=coarse)
        if callable(matcher):
            return lambda name: matcher(name.removeprefix("backbone.")) if name.startswith("backbone.") \
                else (float("inf"),)
        return _prefix_matcher(matcher, "backbone.")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        skip = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in skip()} if skip is not None else set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh ``fc`` with ``num_classes`` outputs (``nn.Identity`` for 0).

        ``global_pool``: ``None`` keeps the current (trained) pooling, or brings covariance pooling back for
        a classifier on unpooled features; ``"cov"`` covariance pooling (fresh if there was none); ``""`` none,
        with ``num_classes=0``: the forward returns the backbone's unpooled features, as timm's models do.
        """
        check_num_classes(num_classes)
        if global_pool not in (None, "cov", ""):
            raise ValueError(f"global_pool={global_pool!r} is not supported: use 'cov' (covariance pooling), "
                             "'' (unpooled features, with num_classes=0) or None (keep the current pooling)")
        pooled = not isinstance(self.global_pool, nn.Identity)
        pool_type = ("cov" if pooled or num_classes > 0 else "") if global_pool is None else global_pool
        if pool_type == "" and num_classes > 0:
            raise ValueError(f"reset_classifier({num_classes}, ''): unpooled features have no classifier; pass "
                             "num_classes=0 for features, or global_pool='cov' (or None) to classify the covariance")
        if pool_type == "":
            pool: nn.Module = nn.Identity()
        else:
            pool = self.global_pool if pooled else self._build_pool()
        self._set_head(pool, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.backbone.forward_intermediates(x, *args, **kwargs)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        kept = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if prune_head:
            self.reset_classifier(0, "")
        return kept

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Unpooled features (the backbone's head after ``reset_classifier(0, '')``) → covariance → ``fc``.

        Args:
            x: what :meth:`forward_features` returns, the backbone's features before its head.
            pre_logits: return the pooled vector ``(B, head_hidden_size)`` rather than the logits
                ``(B, num_classes)``.

        Returns:
            The logits or the pooled vector; the backbone's unpooled features when the pooling was removed
            (``reset_classifier(0, '')``).
        """
        x = self.backbone.forward_head(x, pre_logits=True)
        if isinstance(self.global_pool, nn.Identity):
            return x
        if self.channels_last:
            x = rearrange(x, "b h w c -> b c h w")
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
