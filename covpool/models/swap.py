"""``swap_pooling``: put a second-order (covariance pooling) head on any timm or torchvision backbone.

Three routes, chosen by what the model offers rather than by its family:

- timm's ``ResNet`` becomes a :class:`~covpool.models.resnet_isqrt.ISqrtResNet` in place (the class of
  ``resnet50_isqrt``: same parameter names, so its checkpoints load into ``resnet*_isqrt`` and back);
- any other timm model (anything with timm's ``forward_features`` / ``forward_head`` / ``reset_classifier``
  hooks) is wrapped in a :class:`~covpool.models.SecondOrderNet`: the backbone's own ``reset_classifier(0, '')``
  turns its head into timm's "unpooled features" (keeping the final norm or head convolution that some
  families put there), and the wrapper pools those with the head's module (feature maps) or a
  :class:`~covpool.models.TokenCovPool` (transformer tokens) and classifies with a fresh linear layer;
- torchvision classification models with a global ``avgpool`` and a linear classifier (ResNet, ResNeXt,
  Wide ResNet, RegNet, ConvNeXt, EfficientNet, MobileNet, Swin, ...) get the :class:`covpool.CovPool` as their
  ``avgpool`` and a classifier sized to it; torchvision's ``forward`` is unchanged.

The model classes it builds live in :mod:`covpool.models.second_order` (until covpool 0.2 they were here; the old
path still imports, with a FutureWarning, for one release).
"""
from __future__ import annotations

import copy
from typing import Any, TypeVar

from timm.models.resnet import ResNet as TimmResNet
from torch import nn

from .._deprecation import moved_names
from ..layers import CovPool, MultiHeadCrossCov, SoViTHead, SvPNCrossCov, get_head, list_heads
from ..layers._common import Factory, out_features_of
from ..linalg._checks import check_keywords, is_int
from . import second_order
from ._common import set_last_stride
from .resnet_isqrt import ISqrtResNet

__all__ = ["swap_pooling"]

ModelT = TypeVar("ModelT", bound=nn.Module)


__getattr__ = moved_names(__name__, {name: (f"covpool.models.second_order:{name}", f"covpool.models.{name}")
                                     for name in ("SecondOrderNet", "TokenCovPool")})


_CLASSIFIER_NAMES = ("fc", "classifier", "head")
_SUPPORTED = (
    "timm models with forward_features/forward_head/reset_classifier whose unpooled features are "
    "(B, C, H, W) maps or (B, N, C) tokens (CNNs, ViTs, ...), and torchvision classification models with a "
    "global `avgpool` and a linear `fc`/`classifier`/`head` (resnet, resnext, wide_resnet, regnet, convnext, "
    "efficientnet, mobilenet, swin, ...)"
)


