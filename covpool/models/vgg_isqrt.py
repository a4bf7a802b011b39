"""fast MPN-COV VGG-D: timm's VGG-16 (with BatchNorm) with iSQRT-COV covariance pooling.

Li, Xie, Wang, Gao. "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square
Root Normalization." CVPR 2018 (arXiv:1712.01034). Reproduces the authors' ``mpncovvgg16_bn``
(github.com/jiangtaoxie/fast-MPN-COV, ``src/network/mpncovvgg.py``), whose ImageNet weights load through
:func:`checkpoint_filter_fn`:

- the convolutions of VGG-16 with BatchNorm (timm's :class:`~timm.models.vgg.VGG`, same ``features.N``
  indices as torchvision's) without the last max pool: 512 channels at 14×14 for a 224² input;
- iSQRT-COV (:class:`covpool.CovPool`): 1×1 conv → BatchNorm → ReLU to 256 channels, covariance, Newton–Schulz
  square root (5 iterations), upper triangle: 32 896 features;
- VGG's classifier on that vector: Linear(32 896, 4096) → ReLU → Dropout → Linear(4096, 4096) → ReLU →
  Dropout → Linear(4096, classes), as ``pre_logits.fc1``, ``pre_logits.fc2`` and ``head.fc`` (timm's VGG names).

The released ``mpncovvgg16_bn`` class's ``forward`` skips the covariance (features → flatten → classifier, which
cannot run: the first Linear expects 32 896 inputs). The network its checkpoint was trained as is the
``Basemodel`` path of the authors' ``model_init.py`` (features → representation → classifier), which this
model computes. The checkpoint is a bare state dict with the features wrapped in ``DataParallel``
(``features.module.N.*``), ``representation.conv_dr_block.{0,1}.*`` and ``classifier.{0,3,6}.*``; its size,
650.4 MB in their README, is that of this layout (170.5 M float32 values).

The authors fine-tune it with one linear layer on the covariance in place of the three (``model_init.py`` with
``--pretrained`` and no representation: ``Linear(32 896, classes)``): ``hidden_dim=0`` builds that layout,
and loading the ImageNet release into it keeps the backbone and the reduction and leaves the classifier fresh,
as theirs does; their fine-tuned checkpoints (``classifier.weight``) load into it.

Weights: the ImageNet model (default tag ``.mpncov_in1k``) is on Google Drive / Baidu Cloud, which serve no
direct downloads: download it and load it with ``pretrained_cfg_overlay=dict(file=path)``. ``.tv_in1k`` is
timm's copy of torchvision's VGG-16-BN, backbone only: head and classifier start fresh. The initialisation is
timm's VGG recipe, which is the authors' (Kaiming-normal fan-out convolutions, unit BatchNorm, N(0, 0.01)
linear layers with zero bias).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vgg import VGG, cfgs
from torch import nn
from torch.nn.utils import skip_init

from ..layers import CovPool
from ..layers._common import Factory, out_features_of
from ..linalg._checks import check_int
from ._common import (
    check_num_classes,
    keep_fitting_classifier,
    replace_prefix,
    require_weights,
    unwrap_checkpoint,
    with_model_head,
)
from .second_order import _build_pool, _head_spec

__all__ = ["ISqrtVGG", "checkpoint_filter_fn"]

_POOL_TYPES = ("cov", "")
_HEAD_PREFIXES = ("global_pool.", "pre_logits.", "head.")
# fast-MPN-COV's names -> covpool's: the features lose DataParallel's ``module.``; MPNCOV's reduction; VGG's
# classifier (an nn.Sequential: Linear 0, ReLU 1, Dropout 2, Linear 3, ReLU 4, Dropout 5, Linear 6) as timm names
# it; a fine-tuned model's single ``classifier`` Linear is the classifier itself.
_FEATURES = re.compile(r"^features\.(?:module\.)?(\d+\..+)$")
_AUTHORS_PREFIXES = (
    ("representation.conv_dr_block.0.", "global_pool.reduce.conv."),
    ("representation.conv_dr_block.1.", "global_pool.reduce.bn."),
    ("classifier.0.", "pre_logits.fc1."),
    ("classifier.3.", "pre_logits.fc2."),
    ("classifier.6.", "head.fc."),
)
_AUTHORS_FINETUNED = re.compile(r"^classifier\.(weight|bias)$")


def _check_global_pool(global_pool: str | None) -> None:
    if global_pool is not None and global_pool not in _POOL_TYPES:
        raise ValueError(
            f"global_pool={global_pool!r} is not supported: use 'cov' (covariance pooling, this model's head), "
            "'' (no pooling: unpooled feature maps) or None (keep the current one); build timm's vgg16_bn for its "
            "own head"
        )


def _mlp(in_features: int, hidden_dim: int, drop_rate: float, factory: Factory) -> nn.Sequential:
    """VGG's two hidden layers, on a vector (the release's Linear layers, which timm's VGG makes convolutions).
    Their weights are left uninitialised (``skip_init``; ``factory`` must name the device): the caller draws
    them once, rather than after PyTorch's default draw of 135 M values for ``fc1``."""
    return nn.Sequential(OrderedDict(
        fc1=skip_init(nn.Linear, in_features, hidden_dim, **factory),
        act1=nn.ReLU(inplace=True),
        drop=nn.Dropout(drop_rate),
        fc2=skip_init(nn.Linear, hidden_dim, hidden_dim, **factory),
        act2=nn.ReLU(inplace=True),
    ))


