"""iSQRT-COV ResNets: timm's ResNet with global covariance pooling and a Newton–Schulz matrix square root.

Li, Xie, Wang, Gao. "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square
Root Normalization." CVPR 2018 (arXiv:1712.01034).

The backbone is timm's :class:`~timm.models.resnet.ResNet` unchanged except that, as in the paper, the last
stage keeps stride 1 by default (14×14 features at 224², so the 256×256 covariance is estimated from 196
positions rather than 49, which would leave it rank-deficient). Global average pooling is replaced by
:class:`covpool.CovPool` (1×1 conv + BN + ReLU to 256 channels, covariance, ``ns`` square root with 5
iterations, upper triangle: 32 896 features) and the classifier by a linear layer on that vector.

Weights (see the pretrained tags): the authors' fast-MPN-COV ImageNet models (``resnet50_isqrt`` and
``resnet101_isqrt``, default tag ``.mpncov_in1k``) are on Google Drive / Baidu Cloud, which serve no direct
downloads: download the file and load it with ``pretrained_cfg_overlay=dict(file=path)``; ``pretrained=True``
without a file raises and says where they are. The ``.tv_in1k`` / ``.a1_in1k`` tags are timm's plain ResNet
weights, backbone only (``num_classes=0`` as timm marks such weights): the covariance head starts fresh.
:func:`checkpoint_filter_fn` reads timm, torchvision, covpool and both fast-MPN-COV layouts (model zoo and
its ``main.py`` training checkpoints).

Initialisation: ``official_init=True`` (the default, the paper's recipe) keeps every BatchNorm at one (no
zero-init of the last BatchNorm of each block, timm's default) and draws the 1×1 reduction convolution
Kaiming-normal (fan-out) like the rest of the network; ``official_init=False`` gives timm's ResNet recipe.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ..layers import CovPool
from ..linalg._checks import is_int
from ._common import (
    check_num_classes,
    keep_fitting_classifier,
    replace_prefix,
    require_weights,
    set_last_stride,
    unwrap_checkpoint,
    with_model_head,
)
from .second_order import _build_pool, _head_spec

__all__ = ["ISqrtResNet", "checkpoint_filter_fn"]

# CovPool checks its input's layout in Python, which symbolic tracing cannot follow: a leaf for timm's FX
# tracer (torchvision feature extraction with timm's leaf modules, ``features_only=True, feature_cls="fx"``).
register_notrace_module(CovPool)

_HEAD_PREFIXES = ("global_pool.", "fc.")
_REDUCE_CONV, _REDUCE_BN, _FC = "global_pool.reduce.conv.", "global_pool.reduce.bn.", "fc."
# fast-MPN-COV (the iSQRT-COV authors' code), model zoo (mpncovresnet50/101-*.pth): names of the reduction.
_AUTHORS_KEYS = (("layer_reduce_bn.", _REDUCE_BN), ("layer_reduce.", _REDUCE_CONV))
# fast-MPN-COV main.py checkpoints: the network is split into features (an nn.Sequential of the ResNet's
# children, wrapped in DataParallel: features.module.N), representation (MPNCOV, whose conv_dr_block holds
# the reduction when trained from scratch) and classifier. Children: conv1, bn1, relu, maxpool, layer1-4,
# and for the fine-tuned mpncovresnet also layer_reduce, layer_reduce_bn.
_MAIN_FEATURES = {0: "conv1.", 1: "bn1.", 4: "layer1.", 5: "layer2.", 6: "layer3.", 7: "layer4.",
                  8: _REDUCE_CONV, 9: _REDUCE_BN}
_MAIN_FEATURE_KEY = re.compile(r"^features\.(?:module\.)?(\d+)\.(.+)$")
_MAIN_PREFIXES = (("representation.conv_dr_block.0.", _REDUCE_CONV), ("representation.conv_dr_block.1.", _REDUCE_BN),
                  ("classifier.", _FC))


_POOL_TYPES = ("cov", "")


def _check_global_pool(global_pool: str | None) -> None:
    if global_pool is not None and global_pool not in _POOL_TYPES:
        raise ValueError(
            f"global_pool={global_pool!r} is not supported: use 'cov' (covariance pooling, this model's head), "
            "'' (no pooling: unpooled feature maps, timm's convention) or None (keep the current one); build "
            "timm's plain ResNet for average pooling"
        )


class ISqrtResNet(ResNet):
    """timm ResNet with iSQRT-COV covariance pooling in place of global average pooling.

    Everything but the head is timm's :class:`~timm.models.resnet.ResNet` (same parameter names, so timm and
    torchvision ResNet checkpoints load into the backbone). ``global_pool`` is a :class:`covpool.CovPool`
    and ``fc`` a linear layer on its ``out_features``-dim output.

    timm's model contract holds as for timm's own ResNet: ``num_features`` is the channel count that
    ``forward_features`` returns (512 for ResNet-18, 2048 for ResNet-50), ``head_hidden_size`` the width of
    ``forward_head(x, pre_logits=True)`` (the covariance vector, 32 896 by default), ``global_pool=''`` or
    ``reset_classifier(0, '')`` give the unpooled feature map (what ``features_only`` and
    ``prune_intermediate_layers`` rely on), and ``reset_classifier(n)`` keeps the covariance pooling.

    Args:
        block: timm's residual block class, ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50 and
            deeper), as timm's ResNet takes it.
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        num_classes: outputs of ``fc``; 0: no classifier, ``forward`` returns the covariance vector
            ``(B, head_hidden_size)``.
        last_stride: stride of the last stage, 1 (iSQRT-COV, default) or 2 (the plain ResNet's).
        global_pool: ``None`` or ``"cov"`` (covariance pooling), or ``""`` (no pooling and no classifier:
            ``num_classes`` must be 0 and ``forward`` returns the feature map).
        reduced_dim: channels of the head's 1×1 reduction (default 256; ``None`` keeps the backbone width).
        backend: the square root's backend, a name or a dict such as ``{"name": "ns", "num_iters": 5}``, passed
            down untouched; None: the head's (``ns``). A head without a square root refuses one.
        **kwargs: the rest go to timm's ResNet: ``in_chans``, ``drop_rate`` (here the dropout on the covariance
            vector before ``fc``), ``stem_type``, ``zero_init_last``, ``device``, ``dtype``, ...

    Raises:
        ValueError: ``num_classes``, ``last_stride`` or ``global_pool`` is invalid, ``global_pool=""`` comes
            with ``num_classes > 0``, a head option is invalid, or ``backend`` is given to a head without a
            square root.

    The head is the registered head :attr:`covpool_head` (``"isqrt_cov"``; a subclass names another).

    Shapes: input ``(B, in_chans, H, W)``; ``forward_features`` → ``(B, num_features, H/16, W/16)`` at
    ``last_stride=1`` (``H/32`` at 2); ``forward`` → ``(B, num_classes)``.
    """

    def __init__(
            self,
            block: type[nn.Module],
            layers: tuple[int, ...],
            num_classes: int = 1000,
            *,
            last_stride: int = 1,
            global_pool: str | None = None,
            reduced_dim: int | None = 256,
            backend: str | Mapping[str, Any] | None = None,
            **kwargs: Any,
    ) -> None:
        check_num_classes(num_classes)
        _check_global_pool(global_pool)
        if not is_int(last_stride) or last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
        spec = _head_spec(self.covpool_head, reduced_dim, backend)
        # timm annotates block as an instance (BasicBlock | Bottleneck); it takes the class, as its builders pass.
        super().__init__(block, layers, num_classes=num_classes, **kwargs)  # type: ignore[arg-type]
        set_last_stride(self, last_stride)
        self._install_covpool(_build_pool("maps", self.num_features, spec), spec)
        if global_pool == "":
            self.reset_classifier(num_classes, "")

    #: the registered head this class builds (:func:`covpool.list_heads`)
    covpool_head: str = "isqrt_cov"

    def _install_covpool(self, pool: nn.Module, spec: Mapping[str, Any]) -> None:
        """Make ``pool`` the global pooling and size a fresh ``fc`` to its output (used at construction and
        by :func:`covpool.swap_pooling` on a timm ResNet); ``spec``, the head's name and options, is what a later
        ``reset_classifier(n, 'cov')`` rebuilds it from once ``''`` has dropped it."""
        self.covpool_options = copy.deepcopy(dict(spec))
        self._set_head(pool, self.num_classes)

    def _set_head(self, pool: nn.Module, num_classes: int) -> None:
        ref = next(self.parameters())
        self.global_pool = pool.to(device=ref.device, dtype=ref.dtype).train(self.training)
        self.head_hidden_size = getattr(pool, "out_features", self.num_features)
        self.num_classes = num_classes
        self.fc = (
            nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0 else nn.Identity()
        )
        self.fc.train(self.training)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace ``fc`` by a fresh linear layer with ``num_classes`` outputs (``nn.Identity`` for 0).

        ``global_pool``: ``None`` keeps the current pooling (a trained :class:`covpool.CovPool` is kept; a
        classifier on unpooled features brings covariance pooling back), ``"cov"`` covariance pooling (a fresh
        one if there was none), ``""`` none: with ``num_classes=0`` ``forward`` then returns the unpooled
        ``(B, num_features, H, W)`` map, as timm's models do.
        """
        check_num_classes(num_classes)
        _check_global_pool(global_pool)
        pooled = not isinstance(self.global_pool, nn.Identity)
        pool_type = ("cov" if pooled or num_classes > 0 else "") if global_pool is None else global_pool
        if pool_type == "" and num_classes > 0:
            raise ValueError(
                f"reset_classifier({num_classes}, ''): unpooled features have no classifier; pass num_classes=0 "
                "for feature maps, or global_pool='cov' (or None) to classify the covariance"
            )
        if pool_type == "":
            pool: nn.Module = nn.Identity()
        elif pooled:
            pool = self.global_pool
        else:
            pool = _build_pool("maps", self.num_features, self.covpool_options)
        self._set_head(pool, num_classes)


