"""iSQRT-COV ResNets: timm's ResNet with global covariance pooling and a Newton–Schulz matrix square root.

Li, Xie, Wang, Gao. "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square
Root Normalization." CVPR 2018 (arXiv:1712.01034).

The backbone is timm's :class:`~timm.models.resnet.ResNet` unchanged except that, as in the paper, the last
stage keeps stride 1 by default (14×14 features at 224², so the 256×256 covariance is estimated from 196
positions rather than 49, which would leave it rank-deficient). Global average pooling is replaced by
:class:`covpool.CovPool` (1×1 conv + BN + ReLU to 256 channels, covariance, ``ns`` square root with 5
iterations, upper triangle: 32 896 features) and the classifier by a linear layer on that vector.

``pretrained=True`` loads timm's ImageNet ResNet weights into the backbone; the covariance head and the
classifier start fresh. ``pretrained_cfg_overlay=dict(file=path)`` loads a local timm, torchvision or
covpool checkpoint instead (with ``weights_only=True`` or safetensors, through timm's loader).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ..layers import CovPool
from ._common import check_num_classes, set_last_stride

__all__ = ["ISqrtResNet", "checkpoint_filter_fn"]

# CovPool checks its input's layout in Python, which symbolic tracing cannot follow: a leaf for timm's FX
# tracer (torchvision feature extraction with timm's leaf modules, ``features_only=True, feature_cls="fx"``).
register_notrace_module(CovPool)

_HEAD_PREFIXES = ("global_pool.", "fc.")
# fast-MPN-COV (the iSQRT-COV authors' code) names of the reduction layers -> CovPool's.
_AUTHORS_KEYS = (("layer_reduce_bn.", "global_pool.reduce.bn."), ("layer_reduce.", "global_pool.reduce.conv."))


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
        block, layers, num_classes, in_chans, drop_rate, ...: as timm's ResNet (``drop_rate`` is the dropout
            on the covariance vector before ``fc``).
        last_stride: stride of the last stage, 1 (iSQRT-COV, default) or 2 (the plain ResNet's).
        global_pool: ``None`` or ``"cov"`` (covariance pooling), or ``""`` (no pooling and no classifier:
            ``num_classes`` must be 0 and ``forward`` returns the feature map).
        **kwargs: the rest go to timm's ResNet; :class:`covpool.CovPool` options are ``reduced_dim``
            (default 256, ``None`` keeps the backbone width) and ``backend`` (a name or a dict such as
            ``{"name": "ns", "num_iters": 5}``, passed down untouched).

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
            backend: str | Mapping[str, Any] = "ns",
            **kwargs: Any,
    ) -> None:
        check_num_classes(num_classes)
        _check_global_pool(global_pool)
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
        super().__init__(block, layers, num_classes=num_classes, **kwargs)
        set_last_stride(self, last_stride)
        pool = CovPool(self.num_features, reduced_dim=reduced_dim, backend=backend)
        self._install_covpool(pool)
        if global_pool == "":
            self.reset_classifier(num_classes, "")

    def _install_covpool(self, pool: CovPool) -> None:
        """Make ``pool`` the global pooling and size a fresh ``fc`` to its output (used at construction and
        by :func:`covpool.swap_pooling` on a timm ResNet)."""
        if not pool.vectorize:
            raise ValueError("vectorize must be True: the classifier needs the covariance as a vector")
        # What a later reset_classifier(n, 'cov') rebuilds the pooling from once '' has dropped it.
        self.covpool_options = {"reduced_dim": pool.reduced_dim, "backend": copy.deepcopy(pool.backend)}
        self._set_head(pool, self.num_classes)

    def _set_head(self, pool: nn.Module, num_classes: int) -> None:
        ref = next(self.parameters())
        self.global_pool = pool.to(device=ref.device, dtype=ref.dtype).train(self.training)
        self.head_hidden_size = pool.out_features if isinstance(pool, CovPool) else self.num_features
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
        pooled = isinstance(self.global_pool, CovPool)
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
            options = self.covpool_options
            pool = CovPool(self.num_features, reduced_dim=options["reduced_dim"],
                           backend=copy.deepcopy(options["backend"]))
        self._set_head(pool, num_classes)


def _rename_authors_key(key: str) -> str:
    for old, new in _AUTHORS_KEYS:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: ISqrtResNet) -> dict[str, torch.Tensor]:
    """Map a timm, torchvision or covpool ResNet checkpoint onto an :class:`ISqrtResNet`.

    timm's and torchvision's ResNets name their parameters alike (``conv1``, ``bn1``, ``layerN.M.*``,
    ``fc``), so the backbone maps one to one. A checkpoint without a covariance head (no ``global_pool.*``)
    is a plain ResNet: its ``fc`` is for 2048/512 pooled features, so the head and classifier keep the
    model's fresh initialisation and the backbone still loads strictly. A covpool checkpoint passes
    through whole; timm then drops its classifier if the class count differs, as for any timm model.
    The authors' released ``mpncovresnet50/101`` checkpoints (fast-MPN-COV) name the reduction
    ``layer_reduce`` / ``layer_reduce_bn``; those keys are renamed onto ``global_pool.reduce``.
    """
    state_dict = {_rename_authors_key(k): v for k, v in state_dict.items()}
    if any(k.startswith("global_pool.") for k in state_dict):
        return state_dict
    own = model.state_dict()
    out = {k: v for k, v in state_dict.items() if not k.startswith(_HEAD_PREFIXES)}
    out.update((k, v) for k, v in own.items() if k.startswith(_HEAD_PREFIXES))
    return out


def _create_isqrt_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ISqrtResNet:
    # A fresh dict per call: the backend spec is handed down and must not be shared between models.
    kwargs.setdefault("backend", {"name": "ns", "num_iters": 5})
    return build_model_with_cfg(
        ISqrtResNet,
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
        "notes": ("Pretrained weights cover the ResNet backbone only; the covariance head and classifier "
                  "are freshly initialised.",),
        **kwargs,
    }


def _tv_cfg(resnet_tag: str) -> dict[str, Any]:
    return _cfg(hf_hub_id=f"timm/{resnet_tag}", license="bsd-3-clause")


def _rsb_cfg(resnet_tag: str) -> dict[str, Any]:
    return _cfg(
        hf_hub_id=f"timm/{resnet_tag}", license="apache-2.0",
        interpolation="bicubic", crop_pct=0.95,
    )


default_cfgs = generate_default_cfgs({
    "resnet18_isqrt.tv_in1k": _tv_cfg("resnet18.tv_in1k"),
    "resnet18_isqrt.a1_in1k": _rsb_cfg("resnet18.a1_in1k"),
    "resnet50_isqrt.tv_in1k": _tv_cfg("resnet50.tv_in1k"),
    "resnet50_isqrt.a1_in1k": _rsb_cfg("resnet50.a1_in1k"),
    "resnet101_isqrt.tv_in1k": _tv_cfg("resnet101.tv_in1k"),
    "resnet101_isqrt.a1h_in1k": _rsb_cfg("resnet101.a1h_in1k"),
})


@register_model
def resnet18_isqrt(pretrained: bool = False, **kwargs: Any) -> ISqrtResNet:
    """iSQRT-COV ResNet-18 (32 896-dim covariance head, last stage at stride 1)."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_isqrt_resnet("resnet18_isqrt", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_isqrt(pretrained: bool = False, **kwargs: Any) -> ISqrtResNet:
    """iSQRT-COV ResNet-50 (32 896-dim covariance head, last stage at stride 1)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_isqrt_resnet("resnet50_isqrt", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_isqrt(pretrained: bool = False, **kwargs: Any) -> ISqrtResNet:
    """iSQRT-COV ResNet-101 (32 896-dim covariance head, last stage at stride 1)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3))
    return _create_isqrt_resnet("resnet101_isqrt", pretrained, **dict(model_args, **kwargs))