class ISqrtVGG(VGG):
    """timm VGG with iSQRT-COV covariance pooling before its classifier (fast MPN-COV VGG-D).

    The convolutions are timm's :class:`~timm.models.vgg.VGG` (same names, so timm's and torchvision's VGG
    checkpoints load into them) without the last max pool. ``global_pool`` is a :class:`covpool.CovPool`,
    ``pre_logits`` VGG's two hidden layers on the covariance vector and ``head`` timm's classifier head
    (dropout, ``head.fc``).

    timm's model contract holds as for timm's VGG: ``num_features`` is the channel count of
    ``forward_features`` (512), ``head_hidden_size`` the width of ``forward_head(x, pre_logits=True)``
    (``hidden_dim``, 4096; the covariance width without hidden layers), ``reset_classifier(n)`` replaces
    ``head.fc`` only, ``global_pool=''`` or ``reset_classifier(0, '')`` give the unpooled map, ``feature_info``
    and ``forward_intermediates`` have the five stages' outputs (the last one is ``forward_features``), and,
    unlike timm's VGG, ``set_grad_checkpointing`` works (on the convolutions).

    Args:
        cfg: VGG's layer list (timm's ``cfgs['vgg16']`` for this model).
        num_classes: classifier outputs; 0 makes ``forward`` return the pre-logits.
        in_chans: input channels.
        global_pool: ``None`` or ``"cov"`` (covariance pooling), or ``""`` (no pooling and no classifier:
            ``num_classes`` must be 0 and ``forward`` returns the feature map).
        reduced_dim: channels of the reduction (256; None pools the 512 channels as they are).
        backend: square-root backend, a name or ``{"name": ..., **options}`` (the builder's default is the
            release's ``{"name": "ns", "num_iters": 5}``).
        hidden_dim: width of the two hidden layers (4096), or 0 for none: a linear classifier on the
            covariance vector, the authors' fine-tuning layout (0 rather than None, which timm's
            ``create_model`` drops).
        drop_rate: dropout after each hidden layer (0.5, the release's); without hidden layers, the dropout
            before the classifier (the authors' fine-tuning uses none: pass 0).
        output_stride: 16 (the release drops VGG's last max pool); no other value is supported.
        norm_layer: the normalisation after each convolution, a class such as ``nn.BatchNorm2d`` (what the
            registered model uses), or None for none (timm's VGG).
        act_layer: the activation class of the convolutions (``nn.ReLU``), as timm's VGG.
        conv_layer: the convolution class (``nn.Conv2d``), as timm's VGG.
        device: device of the parameters (None: torch's default).
        dtype: dtype of the parameters (None: torch's default).

    Raises:
        ValueError: ``num_classes``, ``hidden_dim``, ``global_pool``, ``reduced_dim`` or ``backend`` is invalid,
            ``global_pool=""`` comes with ``num_classes > 0``, ``output_stride`` is not 16, or ``cfg`` does not
            end with a max pool.

    Shapes: input ``(B, in_chans, H, W)``; ``forward_features`` → ``(B, 512, H/16, W/16)``; ``forward`` →
    ``(B, num_classes)``.
    """

    # timm's VGG types pre_logits as the ConvMlp its constructor builds; here it is VGG's hidden layers on the
    # covariance vector (an nn.Sequential of Linear layers) or nn.Identity.
    pre_logits: nn.Module  # type: ignore[assignment]

    def __init__(
            self,
            cfg: list[Any],
            num_classes: int = 1000,
            in_chans: int = 3,
            *,
            global_pool: str | None = None,
            reduced_dim: int | None = 256,
            backend: str | Mapping[str, Any] = "ns",
            hidden_dim: int = 4096,
            drop_rate: float = 0.5,
            output_stride: int = 16,
            norm_layer: type[nn.Module] | None = None,
            act_layer: type[nn.Module] = nn.ReLU,
            conv_layer: type[nn.Module] = nn.Conv2d,
            device: Any = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        check_num_classes(num_classes)
        _check_global_pool(global_pool)
        check_int("hidden_dim", hidden_dim, 0)
        if output_stride != 16:
            raise ValueError(f"output_stride={output_stride!r} is not supported: the fast MPN-COV VGG drops VGG's last "
                             "max pool, output stride 16")
        if global_pool == "" and num_classes:
            raise ValueError(f"global_pool='' (unpooled features) has no classifier: pass num_classes=0, got "
                             f"{num_classes}")
        # timm's VGG head (a 7×7 convolution to 4096 channels, ~120 M parameters) is replaced below: build it at a
        # width of one channel rather than allocate and initialise it to throw it away.
        super().__init__(cfg, num_classes=0, in_chans=in_chans, mlp_ratio=1 / 4096, act_layer=act_layer,
                         conv_layer=conv_layer, norm_layer=norm_layer, drop_rate=drop_rate, device=device, dtype=dtype)
        if not isinstance(self.features[-1], nn.MaxPool2d):
            raise ValueError(f"expected VGG's features to end with a max pool, got {type(self.features[-1]).__name__}")
        # Without the last pool the final features are the fifth stage's output, which feature_info already lists.
        self.features = self.features[:-1]
        del self.feature_info[-1], self.feature_ends[-1]
        self.hidden_dim = hidden_dim
        # What a later reset_classifier(n, 'cov') rebuilds the pooling from once '' has dropped it.
        self.covpool_options = _head_spec("isqrt_cov", reduced_dim, backend)
        pool = _build_pool("maps", self.num_features, {**self.covpool_options, "device": device, "dtype": dtype})
        self._set_head(pool, num_classes)
        if global_pool == "":
            self.reset_classifier(0, "")

    def _set_head(self, pool: nn.Module, num_classes: int) -> None:
        ref = next(self.parameters())
        factory: Factory = {"device": ref.device, "dtype": ref.dtype}
        self.global_pool = pool.to(**factory).train(self.training)
        if not isinstance(pool, nn.Identity):
            width = out_features_of(pool, "ISqrtVGG")
            if self.hidden_dim:
                self.pre_logits = _mlp(width, self.hidden_dim, self.drop_rate, factory).train(self.training)
                width = self.hidden_dim
            else:
                self.pre_logits = nn.Identity()
            drop_rate = self.drop_rate
        else:
            self.pre_logits, width, drop_rate = nn.Identity(), self.num_features, 0.0
        self.head = ClassifierHead(width, num_classes, pool_type="", drop_rate=drop_rate,
                                   **factory).train(self.training)
        self.head_hidden_size = width
        self.num_classes = num_classes
        self._init_head()

    def _init_head(self) -> None:
        """timm's VGG initialisation, which is the authors' (VGG's and MPNCOV's ``_init_weight``), on the head:
        Kaiming-normal (fan-out) convolution, unit BatchNorm, N(0, 0.01) linear weights, zero biases."""
        with torch.no_grad():
            for m in (*self.global_pool.modules(), *self.pre_logits.modules(), *self.head.modules()):
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    m.reset_parameters()
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """With ``enable``, recompute the convolutions' activations in the backward instead of storing them (one
        checkpointed segment per stage); ``enable=False`` stores them again."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace ``head.fc`` by a fresh linear layer with ``num_classes`` outputs (none for 0).

        ``global_pool``: ``None`` keeps the current pooling and hidden layers (a classifier on unpooled features
        brings covariance pooling back), ``"cov"`` covariance pooling (fresh pooling and hidden layers if there
        were none), ``""`` none: with ``num_classes=0`` ``forward`` then returns the unpooled
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
            self._set_head(nn.Identity(), 0)
        elif pooled:
            self.head.reset(num_classes)
            self.num_classes = num_classes
        else:
            self._set_head(_build_pool("maps", self.num_features, self.covpool_options), num_classes)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's VGG pruning; where it removes the head (``prune_head``, or features cut before the last
        stage) the covariance pooling goes too.

        Args:
            indices: the stages to keep for ``forward_intermediates``: the last n if an int, else their indices
                (0 … 4).
            prune_norm: accepted for timm's interface (VGG has no final norm).
            prune_head: remove the head: the pooling, the hidden layers and the classifier.

        Returns:
            The indices of the stages kept.
        """
        _, max_index = feature_take_indices(len(self.feature_ends), indices)
        head_goes = prune_head or max_index < len(self.feature_ends) - 1
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if head_goes:
            self.global_pool = nn.Identity()
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.grad_checkpointing or torch.jit.is_scripting():
            return self.features(x)
        # One segment per stage: a segment boundary before an in-place ReLU would let it overwrite the input
        # that the segment saved for its recomputation.
        start = 0
        for end in self.feature_ends:
            x = checkpoint(self.features[start:end + 1], x)
            start = end + 1
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map → logits, or the pre-logits ``(B, head_hidden_size)``; the map unchanged without head.

        Args:
            x: what :meth:`forward_features` returns, ``(B, 512, H/16, W/16)``.
            pre_logits: return the input of ``head.fc`` (the hidden layers' output, or the covariance vector
                without them) instead of the logits ``(B, num_classes)``.
        """
        x = self.global_pool(x)
        x = self.pre_logits(x)
        return self.head(x, pre_logits=pre_logits)


def _rename_authors_key(key: str) -> str:
    match = _FEATURES.match(key)
    if match:
        return "features." + match.group(1)
    renamed = replace_prefix(key, _AUTHORS_PREFIXES)
    if renamed is not None:
        return renamed
    match = _AUTHORS_FINETUNED.match(key)
    if match:
        return "head.fc." + match.group(1)
    return key


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: ISqrtVGG) -> dict[str, torch.Tensor]:
    """Map a fast-MPN-COV, covpool, timm or torchvision VGG-16-BN checkpoint onto an :class:`ISqrtVGG`.

    fast-MPN-COV's layouts, raw (the released ``mpncovvgg16_bn``) or as a ``main.py`` training checkpoint
    (``state_dict`` entry): ``features.module.N.*`` (or ``features.N.*``), ``representation.conv_dr_block.{0,1}.*``
    and either VGG's classifier ``classifier.{0,3,6}.*`` or the single ``classifier.*`` Linear of a fine-tuned
    model. Into a model without hidden layers (``hidden_dim=0``) a checkpoint with them loads its backbone
    and reduction only, the classifier staying fresh (the authors' fine-tuning start). A checkpoint without
    covariance pooling (timm's or torchvision's VGG-16-BN) loads its convolutions; the model keeps its fresh
    head. A model without head (``global_pool=''``) drops the checkpoint's.

    Args:
        state_dict: the checkpoint, a state dict or a ``main.py`` training checkpoint holding one.
        model: the model it loads into; its freshly initialised head fills in what the checkpoint lacks.

    Returns:
        The state dict in covpool's names, for ``model.load_state_dict`` (timm's ``pretrained_filter_fn``).

    Raises:
        ValueError: the checkpoint's reduction has another width than the model's, or its classifier is a
            single linear layer and the model has hidden layers (build it with ``hidden_dim=0``).
    """
    state_dict = {_rename_authors_key(k): v for k, v in unwrap_checkpoint(state_dict).items()}
    pool = model.global_pool
    if not isinstance(pool, CovPool) or not any(k.startswith("global_pool.") for k in state_dict):
        return with_model_head(state_dict, model, _HEAD_PREFIXES)
    reduce = state_dict.get("global_pool.reduce.conv.weight")
    if reduce is not None and pool.reduced_dim is not None and reduce.shape[0] != pool.reduced_dim:
        raise ValueError(f"the checkpoint reduces to {reduce.shape[0]} channels but the model to {pool.reduced_dim}: "
                         f"build it with reduced_dim={reduce.shape[0]}")
    hidden = any(k.startswith("pre_logits.") for k in state_dict)
    if hidden and not isinstance(model.pre_logits, nn.Sequential):  # the checkpoint's pooling, a fresh classifier
        return with_model_head(state_dict, model, ("pre_logits.", "head."))
    if not hidden and isinstance(model.pre_logits, nn.Sequential):
        raise ValueError("the checkpoint's classifier is one linear layer on the covariance (fast-MPN-COV's "
                         "fine-tuned layout) but the model has hidden layers: build it with hidden_dim=0")
    return state_dict


def _create_vgg_isqrt(variant: str, pretrained: bool = False, **kwargs: Any) -> ISqrtVGG:
    if pretrained:
        require_weights(variant, kwargs)
        kwargs = keep_fitting_classifier(variant, kwargs, rename=_rename_authors_key)
    # A fresh dict per call: the backend spec is handed down and must not be shared between models.
    kwargs.setdefault("backend", {"name": "ns", "num_iters": 5})
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3, 4))
    return build_model_with_cfg(
        ISqrtVGG,
        variant,
        pretrained,
        model_cfg=cfgs[variant.split("_")[0]],
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # The authors' ImageNet evaluation transform (imagepreprocess.py): Resize(256), CenterCrop(224), bilinear,
    # ImageNet mean and std.
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (14, 14),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "features.0", "classifier": "head.fc",
        "paper_ids": "arXiv:1712.01034",
        "paper_name": "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix "
                      "Square Root Normalization",
        "origin_url": "https://github.com/jiangtaoxie/fast-MPN-COV",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "vgg16_isqrt.tv_in1k": _cfg(
        hf_hub_id="timm/vgg16_bn.tv_in1k", license="bsd-3-clause", num_classes=0,
        notes=("timm's copy of torchvision's VGG-16-BN weights: convolutions only (num_classes=0); the covariance "
               "head and the classifier start fresh.",)),
    # '*': the default tag, listed after the weighted one (which timm would otherwise put first).
    "vgg16_isqrt.mpncov_in1k*": _cfg(notes=(
        "The iSQRT-COV authors' ImageNet-1k fast MPN-COV VGG-D (mpncovvgg16_bn), 76.02% top-1 reproduced per their "
        "README (73.45% in the paper), full model with classifier. Download it from "
        "https://drive.google.com/open?id=1oD2QydL8VvK2Zu6Ba5Xe3gFq3to8JsrN or "
        "https://pan.baidu.com/s/10DmoGbuHjI_Nsd8bEbefsA (no direct downloads).",)),
})


@register_model
def vgg16_isqrt(pretrained: bool = False, **kwargs: Any) -> ISqrtVGG:
    """fast MPN-COV VGG-D: VGG-16-BN without its last max pool, iSQRT-COV (32 896 features), 4096-4096 classifier.

    Args:
        pretrained: load the tag's weights: the default ``.mpncov_in1k``, the authors' ImageNet model, needs a
            downloaded file (``pretrained_cfg_overlay=dict(file=path)``) and raises without one; ``.tv_in1k`` loads
            torchvision's VGG-16-BN convolutions, the head and classifier starting fresh.
        **kwargs: the arguments of :class:`ISqrtVGG` (``num_classes``, ``reduced_dim``, ``backend``, default ``{"name":
            "ns", "num_iters": 5}``, ``hidden_dim``, ``drop_rate``, ...) and timm's builder options
            (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(norm_layer=nn.BatchNorm2d)
    return _create_vgg_isqrt("vgg16_isqrt", pretrained, **dict(model_args, **kwargs))