def _rename_authors_key(key: str) -> str:
    match = _MAIN_FEATURE_KEY.match(key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        if index not in _MAIN_FEATURES:
            raise ValueError(f"unexpected fast-MPN-COV feature index in {key!r} (known: {sorted(_MAIN_FEATURES)})")
        return _MAIN_FEATURES[index] + rest
    return replace_prefix(key, _AUTHORS_KEYS + _MAIN_PREFIXES) or key


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: ISqrtResNet) -> dict[str, torch.Tensor]:
    """Map a timm, torchvision, covpool or fast-MPN-COV ResNet checkpoint onto an :class:`ISqrtResNet`.

    timm's and torchvision's ResNets name their parameters alike (``conv1``, ``bn1``, ``layerN.M.*``,
    ``fc``), so the backbone maps one to one. A checkpoint without a covariance head (no ``global_pool.*``)
    is a plain ResNet: its ``fc`` is for 2048/512 pooled features, so the head and classifier keep the
    model's fresh initialisation and the backbone still loads strictly. A covpool checkpoint passes
    through whole to a model with a covariance head of its width (timm then drops its classifier if the class
    count differs, as for any timm model); a model built without head (``global_pool=''``) drops it.

    The iSQRT-COV authors' fast-MPN-COV layouts, raw or as a training checkpoint (``state_dict`` entry,
    DataParallel ``module.`` prefixes):

    - model zoo (``mpncovresnet50/101-*.pth``): ResNet names plus ``layer_reduce`` / ``layer_reduce_bn``;
    - ``main.py`` checkpoints: ``features.module.N.*`` (N = 0 conv1, 1 bn1, 4–7 layer1–4, 8/9 the reduction
      of a fine-tuned mpncovresnet), ``representation.conv_dr_block.{0,1}.*`` (the reduction when trained
      from scratch) and ``classifier.*``.

    Args:
        state_dict: the checkpoint, a state dict or a training checkpoint holding one, in any of these layouts.
        model: the model it loads into; its freshly initialised head fills in what a plain ResNet lacks.

    Returns:
        The state dict in covpool's names, for ``model.load_state_dict`` (timm's ``pretrained_filter_fn``).

    Raises:
        ValueError: a fast-MPN-COV ``features.N`` key has an index outside the ResNet's children, or the
            checkpoint's reduction has another width than the model's (the message gives the ``reduced_dim``).
    """
    return _fit_head({_rename_authors_key(k): v for k, v in unwrap_checkpoint(state_dict).items()}, model)


