"""DropCov ResNets: timm's ResNet with adaptive channel dropout before a plain covariance pooling.

Wang, Gao, Zhang, Xie, Li, Hu. "DropCov: A Simple yet Effective Method for Improving Deep Architectures."
NeurIPS 2022. Reproduces the authors' ``resnet{18,34,50,101,152}_ACD`` (github.com/mingzeG/DropCov,
``CNNs/models/ResNet_ACD.py``), whose ImageNet checkpoints load through :func:`checkpoint_filter_fn`:

- timm's :class:`~timm.models.resnet.ResNet` (the authors' file is torchvision's ResNet, same names) with the
  last stage at stride 1 as theirs, so the covariance comes from 14×14 positions at 224²;
- the ``dropcov`` head of :func:`covpool.build_head`: 1×1 conv → BatchNorm → ReLU to ``reduced_dim``
  channels; in training only, the adaptive channel dropout
  (:class:`~covpool.layers.AdaptiveChannelDrop`: their ``eca_layer`` and ``balance_rate``);
  the covariance, not normalised, as its upper triangle; a linear classifier on that vector. At inference the
  dropout is the identity and the network is a plain covariance-pooling ResNet.

Reduction width. The repository's code reduces to 256 channels, but the parameter counts that its README gives
next to the released checkpoints (29.6 / 32.0 / 51.0 M for ResNet-34 / 50 / 101) are those of a 128-channel
reduction: 29.61 / 32.03 / 51.02 M, against 54.31 / 56.93 / 75.92 M at 256 (their model with the width
changed, parameters counted). A 128-channel reduction and its 8 256-feature classifier are therefore the
default (``reduced_dim=128``), the layout the released weights have; ``reduced_dim=256`` builds the code as
committed (32 896 features) and loads checkpoints trained with it. A checkpoint of the other width is refused
with the ``reduced_dim`` it needs.

Weights: the authors' ResNet-34/50/101 (default tag ``.dropcov_in1k``) are on Google Drive, which serves no
direct downloads: download the file and load it with ``pretrained_cfg_overlay=dict(file=path)``;
``pretrained=True`` without a file raises and says where they are. ``.tv_in1k`` tags are timm's copies of
torchvision's ResNet weights, backbone only (``num_classes=0``): the head starts fresh.

Initialisation: ``official_init=True`` (default, the authors' recipe) keeps every BatchNorm at one (timm
zero-initialises the last one of each block) and draws the reduction convolution Kaiming-normal (fan-out)
like every other convolution; ``official_init=False`` gives timm's ResNet recipe.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from ..layers import CovPool
from ._common import keep_fitting_classifier, replace_prefix, require_weights, unwrap_checkpoint
from .resnet_isqrt import ISqrtResNet, _fit_head

__all__ = ["DropCovResNet", "checkpoint_filter_fn"]

# The authors' names (ResNet_ACD) for what covpool keeps in the pooling module; the rest is torchvision's.
_AUTHORS_KEYS = (
    ("layer_reduce_bn.", "global_pool.reduce.bn."),
    ("layer_reduce.", "global_pool.reduce.conv."),
    ("eca_layer.conv.", "global_pool.drop.conv."),
)


class DropCovResNet(ISqrtResNet):
    """timm ResNet with DropCov's head: adaptive channel dropout (training only) before a plain covariance.

    An :class:`~covpool.models.resnet_isqrt.ISqrtResNet` whose pooling is the ``dropcov`` preset of
    :func:`covpool.build_head` rather than iSQRT-COV's, so timm's model contract holds as there:
    ``num_features`` is the backbone width that ``forward_features`` returns (512 or 2048),
    ``head_hidden_size`` the covariance vector's width (8 256 at ``reduced_dim=128``), ``global_pool=''`` /
    ``reset_classifier(0, '')`` give the unpooled map, ``reset_classifier(n)`` keeps the trained pooling.

    Args:
        block: timm's residual block class, ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50 and
            deeper).
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-34 and ResNet-50.
        num_classes: outputs of ``fc``; 0: no classifier, ``forward`` returns the covariance vector
            ``(B, head_hidden_size)``.
        reduced_dim: channels after the 1×1 reduction: 128 (default, the released checkpoints), 256 (the
            repository's code) or None (the backbone's channels).
        last_stride: stride of the last stage, 1 (the authors', default) or 2.
        global_pool: ``None`` or ``"cov"`` (the DropCov head), or ``""`` (no pooling and no classifier).
        backend: refused: the authors' covariance has no matrix normalisation (use ``resnet*_isqrt``, or
            :func:`covpool.swap_pooling` with ``head="dropcov", normalization="sqrt"``, for one).
        **kwargs: the rest go to timm's ResNet: ``in_chans``, ``drop_rate`` (here the dropout on the covariance
            vector before ``fc``; the authors use none), ``zero_init_last``, ``device``, ``dtype``, ...

    Raises:
        ValueError: ``num_classes``, ``last_stride``, ``global_pool`` or ``reduced_dim`` is invalid, or a
            ``backend`` is given.

    Shapes: input ``(B, in_chans, H, W)``; ``forward_features`` → ``(B, num_features, H/16, W/16)``;
    ``forward`` → ``(B, num_classes)``.
    """

    covpool_head = "dropcov"

    def __init__(
            self,
            block: type[nn.Module],
            layers: tuple[int, ...],
            num_classes: int = 1000,
            *,
            reduced_dim: int | None = 128,
            backend: str | Mapping[str, Any] | None = None,
            **kwargs: Any,
    ) -> None:
        super().__init__(block, layers, num_classes, reduced_dim=reduced_dim, backend=backend, **kwargs)


def _rename_authors_key(key: str) -> str:
    return replace_prefix(key, _AUTHORS_KEYS) or key


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: DropCovResNet) -> dict[str, torch.Tensor]:
    """Map a DropCov, covpool, timm or torchvision ResNet checkpoint onto a :class:`DropCovResNet`.

    The authors' ``main.py`` saves ``{"epoch", "arch", "state_dict", "best_acc1", "optimizer"}`` with the
    model wrapped in ``DataParallel`` (``module.`` prefixes); the weights are torchvision's ResNet names plus
    ``layer_reduce`` / ``layer_reduce_bn`` (the reduction), ``eca_layer.conv`` (the channel weights of the
    dropout) and ``fc``. A raw state dict loads the same way. A checkpoint without a covariance head (timm's or
    torchvision's ResNet) loads into the backbone, and the head keeps the model's fresh initialisation; a
    model without head (``global_pool=''``) drops the checkpoint's.

    Args:
        state_dict: the checkpoint, a state dict or a training checkpoint holding one (``state_dict`` entry).
        model: the model it loads into; its freshly initialised head fills in what a plain ResNet lacks.

    Returns:
        The state dict in covpool's names, for ``model.load_state_dict`` (timm's ``pretrained_filter_fn``).

    Raises:
        ValueError: the checkpoint's reduction has another width than the model's (build it with the
            ``reduced_dim`` the message gives).
    """
    return _fit_head({_rename_authors_key(k): v for k, v in unwrap_checkpoint(state_dict).items()}, model)


def _build_dropcov_resnet(official_init: bool = True, **kwargs: Any) -> DropCovResNet:
    # The authors' initialisation (torchvision's, without zero_init_residual) differs from timm's ResNet in two
    # places: no zero-init of the last BatchNorm of each block, and a Kaiming-normal (fan-out) reduction
    # convolution. The channel-weight Conv1d keeps PyTorch's default, as theirs.
    kwargs.setdefault("zero_init_last", not official_init)
    model = DropCovResNet(**kwargs)
    if official_init and isinstance(model.global_pool, CovPool):
        with torch.no_grad():
            for conv in (m for m in model.global_pool.modules() if isinstance(m, nn.Conv2d)):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return model


def _create_dropcov_resnet(variant: str, pretrained: bool = False, official_init: bool = True,
                           **kwargs: Any) -> DropCovResNet:
    if pretrained:
        require_weights(variant, kwargs)
        kwargs = keep_fitting_classifier(variant, kwargs, rename=_rename_authors_key)
    return build_model_with_cfg(
        partial(_build_dropcov_resnet, official_init=official_init),
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # The authors' evaluation transform (main.py): Resize(256), CenterCrop(224), torchvision's bilinear resize,
    # ImageNet mean and std.
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (14, 14),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc",
        "paper_ids": "https://openreview.net/forum?id=QLGuUwDx4S",
        "paper_name": "DropCov: A Simple yet Effective Method for Improving Deep Architectures",
        "origin_url": "https://github.com/mingzeG/DropCov",
        **kwargs,
    }


def _tv_cfg(resnet: str) -> dict[str, Any]:
    return _cfg(hf_hub_id=f"timm/{resnet}.tv_in1k", license="bsd-3-clause", num_classes=0,
                notes=("timm's copy of torchvision's ResNet weights: backbone only (num_classes=0); the DropCov "
                       "head and any classifier start fresh.",))


def _release_cfg(depth: int, drive_id: str, top1: float) -> dict[str, Any]:
    # No url: Google Drive serves no direct downloads; the builder raises with these notes unless given a file.
    return _cfg(notes=(
        f"The DropCov authors' ImageNet-1k ResNet-{depth} (resnet{depth}_ACD, reduced_dim=128), {top1}% top-1 per "
        f"their README, a main.py training checkpoint with classifier. Download it from "
        f"https://drive.google.com/file/d/{drive_id}/view (no direct downloads).",
    ))


def _untrained_cfg(depth: int, extra: str = "") -> dict[str, Any]:
    return _cfg(notes=(f"No released DropCov ResNet-{depth}{extra}; '.tv_in1k' is timm's ResNet-{depth} backbone.",))


default_cfgs = generate_default_cfgs({
    "resnet18_dropcov.tv_in1k": _tv_cfg("resnet18"),
    "resnet34_dropcov.tv_in1k": _tv_cfg("resnet34"),
    "resnet50_dropcov.tv_in1k": _tv_cfg("resnet50"),
    "resnet101_dropcov.tv_in1k": _tv_cfg("resnet101"),
    "resnet152_dropcov.tv_in1k": _tv_cfg("resnet152"),
    # '*' makes these the default tags: the 1000-class model, whose released weights need a downloaded file.
    "resnet18_dropcov.untrained*": _untrained_cfg(
        18, " (their README's evaluation example reports 73.5% top-1 for a ResNet-18 checkpoint it does not link)"),
    "resnet34_dropcov.dropcov_in1k*": _release_cfg(34, "1rAK-u85tYxhodTDBV_QuIjXFlxz7Ul2t", 76.81),
    "resnet50_dropcov.dropcov_in1k*": _release_cfg(50, "1235CUjS7va_h6weWQeAwFZ_J1iOqmaDm", 78.19),
    "resnet101_dropcov.dropcov_in1k*": _release_cfg(101, "1KJyAUXu11GFz6uLS1kGyZc1JM-pi-E37", 79.51),
    "resnet152_dropcov.untrained*": _untrained_cfg(152),
})


@register_model
def resnet18_dropcov(pretrained: bool = False, **kwargs: Any) -> DropCovResNet:
    """DropCov ResNet-18 (resnet18_ACD): 128-channel covariance (8 256 features), last stage at stride 1.

    Args:
        pretrained: load the tag's weights: the default ``.untrained`` has none (no DropCov ResNet-18 was released) and
            raises; ``.tv_in1k`` loads timm's ResNet-18 backbone, the head starting fresh.
        **kwargs: the arguments of :class:`DropCovResNet` (``num_classes``, ``reduced_dim``, ``last_stride`` and timm's
            ResNet options), ``official_init`` (default True: the authors' initialisation, see the module doc) and
            timm's builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_dropcov_resnet("resnet18_dropcov", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet34_dropcov(pretrained: bool = False, **kwargs: Any) -> DropCovResNet:
    """DropCov ResNet-34 (resnet34_ACD): 128-channel covariance (8 256 features), last stage at stride 1.

    Args:
        pretrained: load the tag's weights: the default ``.dropcov_in1k``, the authors' ImageNet model, needs a
            downloaded file (``pretrained_cfg_overlay=dict(file=path)``) and raises without one; ``.tv_in1k`` loads
            timm's ResNet-34 backbone, the head starting fresh.
        **kwargs: the arguments of :class:`DropCovResNet` (``num_classes``, ``reduced_dim``, ``last_stride`` and timm's
            ResNet options), ``official_init`` (default True: the authors' initialisation, see the module doc) and
            timm's builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3))
    return _create_dropcov_resnet("resnet34_dropcov", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_dropcov(pretrained: bool = False, **kwargs: Any) -> DropCovResNet:
    """DropCov ResNet-50 (resnet50_ACD): 128-channel covariance (8 256 features), last stage at stride 1.

    Args:
        pretrained: load the tag's weights: the default ``.dropcov_in1k``, the authors' ImageNet model, needs a
            downloaded file (``pretrained_cfg_overlay=dict(file=path)``) and raises without one; ``.tv_in1k`` loads
            timm's ResNet-50 backbone, the head starting fresh.
        **kwargs: the arguments of :class:`DropCovResNet` (``num_classes``, ``reduced_dim``, ``last_stride`` and timm's
            ResNet options), ``official_init`` (default True: the authors' initialisation, see the module doc) and
            timm's builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_dropcov_resnet("resnet50_dropcov", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_dropcov(pretrained: bool = False, **kwargs: Any) -> DropCovResNet:
    """DropCov ResNet-101 (resnet101_ACD): 128-channel covariance (8 256 features), last stage at stride 1.

    Args:
        pretrained: load the tag's weights: the default ``.dropcov_in1k``, the authors' ImageNet model, needs a
            downloaded file (``pretrained_cfg_overlay=dict(file=path)``) and raises without one; ``.tv_in1k`` loads
            timm's ResNet-101 backbone, the head starting fresh.
        **kwargs: the arguments of :class:`DropCovResNet` (``num_classes``, ``reduced_dim``, ``last_stride`` and timm's
            ResNet options), ``official_init`` (default True: the authors' initialisation, see the module doc) and
            timm's builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3))
    return _create_dropcov_resnet("resnet101_dropcov", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet152_dropcov(pretrained: bool = False, **kwargs: Any) -> DropCovResNet:
    """DropCov ResNet-152 (resnet152_ACD): 128-channel covariance (8 256 features), last stage at stride 1.

    Args:
        pretrained: load the tag's weights: the default ``.untrained`` has none (no DropCov ResNet-152 was released) and
            raises; ``.tv_in1k`` loads timm's ResNet-152 backbone, the head starting fresh.
        **kwargs: the arguments of :class:`DropCovResNet` (``num_classes``, ``reduced_dim``, ``last_stride`` and timm's
            ResNet options), ``official_init`` (default True: the authors' initialisation, see the module doc) and
            timm's builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(block=Bottleneck, layers=(3, 8, 36, 3))
    return _create_dropcov_resnet("resnet152_dropcov", pretrained, **dict(model_args, **kwargs))
