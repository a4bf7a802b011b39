"""SoT and DropCov's transformers: DenseNet visual tokens, ViT blocks and a multi-headed cross-covariance head.

- SoT: Xie, Zeng, Wang, Zhou, Li. "SoT: Delving Deeper into Classification Head for Transformer."
  arXiv:2104.10935v2, 2021 (github.com/jiangtaoxie/SoT, ``sot_src/sot.py``): ``sot_tiny``, ``sot_small``,
  ``sot_base``, the authors' ``SoT_Tiny``, ``SoT_Small``, ``SoT_Base``.
- DropCov: Wang, Gao, Zhang, Xie, Li, Hu. "DropCov: A Simple yet Effective Method for Improving Deep
  Architectures." NeurIPS 2022 (github.com/mingzeG/DropCov, ``Transformers/src/transformer.py``): the same
  network with another head, ``deit_tiny_dropcov``, ``deit_small_dropcov``, ``deit_base_dropcov``,
  ``t2t_vit_14_dropcov``, the authors' ``Deit_drop_Tiny``, ``Deit_drop_Small``, ``Deit_drop_Base`` and
  ``T2T_ViT_14``. The names are theirs; the networks are neither timm's DeiT (16×16 patch embedding, learned
  position embedding) nor T2T-ViT (tokens-to-token module): they have SoT's DenseNet tokens, and take the
  width, depth and heads of the DeiT or T2T-ViT they are compared with.

The network, as both releases build it:

- visual tokens from a small DenseNet (:class:`DenseTokenEmbed`): 3×3 conv (with bias) → 3×3/2 max pool →
  three times [dense block of 6 layers (growth 16, bottleneck 32: ReLU → 1×1 conv → ReLU → 3×3 conv) →
  transition (BatchNorm → 1×1 conv to 128 → 2×2/2 average pool)] → 1×1 projection (with bias) to
  ``embed_dim``: 16× downsampling, 14×14 tokens at 224²;
- a class token, a fixed 1-D sinusoid position embedding over the 1 + N positions and pre-norm blocks (timm's
  ``Block``: no qkv bias, scale head_dim^-1/2, LayerNorm eps 1e-5, GELU), as So-ViT
  (:class:`covpool.models.so_vit.SoViT`, which this class extends);
- :class:`covpool.SoViTHead` with the ``sot`` head: a classifier on the class token plus one on the multi-headed
  cross-covariance of the word tokens (:class:`covpool.layers.MultiHeadCrossCov`), summed. SoT
  normalises each head's matrix by svPN (dropout on the features 0 / 0.5 / 0.7 for Tiny / Small / Base);
  DropCov's transformers do not normalise it, zero a token's query and key rows together with probability
  0.2 in training (per image and head) and drop the features with probability 0.5. Both centre each head's
  queries and keys by one scalar mean over its tokens and channels (``centering="scalar"``, what the released
  code computes; ``"feature"`` gives the cross-covariance proper).

The dense layers have no BatchNorm: the authors' code builds timm's ``DenseBlock`` without a ``norm_layer``,
whose default in timm 0.3.4 (their pinned version) is ``nn.ReLU``, so each "norm" is a parameter-free ReLU.
From timm 0.4 on the default is BatchNorm + ReLU: their code run on today's timm silently builds another
network (6 432 more parameters) that their checkpoints do not fit. This module builds the 0.3.4 layout with
timm's ``DenseBlock`` given a plain ReLU.

Differences from the releases: the token grid follows ``img_size`` for any size ≥ 15 (the releases fix 197
positions, i.e. 224² only); the svPN runs in float32 under autocast; DropCov's projection computes a third
block of h·d_r channels (a value projection) that it never reads: :func:`checkpoint_filter_fn` drops those
rows, so these models have h·d_r·C fewer parameters than the release (55 296 for ``deit_small_dropcov``) and
the same outputs.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.densenet import DenseBlock, DenseTransition
from torch import nn

from ..layers import MultiHeadCrossCov, SoViTHead
from . import so_vit
from ._common import keep_fitting_classifier, replace_prefix, require_weights, unwrap_checkpoint
from .so_vit import SoViT, VisualTokenEmbed, fit_pos_embed

__all__ = ["SoT", "DenseTokenEmbed", "checkpoint_filter_fn"]

_DENSE_LAYERS = 6
_GROWTH = 16
_TRANSITION_CHANNELS = 128


def _plain_relu(num_features: int, device: Any = None, dtype: torch.dtype | None = None) -> nn.Module:
    # timm 0.3.4's DenseBlock default norm_layer: nn.ReLU(num_features), a ReLU without parameters.
    return nn.ReLU()


class DenseTokenEmbed(VisualTokenEmbed):
    """SoT's visual-token embedding (their ``DenseNetStyleModule``), a timm ViT ``embed_layer``: image →
    16×-downsampled tokens.

    ``backbone``: 3×3 conv (bias) → 3×3/2 max pool → ``stage``: three dense blocks of 6 layers (growth 16,
    bottleneck width 32, ReLU instead of BatchNorm, timm 0.3.4's layout) each followed by a transition
    (BatchNorm → 1×1 conv to 128 → 2×2/2 average pool); ``proj``: 1×1 conv to ``embed_dim``. The token grid is
    (⌊⌈H/2⌉/8⌋, ⌊⌈W/2⌉/8⌋): 14×14 at 224², 4×4 at 64².

    Args:
        img_size: int or (H, W), at least 15; fixes ``grid_size`` and ``num_patches``.
        patch_size: must be 16 (the stem's reduction; the keyword is part of timm's embed-layer interface).
        in_chans: channels of the input images.
        embed_dim: the token width, ``proj``'s output channels.
        bias: bias of ``proj``.
        dynamic_img_pad: must be False (timm's embed-layer interface): the stem takes any size as it is.
        strict_img_size: refuse inputs whose token grid differs from ``grid_size``.
        output_fmt: ``"NHWC"`` keeps the grid (timm's ``dynamic_img_size``); otherwise tokens ``(B, N, C)``.
        stem_width: channels of the first convolution (64 in SoT).
        device: device of the parameters (None: torch's default).
        dtype: dtype of the parameters (None: torch's default).

    Raises:
        ValueError: as :class:`VisualTokenEmbed`, and for an ``img_size`` under 15 pixels a side (no tokens).
    """

    backbone_channels = _TRANSITION_CHANNELS

    def _build_backbone(self, in_chans: int, stem_width: int, dd: dict[str, Any]) -> nn.Sequential:
        stage: list[nn.Module] = []
        in_chs = stem_width
        for _ in range(3):
            # timm types norm_layer as a class but only calls it, norm_layer(channels, **dd): a function works.
            stage.append(DenseBlock(_DENSE_LAYERS, in_chs, bn_size=2, growth_rate=_GROWTH,
                                    norm_layer=_plain_relu, **dd))  # type: ignore[arg-type]
            stage.append(DenseTransition(in_chs + _DENSE_LAYERS * _GROWTH, _TRANSITION_CHANNELS,
                                         norm_layer=nn.BatchNorm2d, **dd))
            in_chs = _TRANSITION_CHANNELS
        return nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_chans, stem_width, kernel_size=3, padding=1, bias=True, **dd),
            pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            stage=nn.Sequential(*stage),
        ))

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: Any = None) -> None:
        super().set_input_size(img_size, patch_size)
        if img_size is not None and min(self.grid_size) < 1:
            raise ValueError(f"img_size={img_size!r} gives no tokens: SoT's token stem needs at least 15 pixels "
                             "per side")

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        # The 3×3/2 max pool (padding 1) maps n to ⌈n/2⌉, each 2×2/2 average pool to ⌊n/2⌋.
        return ((img_size[0] + 1) // 2) // 8, ((img_size[1] + 1) // 2) // 8


register_notrace_module(DenseTokenEmbed)  # input-size checks: an FX leaf, as timm's patch embeddings


class SoT(SoViT):
    """SoT (Xie et al., arXiv:2104.10935v2) and DropCov's transformers (Wang et al., NeurIPS 2022) on timm's
    ``VisionTransformer``: DenseNet visual tokens, ViT blocks, class token + multi-headed cross-covariance
    head (see the module doc). A :class:`covpool.models.so_vit.SoViT` with another token stem and head.

    Args:
        img_size: int or (H, W), at least 15; the token grid (⌊⌈H/2⌉/8⌋ × ⌊⌈W/2⌉/8⌋) and position
            embedding are sized from it.
        in_chans: input channels.
        num_classes: classes of both classifiers; 0 makes :meth:`forward` return the ``head_hidden_size``-wide
            pre-logits (class token concatenated with the covariance features).
        global_pool: ``"cov"`` (the head) or ``""`` (no head: unpooled tokens; only with ``num_classes=0``).
        embed_dim: the token width.
        depth: the number of transformer blocks.
        num_heads: attention heads per block (they must divide ``embed_dim``).
        mlp_ratio: the blocks' MLP hidden width over ``embed_dim``.
        qkv_bias: bias of the attention's query, key and value projection (none in the releases).
        reduced_dim: (heads, d_r) of the head: (6, 14), (6, 24), (6, 38) in SoT-Tiny, -Small, -Base.
        centering: ``"scalar"`` (the releases' one mean per head) or ``"feature"`` (per channel).
        normalization: ``"svpn"`` (SoT) or ``"none"`` (DropCov's transformers).
        token_drop: probability of zeroing a token's query and key rows of one head in training (DropCov's
            0.2; 0 in SoT).
        pos_embed: ``"sincos"`` (fixed, the releases') or ``"learn"``.
        official_init: initialise as the releases (default; see :class:`~covpool.models.so_vit.SoViT`), else
            timm's conventions.
        stem_width: channels of the stem's first convolution (64).
        drop_rate: dropout on the covariance features (SoT-Small 0.5, SoT-Base 0.7, DropCov 0.5).
        pos_drop_rate: dropout on the tokens after the position embedding (timm's ViT; the releases' ``--drop``
            sets it and ``proj_drop_rate`` together).
        proj_drop_rate: dropout after the attention's and the MLP's output projections (timm's ViT).
        attn_drop_rate: dropout on the attention weights (timm's ViT).
        drop_path_rate: stochastic depth, the rate of the last block, rising linearly from 0 (timm's ViT; the
            releases' ``--drop-path``).
        dynamic_img_size: resample the position embedding to each input's token grid.
        device: device of the parameters and buffers (None: torch's default).
        dtype: dtype of the parameters and buffers (None: torch's default).

    Raises:
        ValueError: as :class:`~covpool.models.so_vit.SoViT`, and for an invalid head option (``reduced_dim``,
            ``centering``, ``normalization``, ``token_drop``) or an ``img_size`` under 15 pixels a side.

    Attributes:
        num_features: ``embed_dim``, the width of :meth:`forward_features` ``(B, 1 + N, embed_dim)``.
        head_hidden_size: the pre-logits width, ``embed_dim + heads·d_r²`` (``embed_dim`` without head).
    """

    _token_embed = DenseTokenEmbed

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "cov",
            embed_dim: int = 384,
            depth: int = 14,
            num_heads: int = 6,
            mlp_ratio: float = 3.5,
            qkv_bias: bool = False,
            reduced_dim: tuple[int, int] = (6, 24),
            centering: str = "scalar",
            normalization: str = "svpn",
            token_drop: float = 0.0,
            pos_embed: str = "sincos",
            official_init: bool = True,
            stem_width: int = 64,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            dynamic_img_size: bool = False,
            device: Any = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            img_size=img_size, in_chans=in_chans, num_classes=num_classes, global_pool=global_pool,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            head="sot", reduced_dim=reduced_dim, pos_embed=pos_embed, official_init=official_init,
            stem_width=stem_width, drop_rate=drop_rate, pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, dynamic_img_size=dynamic_img_size,
            device=device, dtype=dtype,
            head_options=dict(centering=centering, normalization=normalization, token_drop=token_drop),
        )


# The releases' names (SoT's sot_src and DropCov's Transformers/src share them) -> covpool's: So-ViT's token stem
# and classifiers, and the multi-headed head's.
_RELEASE_PREFIXES = so_vit._RELEASE_PREFIXES + (
    ("classifier.representation.wr.", "head.pool.proj."),
    ("classifier.representation.norm.weight", "head.pool.v0"),
)


def _release_key(key: str) -> str:
    return replace_prefix(key, _RELEASE_PREFIXES) or key


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: SoT) -> dict[str, torch.Tensor]:
    """Map a SoT or DropCov-transformer checkpoint onto ``model``.

    Accepts covpool's layout and the authors' (``visual_tokens.tokens.*``, ``classifier.representation.wr``,
    ``classifier.*_fc``), raw or as a training checkpoint with ``module.`` prefixes. Of a timm training
    checkpoint (what both releases' ``main.py`` saves) the EMA weights are taken, ``state_dict_ema`` before
    ``state_dict``, as the authors' evaluation does; pass the other entry itself to load it. DropCov's unused
    third block of projection rows is dropped. A checkpoint whose head has svPN (SoT's ``norm.weight``) and a
    model without it, or the reverse, raise. The position embedding of another token grid is replaced by the
    model's own table (fixed) or resampled (learned); a model without head drops the checkpoint's head.
    """
    out = {_release_key(k): v for k, v in unwrap_checkpoint(state_dict).items()}
    if not isinstance(model.head, SoViTHead):
        return fit_pos_embed({k: v for k, v in out.items() if not k.startswith("head.")}, model)
    pool = model.head.pool
    assert isinstance(pool, MultiHeadCrossCov)  # the "sot" head, which SoT always builds
    if any(k.startswith("head.pool.") for k in out) and ("head.pool.v0" in out) != (pool.v0 is not None):
        has, built = ("svPN (SoT)", "normalization='none'") if pool.v0 is None else \
            ("no svPN (DropCov's transformers)", "normalization='svpn'")
        raise ValueError(f"the checkpoint's head has {has} but the model was built with {built}; build it with "
                         f"the other normalization (sot_* have svPN, *_dropcov none)")
    proj = out.get("head.pool.proj.weight")
    rows = pool.proj.weight.shape[0]
    if proj is not None and proj.shape[0] == rows + rows // 2:  # DropCov: queries, keys, unused values
        out["head.pool.proj.weight"] = proj[:rows]
    return fit_pos_embed(out, model)


def _create_sot(variant: str, pretrained: bool = False, **kwargs: Any) -> SoT:
    out_indices = kwargs.pop("out_indices", 3)
    # The released files are timm training checkpoints that also pickle the argparse Namespace of the run;
    # allow that one plain class when timm loads them with weights_only=True.
    with torch.serialization.safe_globals([argparse.Namespace]):
        if pretrained:
            require_weights(variant, kwargs, backbone_tag=None)  # no backbone-only tag: SoT's stem is its own
            kwargs = keep_fitting_classifier(variant, kwargs, rename=_release_key)
        return build_model_with_cfg(
            SoT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs,
        )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # Both releases evaluate with timm 0.3.4's defaults (their models carry no default_cfg): 224², centre crop
    # 0.875, bicubic, ImageNet mean and std.
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "fixed_input_size": True,
        "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.backbone.conv", "classifier": ("head.fc_cls", "head.fc_cov"),
        **kwargs,
    }


def _sot_cfg(name: str, top1: float) -> dict[str, Any]:
    return _cfg(
        paper_ids="arXiv:2104.10935", paper_name="SoT: Delving Deeper into Classification Head for Transformer",
        origin_url="https://github.com/jiangtaoxie/SoT",
        notes=(f"No released weights (the authors' README lists {name} as 'Coming soon'); it reports "
               f"{top1}% ImageNet-1k top-1 at 224².",),
    )


_DROPCOV = dict(paper_name="DropCov: A Simple yet Effective Method for Improving Deep Architectures",
                origin_url="https://github.com/mingzeG/DropCov")


def _dropcov_release_cfg(name: str, drive_id: str, top1: float) -> dict[str, Any]:
    # No url: Google Drive serves no direct downloads; the builder raises with these notes unless given a file.
    return _cfg(**_DROPCOV, notes=(
        f"The DropCov authors' ImageNet-1k {name} (their README reports {top1}% top-1 at 224²), a timm 0.3.4 "
        f"training checkpoint whose EMA weights load by default. Download it from "
        f"https://drive.google.com/file/d/{drive_id}/view (no direct download).",))


default_cfgs = generate_default_cfgs({
    "sot_tiny.untrained": _sot_cfg("SoT-Tiny", 80.3),
    "sot_small.untrained": _sot_cfg("SoT-Small", 82.7),
    "sot_base.untrained": _sot_cfg("SoT-Base", 83.5),
    "deit_tiny_dropcov.untrained": _cfg(**_DROPCOV, notes=(
        "No released weights or reported accuracy (the authors' README has DeiT-S and T2T-ViT-14 only).",)),
    "deit_small_dropcov.in1k": _dropcov_release_cfg("DeiT-S+DropCov", "1Ziw9dRvainxIQlq_9htZ58inr6nRsPmx", 82.4),
    "deit_base_dropcov.untrained": _cfg(**_DROPCOV, notes=(
        "No released weights or reported accuracy (the authors' README has DeiT-S and T2T-ViT-14 only).",)),
    "t2t_vit_14_dropcov.in1k": _dropcov_release_cfg("T2T-ViT-14+DropCov", "1KQmJ7cZjDPy4WOmOGAPGr9wbBWaQGNPo",
                                                    82.7),
})

_DROPCOV_HEAD = dict(normalization="none", token_drop=0.2, drop_rate=0.5)


@register_model
def sot_tiny(pretrained: bool = False, **kwargs: Any) -> SoT:
    """SoT-Tiny: 12 blocks of width 240, 4 heads, MLP ratio 2.5; head 6×14 with svPN, no dropout.

    Args:
        pretrained: load the tag's weights: the default ``.untrained`` has none (no weights were released) and raises; a
            local file loads with ``pretrained_cfg_overlay=dict(file=path)``.
        **kwargs: the arguments of :class:`SoT` (``num_classes``, ``img_size``, ``drop_rate``, ``drop_path_rate``, ...)
            and timm's builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(embed_dim=240, depth=12, num_heads=4, mlp_ratio=2.5, reduced_dim=(6, 14))
    return _create_sot("sot_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def sot_small(pretrained: bool = False, **kwargs: Any) -> SoT:
    """SoT-Small: 14 blocks of width 384, 6 heads, MLP ratio 3.5; head 6×24 with svPN, dropout 0.5.

    Args:
        pretrained: load the tag's weights: the default ``.untrained`` has none (no weights were released) and raises; a
            local file loads with ``pretrained_cfg_overlay=dict(file=path)``.
        **kwargs: the arguments of :class:`SoT` (``num_classes``, ``img_size``, ``drop_rate``, ``drop_path_rate``, ...)
            and timm's builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.5, reduced_dim=(6, 24), drop_rate=0.5)
    return _create_sot("sot_small", pretrained, **dict(model_args, **kwargs))


@register_model
def sot_base(pretrained: bool = False, **kwargs: Any) -> SoT:
    """SoT-Base: 24 blocks of width 528, 8 heads, MLP ratio 3; head 6×38 with svPN, dropout 0.7.

    Args:
        pretrained: load the tag's weights: the default ``.untrained`` has none (no weights were released) and raises; a
            local file loads with ``pretrained_cfg_overlay=dict(file=path)``.
        **kwargs: the arguments of :class:`SoT` (``num_classes``, ``img_size``, ``drop_rate``, ``drop_path_rate``, ...)
            and timm's builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(embed_dim=528, depth=24, num_heads=8, mlp_ratio=3.0, reduced_dim=(6, 38), drop_rate=0.7)
    return _create_sot("sot_base", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_tiny_dropcov(pretrained: bool = False, **kwargs: Any) -> SoT:
    """DropCov's ``Deit_drop_Tiny``: SoT-Tiny's network with DropCov's head (6×14, no svPN, token dropout
    0.2, dropout 0.5); not timm's DeiT.

    Args:
        pretrained: load the tag's weights: the default ``.untrained`` has none (no weights were released) and raises; a
            local file loads with ``pretrained_cfg_overlay=dict(file=path)``.
        **kwargs: the arguments of :class:`SoT` (``num_classes``, ``img_size``, ``drop_rate``, ``drop_path_rate``, ...)
            and timm's builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(embed_dim=240, depth=12, num_heads=4, mlp_ratio=2.5, reduced_dim=(6, 14), **_DROPCOV_HEAD)
    return _create_sot("deit_tiny_dropcov", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_small_dropcov(pretrained: bool = False, **kwargs: Any) -> SoT:
    """DropCov's ``Deit_drop_Small``: 12 blocks of width 384, 6 heads, MLP ratio 4, DenseNet tokens; head 6×24
    without svPN, token dropout 0.2, dropout 0.5; not timm's DeiT.

    Args:
        pretrained: load the tag's weights: the default ``.in1k``, the DropCov authors' ImageNet model, needs a
            downloaded file (``pretrained_cfg_overlay=dict(file=path)``) and raises without one.
        **kwargs: the arguments of :class:`SoT` (``num_classes``, ``img_size``, ``drop_rate``, ``drop_path_rate``, ...)
            and timm's builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, reduced_dim=(6, 24), **_DROPCOV_HEAD)
    return _create_sot("deit_small_dropcov", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_base_dropcov(pretrained: bool = False, **kwargs: Any) -> SoT:
    """DropCov's ``Deit_drop_Base``: 12 blocks of width 768, 12 heads, MLP ratio 4, DenseNet tokens; head 12×24
    without svPN, token dropout 0.2, dropout 0.5; not timm's DeiT.

    Args:
        pretrained: load the tag's weights: the default ``.untrained`` has none (no weights were released) and raises; a
            local file loads with ``pretrained_cfg_overlay=dict(file=path)``.
        **kwargs: the arguments of :class:`SoT` (``num_classes``, ``img_size``, ``drop_rate``, ``drop_path_rate``, ...)
            and timm's builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, reduced_dim=(12, 24), **_DROPCOV_HEAD)
    return _create_sot("deit_base_dropcov", pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_14_dropcov(pretrained: bool = False, **kwargs: Any) -> SoT:
    """DropCov's ``T2T_ViT_14``: 14 blocks of width 384, 6 heads, MLP ratio 3, DenseNet tokens (no
    tokens-to-token module); head 6×24 without svPN, token dropout 0.2, dropout 0.5; not timm's T2T-ViT.

    Args:
        pretrained: load the tag's weights: the default ``.in1k``, the DropCov authors' ImageNet model, needs a
            downloaded file (``pretrained_cfg_overlay=dict(file=path)``) and raises without one.
        **kwargs: the arguments of :class:`SoT` (``num_classes``, ``img_size``, ``drop_rate``, ``drop_path_rate``, ...)
            and timm's builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, reduced_dim=(6, 24), **_DROPCOV_HEAD)
    return _create_sot("t2t_vit_14_dropcov", pretrained, **dict(model_args, **kwargs))