def _fit_head(state_dict: dict[str, torch.Tensor], model: ISqrtResNet) -> dict[str, torch.Tensor]:
    """The head half of the ResNet checkpoint filters (this module's and DropCov's), on a state dict already in
    covpool's names: a checkpoint's covariance head passes through to a model that has one (of the same
    reduction width); otherwise, a plain ResNet's checkpoint or a model built without head
    (``global_pool=''``), the checkpoint's head gives way to the model's own.

    Raises:
        ValueError: the checkpoint's reduction has another width than the model's (the message gives the
            ``reduced_dim`` to build it with).
    """
    pool = model.global_pool
    if not (isinstance(pool, CovPool) and any(k.startswith("global_pool.") for k in state_dict)):
        return with_model_head(state_dict, model, _HEAD_PREFIXES)
    reduce = state_dict.get("global_pool.reduce.conv.weight")
    if reduce is not None and pool.reduced_dim is not None and reduce.shape[0] != pool.reduced_dim:
        raise ValueError(f"the checkpoint reduces to {reduce.shape[0]} channels but the model to {pool.reduced_dim}: "
                         f"build it with reduced_dim={reduce.shape[0]}")
    return state_dict


def _build_isqrt_resnet(official_init: bool = True, **kwargs: Any) -> ISqrtResNet:
    # The fast-MPN-COV recipe differs from timm's ResNet initialisation in two places: no zero-init of the
    # last BatchNorm of each block, and a Kaiming-normal (fan-out) reduction convolution, like every other
    # convolution (PyTorch's default otherwise). Done before timm loads any pretrained weights.
    kwargs.setdefault("zero_init_last", not official_init)
    model = ISqrtResNet(**kwargs)
    if official_init:
        with torch.no_grad():
            for pool in (m for m in model.modules() if isinstance(m, CovPool)):
                for conv in (m for m in pool.modules() if isinstance(m, nn.Conv2d)):
                    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return model


