"""``swap_pooling``: put a second-order (covariance pooling) head on any timm or torchvision backbone.

Three routes, chosen by what the model offers rather than by its family:

- timm's ``ResNet`` becomes a :class:`~covpool.models.resnet_isqrt.ISqrtResNet` in place (the class of
  ``resnet50_isqrt``: same parameter names, so its checkpoints load into ``resnet*_isqrt`` and back);
- any other timm model (anything with timm's ``forward_features`` / ``forward_head`` / ``reset_classifier``
  hooks) is wrapped in a :class:`SecondOrderNet`: the backbone's own ``reset_classifier(0, '')`` turns its
  head into timm's "unpooled features" (keeping the final norm or head convolution that some families put
  there), and the wrapper pools those with :class:`covpool.CovPool` (feature maps) or :class:`TokenCovPool`
  (transformer tokens) and classifies with a fresh linear layer;
- torchvision classification models with a global ``avgpool`` and a linear classifier (ResNet, ResNeXt,
  Wide ResNet, RegNet, ConvNeXt, EfficientNet, MobileNet, Swin, ...) get the :class:`covpool.CovPool` as their
  ``avgpool`` and a classifier sized to it; torchvision's ``forward`` is unchanged.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from timm.layers import register_notrace_module
from timm.models.resnet import ResNet as TimmResNet
from torch import nn

from ..layers import CovPool, SoViTHead, build_head, get_head, list_heads
from ..layers.sovit_head import MultiHeadCrossCov
from ..linalg._checks import check_bool, check_int, check_keywords, is_int
from ._common import check_num_classes, check_vector_output, set_last_stride
from .resnet_isqrt import ISqrtResNet

__all__ = ["swap_pooling", "SecondOrderNet", "TokenCovPool"]

ModelT = TypeVar("ModelT", bound=nn.Module)

_TIMM_HOOKS = ("forward_features", "forward_head", "reset_classifier")
_TOKEN_OPTIONS = ("use_class_token", "num_prefix_tokens")  # TokenCovPool's own, besides the head's
_CLASSIFIER_NAMES = ("fc", "classifier", "head")
_SUPPORTED = (
    "timm models with forward_features/forward_head/reset_classifier whose unpooled features are "
    "(B, C, H, W) maps or (B, N, C) tokens (CNNs, ViTs, ...), and torchvision classification models with a "
    "global `avgpool` and a linear `fc`/`classifier`/`head` (resnet, resnext, wide_resnet, regnet, convnext, "
    "efficientnet, mobilenet, swin, ...)"
)


@register_notrace_module  # checks its input's shape in Python: a leaf for timm's FX tracer
class TokenCovPool(nn.Module):
    """Second-order pooling of a transformer's tokens, the So-ViT recipe on any timm ViT.

    Xie et al., "So-ViT: Mind Visual Tokens for Vision Transformer", arXiv:2104.10935: classify from the
    class token *and* the second-order statistics of the patch ("visual") tokens. The pooling is the head
    ``head`` (:func:`covpool.build_head`: :class:`covpool.CovPool` for the covariance heads, SoT's
    multi-headed cross-covariance for ``"sot"``) on the tokens after the model's ``num_prefix_tokens`` prefix
    tokens (class, distillation and register tokens are not image positions); the class token, when the model
    has one, is concatenated in front, so one linear layer on the output is So-ViT's (and SoT's) sum of a
    class-token and a covariance classifier.

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
        self.pool = build_head(head, embed_dim, **{"layout": "tokens", **options})
        check_vector_output(self.pool)
        self.head = head
        self.embed_dim = embed_dim
        self.num_prefix_tokens = num_prefix_tokens
        self.use_class_token = use_class_token
        self.out_features = self.pool.out_features + (embed_dim if self.use_class_token else 0)

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