def swap_pooling(model: nn.Module, *, head: str = "isqrt_cov", last_stride: int | None = None,
                 **covpool_options: Any) -> nn.Module:
    """Replace a model's global pooling and classifier with a second-order head (iSQRT-COV by default).

    Li et al., "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square
    Root Normalization", CVPR 2018 (maps); Xie et al., "So-ViT", arXiv:2104.10935 (tokens); ``head`` picks
    another of the family (:func:`covpool.list_heads`). The backbone's weights are untouched; the pooling and
    a linear classifier with the model's class count are new.

    - timm ``ResNet`` (resnet*, resnet*d, resnext*, seresnet*, ...): becomes, in place, a
      :class:`covpool.models.resnet_isqrt.ISqrtResNet` (the class of ``resnet50_isqrt``).
    - Any other timm model: returned wrapped in a :class:`~covpool.models.SecondOrderNet` (the original object
      becomes its ``backbone``). Feature maps ``(B, C, H, W)`` (``(B, H, W, C)`` for ``output_fmt="NHWC"``
      models such as Swin) are pooled by the head's module (:class:`covpool.CovPool`); transformers with timm's
      ``num_prefix_tokens`` (ViT, DeiT, EVA, ...) by a :class:`~covpool.models.TokenCovPool`: the head on the
      patch tokens, prefix tokens skipped, with the class token concatenated (So-ViT's head). The pooling
      reads timm's unpooled features, i.e. the backbone's ``forward_head(x, pre_logits=True)`` after its
      ``reset_classifier(0, '')``, so a final norm or head convolution that lives in the head (ConvNeXt,
      MobileNetV3) stays in use.
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
            ``"bcnn"``, ``"improved_bcnn"``, ``"mpn_cov"``, ``"cbp_ts"``, ``"cbp_rm"``, ``"dropcov"``,
            ``"mpa_cov"``, for token models also ``"svpn"`` and ``"sot"``, and any head added with
            :func:`covpool.register_head`.
        **covpool_options: the head's options (its module's: :class:`covpool.CovPool`'s for the covariance
            heads), overriding the head's own, e.g.
            ``reduced_dim=256`` (default) and ``backend="ns"`` or ``{"name": "ns", "num_iters": 5}`` (default
            ``"ns"``); for token models also ``use_class_token`` (default: whether the model has one).

    Returns:
        The model with the new head: the same object, except for the timm models wrapped in a
        :class:`~covpool.models.SecondOrderNet`, so always use the return value.

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
    if isinstance(model, (ISqrtResNet, second_order.SecondOrderNet)) or any(
            isinstance(m, _pooling_types()) for m in model.children()):
        raise ValueError(f"{type(model).__name__} already uses covariance pooling")
    # An unknown head lists the valid ones, and an unknown option names the closest, before anything changes.
    check_keywords("covpool.swap_pooling", covpool_options,
                   ["head", "last_stride", *get_head(head).keywords, *second_order._TOKEN_OPTIONS])
    covpool_options = {"head": head, **covpool_options}
    if type(model) is TimmResNet:
        return _swap_timm_resnet(model, last_stride, covpool_options)
    wrapped = _swap_timm(model, last_stride, covpool_options)
    return wrapped if wrapped is not None else _swap_torchvision(model, last_stride, covpool_options)


def _check_resnet_stride(model: nn.Module, last_stride: int | None) -> None:
    if last_stride is not None and not isinstance(getattr(model, "layer4", None), nn.Sequential):
        raise ValueError(f"last_stride applies to ResNets (a `layer4` stage) only; {type(model).__name__} has "
                         "none: leave last_stride=None")


def _swap_timm_resnet(model: TimmResNet, last_stride: int | None, covpool_options: dict[str, Any]) -> ISqrtResNet:
    # Build (and so validate) everything before the first change, so a bad option leaves the model intact.
    pool = second_order._build_pool("maps", model.num_features, covpool_options)
    if last_stride is not None:
        set_last_stride(model, last_stride)
    # ISqrtResNet adds methods only (and the covpool_options it sets), so re-classing is exact, and the class
    # is importable, so the model still pickles.
    model.__class__ = ISqrtResNet
    assert isinstance(model, ISqrtResNet)  # re-classed just above
    model._install_covpool(pool, covpool_options)
    return model


def _swap_timm(model: nn.Module, last_stride: int | None,
               covpool_options: dict[str, Any]) -> second_order.SecondOrderNet | None:
    """``model`` wrapped in a :class:`SecondOrderNet`, or None when it lacks timm's hooks (not a timm model)."""
    if not second_order._has_timm_hooks(model):
        return None
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    _check_resnet_stride(model, last_stride)
    num_features = getattr(model, "num_features", None)
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
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
    second_order._build_pool(pool_kind, num_features, options)
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
    return second_order.SecondOrderNet(model, pool_kind, channels, num_classes, options, channels_last=channels_last)


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
        missing = ", ".join(h for h in second_order._TIMM_HOOKS if not callable(getattr(model, h, None)))
        raise TypeError(f"swap_pooling supports {_SUPPORTED}; {kind} has neither timm's hooks (missing {missing}) "
                        "nor a torchvision `avgpool` (nn.AdaptiveAvgPool2d) to replace")
    if not (isinstance(avgpool, nn.AdaptiveAvgPool2d) and avgpool.output_size in (1, (1, 1))):
        raise TypeError(f"{kind}.avgpool is {avgpool}, not a global average pooling: its classifier reads a "
                        f"spatial grid that covariance pooling does not produce; swap_pooling supports {_SUPPORTED}")
    _check_resnet_stride(model, last_stride)
    name, head, last, channels = _find_classifier(model, kind)
    pool = second_order._build_pool("maps", channels, covpool_options)
    if last_stride is not None:
        set_last_stride(model, last_stride)
    ref = last.weight
    factory: Factory = {"device": ref.device, "dtype": ref.dtype}
    fc = nn.Linear(out_features_of(pool, "swap_pooling"), last.out_features, bias=last.bias is not None, **factory)
    dropouts = [copy.deepcopy(m) for m in head.modules() if isinstance(m, nn.Dropout)]
    model.avgpool = pool.to(**factory).train(model.training)
    setattr(model, name, (nn.Sequential(*dropouts, fc) if dropouts else fc).train(model.training))
    return model


def _pooling_types() -> tuple[type, ...]:
    """The second-order pooling modules a model that already has such a head holds: covpool's and every class a
    registered head builds."""
    registered = (get_head(h).module for h in list_heads())
    return (CovPool, SvPNCrossCov, MultiHeadCrossCov, SoViTHead, second_order.TokenCovPool,
            *(m for m in registered if isinstance(m, type)))