def _create_isqrt_resnet(variant: str, pretrained: bool = False, official_init: bool = True,
                         **kwargs: Any) -> ISqrtResNet:
    if pretrained:
        require_weights(variant, kwargs)
        # a local file keeps a classifier that fits, in the authors' layouts too
        kwargs = keep_fitting_classifier(variant, kwargs, rename=_rename_authors_key)
    # A fresh dict per call: the backend spec is handed down and must not be shared between models.
    kwargs.setdefault("backend", {"name": "ns", "num_iters": 5})
    return build_model_with_cfg(
        partial(_build_isqrt_resnet, official_init=official_init),
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (14, 14),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc",
        "paper_ids": "arXiv:1712.01034",
        "paper_name": "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix "
                      "Square Root Normalization",
        **kwargs,
    }


_BACKBONE_ONLY = ("timm's plain ResNet weights: backbone only (num_classes=0); the covariance head and any "
                  "classifier start fresh.",)


def _tv_cfg(resnet_tag: str) -> dict[str, Any]:
    return _cfg(hf_hub_id=f"timm/{resnet_tag}", license="bsd-3-clause", num_classes=0, notes=_BACKBONE_ONLY)


def _rsb_cfg(resnet_tag: str) -> dict[str, Any]:
    return _cfg(
        hf_hub_id=f"timm/{resnet_tag}", license="apache-2.0", num_classes=0, notes=_BACKBONE_ONLY,
        interpolation="bicubic", crop_pct=0.95,
    )


def _release_cfg(depth: int, drive_id: str, baidu: str, top1: float) -> dict[str, Any]:
    # No url: Google Drive and Baidu Cloud serve no direct downloads, and the model-zoo host of fast-MPN-COV's
    # code (jtxie.com) is not a reliable source; the builder raises with these notes unless given a file.
    return _cfg(
        origin_url="https://github.com/jiangtaoxie/fast-MPN-COV",
        notes=(f"The iSQRT-COV authors' ImageNet-1k mpncovresnet{depth} (fast-MPN-COV, {top1}% top-1 reproduced "
               f"per their README), full model with classifier. Download it from "
               f"https://drive.google.com/open?id={drive_id} or https://pan.baidu.com/s/{baidu} (no direct "
               "downloads).",),
    )