def _make_pool(pool_kind: str, in_channels: int, options: dict[str, Any]) -> nn.Module:
    """The pooling of a :class:`SecondOrderNet`: ``options`` are ``head`` and its options (and, for tokens,
    :class:`TokenCovPool`'s)."""
    if pool_kind == "tokens":
        return TokenCovPool(in_channels, **options)
    if any(k in options for k in _TOKEN_OPTIONS):
        raise ValueError("use_class_token / num_prefix_tokens are options of token models (ViTs) only")
    return _build_pool(in_channels, options)


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
    """

    def __init__(self, backbone: nn.Module, pool_kind: str, in_channels: int, num_classes: int,
                 pool_options: dict[str, Any], channels_last: bool = False) -> None:
        super().__init__()
        if pool_kind not in ("maps", "tokens"):
            raise ValueError(f"pool_kind must be 'maps' or 'tokens', got {pool_kind!r}")
        check_num_classes(num_classes)
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
        return _make_pool(self.pool_kind, self.in_channels, copy.deepcopy(self.pool_options))

    def _set_head(self, pool: nn.Module, num_classes: int) -> None:
        ref = next(self.backbone.parameters(), None)
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
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
        """Unpooled features (the backbone's head after ``reset_classifier(0, '')``) → covariance → ``fc``."""
        x = self.backbone.forward_head(x, pre_logits=True)
        if isinstance(self.global_pool, nn.Identity):
            return x
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def swap_pooling(model: nn.Module, *, head: str = "isqrt_cov", last_stride: int | None = None,
                 **covpool_options: Any) -> nn.Module:
    """Replace a model's global pooling and classifier with a second-order head (iSQRT-COV by default).

    Li et al., "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square
    Root Normalization", CVPR 2018 (maps); Xie et al., "So-ViT", arXiv:2104.10935 (tokens); ``head`` picks
    another of the family (:func:`covpool.list_heads`). The backbone's weights are untouched; the pooling and
    a linear classifier with the model's class count are new.

    - timm ``ResNet`` (resnet*, resnet*d, resnext*, seresnet*, ...): becomes, in place, a
      :class:`covpool.models.resnet_isqrt.ISqrtResNet` (the class of ``resnet50_isqrt``).
    - Any other timm model: returned wrapped in a :class:`SecondOrderNet` (the original object becomes its
      ``backbone``). Feature maps ``(B, C, H, W)`` (``(B, H, W, C)`` for ``output_fmt="NHWC"`` models such as
      Swin) are pooled by :class:`covpool.CovPool`; transformers with timm's ``num_prefix_tokens`` (ViT,
      DeiT, EVA, ...) by :class:`TokenCovPool`: covariance of the patch tokens, prefix tokens skipped, with
      the class token concatenated (So-ViT's head). The pooling reads timm's unpooled features, i.e. the
      backbone's ``forward_head(x, pre_logits=True)`` after its ``reset_classifier(0, '')``, so a final norm
      or head convolution that lives in the head (ConvNeXt, MobileNetV3) stays in use.
    - torchvision models with a global ``avgpool`` and a linear ``fc``/``classifier``/``head``: ``avgpool``
      becomes the :class:`covpool.CovPool` and the classifier its dropout layers plus a new linear layer
      (other layers of the old classifier, e.g. ConvNeXt's LayerNorm2d, are dropped: the covariance
      reduction has its own BatchNorm); torchvision's ``forward`` is unchanged. Changed in place.

    timm's API keeps working on the result: ``num_features`` (what ``forward_features`` returns),
    ``head_hidden_size`` (the covariance width), ``forward_head(x, pre_logits=True)``,
    ``reset_classifier(n)`` (keeps the covariance pooling) and ``(0, '')`` (unpooled), ``group_matcher`` and
    so ``timm.optim.create_optimizer_v2(model, layer_decay=...)`` (the new head is the last group),
    ``set_grad_checkpointing``, ``feature_info``, ``forward_intermediates`` and ``FeatureGetterNet``.

    Args:
        model: a timm model (see above) or a torchvision classification model.
        last_stride: ResNets only: stride of the last stage. ``None`` (default) keeps the model's; 1 removes
            its downsampling as iSQRT-COV does (14×14 instead of 7×7 features at 224², 4× the last stage's
            compute, a full-rank 256×256 covariance from 196 samples instead of 49); 2 asserts the usual stride.
        head: the second-order head, a name from :func:`covpool.list_heads`: ``"isqrt_cov"`` (default),
            ``"bcnn"``, ``"improved_bcnn"``, ``"mpn_cov"``, ``"cbp_ts"``, ``"cbp_rm"``, ``"dropcov"``, and for
            token models ``"sot"``.
        **covpool_options: the head's options (:class:`covpool.CovPool`'s), overriding the preset's, e.g.
            ``reduced_dim=256`` (default) and ``backend="ns"`` or ``{"name": "ns", "num_iters": 5}`` (default
            ``"ns"``); for token models also ``use_class_token`` (default: whether the model has one).

    Returns:
        The model with the new head: the same object, except for the timm models wrapped in a
        :class:`SecondOrderNet`, so always use the return value.

    Raises:
        TypeError: the model offers neither timm's hooks nor a torchvision ``avgpool`` + linear classifier
            (the message says which part is missing).
        ValueError: the model already uses covariance pooling, ``last_stride`` is invalid or given for a
            model other than a ResNet, or a pooling option is invalid (the model is then left unchanged).

    Example::

        >>> import timm, covpool
        >>> model = covpool.swap_pooling(timm.create_model("resnet18", num_classes=10), last_stride=1)
        >>> model.num_features, model.head_hidden_size, model.fc
        (512, 32896, Linear(in_features=32896, out_features=10, bias=True))
        >>> vit = covpool.swap_pooling(timm.create_model("vit_tiny_patch16_224", num_classes=10), reduced_dim=32)
        >>> type(vit).__name__, vit.num_features, vit.head_hidden_size  # class token + 32·33/2 covariance
        ('SecondOrderNet', 192, 720)
    """
    if last_stride is not None and (not is_int(last_stride) or last_stride not in (1, 2)):
        raise ValueError(f"last_stride must be None (keep the model's), 1 or 2, got {last_stride!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_pooling expects an nn.Module, one of {_SUPPORTED}; got {type(model).__name__}")
    if isinstance(model, (ISqrtResNet, SecondOrderNet)) or any(
            isinstance(m, (CovPool, TokenCovPool, SoViTHead, MultiHeadCrossCov)) for m in model.children()):
        raise ValueError(f"{type(model).__name__} already uses covariance pooling")
    # An unknown head lists the valid ones, and an unknown option names the closest, before anything changes.
    check_keywords("covpool.swap_pooling", covpool_options,
                   ["head", "last_stride", *get_head(head).keywords, *_TOKEN_OPTIONS])
    covpool_options = {"head": head, **covpool_options}
    if type(model) is TimmResNet:
        return _swap_timm_resnet(model, last_stride, covpool_options)
    if all(callable(getattr(model, hook, None)) for hook in _TIMM_HOOKS):
        return _swap_timm(model, last_stride, covpool_options)
    return _swap_torchvision(model, last_stride, covpool_options)


def _build_pool(in_channels: int, options: dict[str, Any]) -> nn.Module:
    """A map head (``options``: ``head`` and its options) whose output is a vector."""
    options = dict(options)
    name = options.pop("head", "isqrt_cov")
    if get_head(name).tokens_only:
        maps = ", ".join(h for h in list_heads() if not get_head(h).tokens_only)
        raise ValueError(f"head {name!r} pools transformer tokens (a timm ViT with num_prefix_tokens); this model "
                         f"gives feature maps: use one of {maps}")
    pool = build_head(name, in_channels, **options)
    check_vector_output(pool)
    return pool


def _check_resnet_stride(model: nn.Module, last_stride: int | None) -> None:
    if last_stride is not None and not isinstance(getattr(model, "layer4", None), nn.Sequential):
        raise ValueError(f"last_stride applies to ResNets (a `layer4` stage) only; {type(model).__name__} has "
                         "none: leave last_stride=None")


def _swap_timm_resnet(model: TimmResNet, last_stride: int | None, covpool_options: dict[str, Any]) -> ISqrtResNet:
    # Build (and so validate) everything before the first change, so a bad option leaves the model intact.
    pool = _build_pool(model.num_features, covpool_options)
    if last_stride is not None:
        set_last_stride(model, last_stride)
    # ISqrtResNet adds methods only (and the covpool_options it sets), so re-classing is exact, and the class
    # is importable, so the model still pickles.
    model.__class__ = ISqrtResNet
    model._install_covpool(pool)
    return model


def _swap_timm(model: nn.Module, last_stride: int | None, covpool_options: dict[str, Any]) -> SecondOrderNet:
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    _check_resnet_stride(model, last_stride)
    num_features = getattr(model, "num_features", None)
    if not is_int(num_features) or num_features < 1:
        raise TypeError(f"{kind} has timm's hooks but no integer num_features; swap_pooling supports {_SUPPORTED}")
    num_classes = model.num_classes
    prefix = getattr(model, "num_prefix_tokens", None)
    options = dict(covpool_options)
    if prefix is not None:
        pool_kind = "tokens"
        options.setdefault("num_prefix_tokens", prefix)
        options.setdefault("use_class_token", prefix > 0 and getattr(model, "cls_token", None) is not None)
    else:
        pool_kind = "maps"
    # Validate the options on a throw-away pool before the backbone's head is touched.
    _make_pool(pool_kind, num_features, copy.deepcopy(options))
    if last_stride is not None:  # a timm model with a ResNet's layer4 that is not timm's ResNet class
        set_last_stride(model, last_stride)
    try:
        model.reset_classifier(0, "")
    except Exception as err:
        raise TypeError(f"cannot give {kind} a second-order head: its reset_classifier(0, '') (timm's hook for "
                        f"unpooled features) failed with {type(err).__name__}: {err}") from err
    # After the reset, head_hidden_size is the width of the unpooled features forward_head returns (the
    # backbone's channels, or the head convolution's for MobileNetV3-like models).
    channels = getattr(model, "head_hidden_size", num_features)
    channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
    return SecondOrderNet(model, pool_kind, channels, num_classes, options, channels_last=channels_last)


def _find_classifier(model: nn.Module, kind: str) -> tuple[str, nn.Module, nn.Linear, int]:
    """The torchvision classifier attribute, its last linear layer and the channel count it expects."""
    for name in _CLASSIFIER_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            break
    else:
        raise TypeError(f"{kind} has an `avgpool` but no classifier named one of {_CLASSIFIER_NAMES}; "
                        f"swap_pooling supports {_SUPPORTED}")
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    others = [type(m).__name__ for m in head.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    if not linears or others:
        raise TypeError(f"{kind}.{name} is not a linear classifier (found {others or 'no nn.Linear'}); "
                        f"swap_pooling supports {_SUPPORTED}")
    # The first linear layer reads the pooled channels (MobileNetV3 has a hidden layer before the last).
    return name, head, linears[-1], linears[0].in_features


def _swap_torchvision(model: ModelT, last_stride: int | None, covpool_options: dict[str, Any]) -> ModelT:
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    avgpool = getattr(model, "avgpool", None)
    if not isinstance(avgpool, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        missing = ", ".join(h for h in _TIMM_HOOKS if not callable(getattr(model, h, None)))
        raise TypeError(f"swap_pooling supports {_SUPPORTED}; {kind} has neither timm's hooks (missing {missing}) "
                        "nor a torchvision `avgpool` (nn.AdaptiveAvgPool2d) to replace")
    if not (isinstance(avgpool, nn.AdaptiveAvgPool2d) and avgpool.output_size in (1, (1, 1))):
        raise TypeError(f"{kind}.avgpool is {avgpool}, not a global average pooling: its classifier reads a "
                        f"spatial grid that covariance pooling does not produce; swap_pooling supports {_SUPPORTED}")
    _check_resnet_stride(model, last_stride)
    name, head, last, channels = _find_classifier(model, kind)
    pool = _build_pool(channels, covpool_options)
    if last_stride is not None:
        set_last_stride(model, last_stride)
    ref = last.weight
    factory = {"device": ref.device, "dtype": ref.dtype}
    fc = nn.Linear(pool.out_features, last.out_features, bias=last.bias is not None, **factory)
    dropouts = [copy.deepcopy(m) for m in head.modules() if isinstance(m, nn.Dropout)]
    model.avgpool = pool.to(**factory).train(model.training)
    setattr(model, name, (nn.Sequential(*dropouts, fc) if dropouts else fc).train(model.training))
    return model