default_cfgs = generate_default_cfgs({
    "resnet18_isqrt.tv_in1k": _tv_cfg("resnet18.tv_in1k"),
    "resnet18_isqrt.a1_in1k": _rsb_cfg("resnet18.a1_in1k"),
    "resnet50_isqrt.tv_in1k": _tv_cfg("resnet50.tv_in1k"),
    "resnet50_isqrt.a1_in1k": _rsb_cfg("resnet50.a1_in1k"),
    "resnet101_isqrt.tv_in1k": _tv_cfg("resnet101.tv_in1k"),
    "resnet101_isqrt.a1h_in1k": _rsb_cfg("resnet101.a1h_in1k"),
    # '*' makes these the default tags (listed after the weighted ones, which timm would otherwise put first):
    # the 1000-class model, whose released weights (50/101) need a downloaded file.
    "resnet18_isqrt.untrained*": _cfg(notes=("No released iSQRT-COV ResNet-18; '.tv_in1k' / '.a1_in1k' are "
                                             "timm's ResNet-18 backbones.",)),
    "resnet50_isqrt.mpncov_in1k*": _release_cfg(50, "19TWen7p9UDyM0Ueu9Gb22NtouR109C6j", "17TxANPJg_j2VyYgXV05OOQ",
                                                78.29),
    "resnet101_isqrt.mpncov_in1k*": _release_cfg(101, "1riur7v3rZ7vnrdj2UZ7EBaTKEGSccYwg",
                                                 "1_H8MosgzPH0BBmlKw2sr5A", 79.01),
})


@register_model
def resnet18_isqrt(pretrained: bool = False, **kwargs: Any) -> ISqrtResNet:
    """iSQRT-COV ResNet-18 (32 896-dim covariance head, last stage at stride 1).

    Args:
        pretrained: load the tag's weights: the default ``.untrained`` has none (no iSQRT-COV ResNet-18 was released)
            and raises; ``.tv_in1k`` / ``.a1_in1k`` load timm's ResNet-18 backbone, the head starting fresh.
        **kwargs: the arguments of :class:`ISqrtResNet` (``num_classes``, ``last_stride``, ``reduced_dim``, ``backend``,
            default ``{"name": "ns", "num_iters": 5}``, and timm's ResNet options), ``official_init`` (default True: the
            paper's initialisation, see the module doc) and timm's builder options (``pretrained_cfg_overlay``,
            ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_isqrt_resnet("resnet18_isqrt", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_isqrt(pretrained: bool = False, **kwargs: Any) -> ISqrtResNet:
    """iSQRT-COV ResNet-50 (32 896-dim covariance head, last stage at stride 1).

    Args:
        pretrained: load the tag's weights: the default ``.mpncov_in1k``, the authors' ImageNet model, needs a
            downloaded file (``pretrained_cfg_overlay=dict(file=path)``) and raises without one; ``.tv_in1k`` /
            ``.a1_in1k`` load timm's ResNet-50 backbone, the head starting fresh.
        **kwargs: the arguments of :class:`ISqrtResNet` (``num_classes``, ``last_stride``, ``reduced_dim``, ``backend``,
            default ``{"name": "ns", "num_iters": 5}``, and timm's ResNet options), ``official_init`` (default True: the
            paper's initialisation, see the module doc) and timm's builder options (``pretrained_cfg_overlay``,
            ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_isqrt_resnet("resnet50_isqrt", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_isqrt(pretrained: bool = False, **kwargs: Any) -> ISqrtResNet:
    """iSQRT-COV ResNet-101 (32 896-dim covariance head, last stage at stride 1).

    Args:
        pretrained: load the tag's weights: the default ``.mpncov_in1k``, the authors' ImageNet model, needs a
            downloaded file (``pretrained_cfg_overlay=dict(file=path)``) and raises without one; ``.tv_in1k`` /
            ``.a1h_in1k`` load timm's ResNet-101 backbone, the head starting fresh.
        **kwargs: the arguments of :class:`ISqrtResNet` (``num_classes``, ``last_stride``, ``reduced_dim``, ``backend``,
            default ``{"name": "ns", "num_iters": 5}``, and timm's ResNet options), ``official_init`` (default True: the
            paper's initialisation, see the module doc) and timm's builder options (``pretrained_cfg_overlay``,
            ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3))
    return _create_isqrt_resnet("resnet101_isqrt", pretrained, **dict(model_args, **kwargs))
