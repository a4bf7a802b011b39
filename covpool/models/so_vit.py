"""So-ViT: a vision transformer with a convolutional visual-token stem and a second-order head.

Xie, Zeng, Wang, Zhou, Li. "So-ViT: Mind Visual Tokens for Vision Transformer." arXiv:2104.10935, 2021.
Reproduces the authors' release (github.com/jiangtaoxie/So-ViT, April 2021, before the repository became
SoT), whose ImageNet weights load through :func:`checkpoint_filter_fn`:

- visual tokens from a light ResNet stem: 3×3 conv (with bias, no norm or activation), 3×3/2 max pool,
  three bottlenecks of stride 2 (64 → 256 channels, BatchNorm eps 1e-3 and momentum 0.01 inside the
  blocks, PyTorch-default BatchNorm in the shortcuts), 1×1 projection (with bias) to ``embed_dim``:
  16× downsampling, 14×14 tokens at 224²;
- a class token, a fixed 1-D sinusoid position embedding over the 1 + N positions (``pos_embed="sincos"``,
  a buffer kept in the state dict as the release keeps it; ``"learn"`` makes it learned) and pre-norm blocks
  (timm's ``Block``: no qkv bias, scale head_dim^-1/2, LayerNorm eps 1e-5, GELU);
- :class:`covpool.SoViTHead`: a classifier on the class token plus one on the second-order features of
  the word tokens, summed. ``head`` names any registered head that pools tokens (:func:`covpool.list_heads`).
  ``head="svpn"`` (default) is the release's cross-covariance of two 1×1 conv → BN → ReLU branches (48×24 for
  So-ViT-7/10, 64×48 for 14, 96×48 for 19) normalised by svPN, the full matrix as features, dropout 0.5 on
  them for 14/19. ``head="mpa_cov"`` (``"mpa"`` before covpool 0.2) is the So-ViT of "Fast Differentiable
  Matrix Square Root" (Song et al., ICLR 2022; github.com/KingJamesSong/FastDifferentiableMatSqrt): one
  branch of 48 (7/10) or 64 (14) channels, the covariance's square root by ``backend`` (``mpa_lya``) and
  its upper triangle. Its release has no working So-ViT-19 (the builder's classifier width does not match
  its covariance); here the 19 uses 96 channels, the first branch width of the svPN variant. Any other
  head takes the one-branch width too.

Built on timm's :class:`~timm.models.vision_transformer.VisionTransformer` (the token stem is its
``patch_embed``), so ``forward_intermediates``, ``features_only`` and layer-wise LR decay work as for
timm's ViTs. Differences from the release: the token grid follows ``img_size`` for any size (the release
builds its third bottleneck with stride ``img_size // 112``, i.e. only 224 and 112 work, and 112 drops that
block's shortcut convolution; only the 224 layout loads here); the svPN and square root run in float32
under autocast; MPA-Lya uses exact Padé coefficients where its release rounds them to float16.
"""
from __future__ import annotations

import argparse
import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from functools import partial
from typing import Any, TypedDict

import torch
from einops import rearrange
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_module, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..layers import CovPool, SoViTHead, SvPNCrossCov, get_head
from ..linalg import BackendSpec
from ..linalg._checks import check_int, is_int
from ._common import check_num_classes, keep_fitting_classifier, replace_prefix, unwrap_checkpoint

__all__ = ["SoViT", "VisualTokenEmbed", "sinusoid_pos_embed", "fit_pos_embed", "checkpoint_filter_fn"]

_GLOBAL_POOLS = ("cov", "")
# head="mpa" before covpool 0.2: the registered head it is now.
_OLD_HEADS = {"mpa": "mpa_cov"}
_POS_EMBEDS = ("sincos", "learn")
_STEM_CHANNELS = 256  # 64 planes × bottleneck expansion 4


class _HeadKwargs(TypedDict):
    """The options of :class:`covpool.SoViTHead` that a model keeps to build its head again (``reset_classifier``)."""

    reduced_dim: int | tuple[int, int] | None
    backend: BackendSpec | None
    drop_rate: float
    head: str
    pool_options: dict[str, Any]


def _head_name(head: str) -> str:
    """``head`` as a registered head's name: an old spelling (``"mpa"``) warns and gives its new name."""
    if head in _OLD_HEADS:
        warnings.warn(f"head={head!r} is now head={_OLD_HEADS[head]!r} (a name of covpool.list_heads()); "
                      f"{head!r} goes in the next release", FutureWarning, stacklevel=3)
        return _OLD_HEADS[head]
    get_head(head)  # an unknown name lists the valid ones
    return head


def _tokens_per_side(size: int, num_halvings: int = 4) -> int:
    # Every downsampling layer of the stem (3×3/2 max pool, 3×3/2 conv with padding 1, 1×1/2 shortcut)
    # maps n to ceil(n / 2).
    for _ in range(num_halvings):
        size = (size + 1) // 2
    return size


def sinusoid_pos_embed(num_positions: int, dim: int) -> torch.Tensor:
    """The Transformer's fixed 1-D sinusoid table, ``(1, num_positions, dim)`` float32: position p,
    channel j gets sin (j even) or cos (j odd) of p / 10000^(2⌊j/2⌋/dim). So-ViT uses it over the
    class token (p = 0) and the row-major token grid. Computed in float64, like the release.

    Vaswani et al., "Attention Is All You Need", NeurIPS 2017, section 3.5.

    Args:
        num_positions: the number of positions p = 0 … ``num_positions - 1`` (class token and patch tokens).
        dim: the embedding width, the channels j = 0 … ``dim - 1``.

    Example::

        >>> from covpool.models.so_vit import sinusoid_pos_embed
        >>> table = sinusoid_pos_embed(1 + 4, 6)
        >>> table.shape, table.dtype, table[0, 0].tolist()  # position 0: sin 0 = 0, cos 0 = 1
        (torch.Size([1, 5, 6]), torch.float32, [0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    """
    pos = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(dim)
    angle = pos / torch.pow(10000.0, (2 * torch.div(j, 2, rounding_mode="floor")).double() / dim)
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float().unsqueeze(0)


class VisualTokenEmbed(nn.Module):
    """So-ViT's visual-token embedding, used as a timm ViT ``embed_layer``: image → 16×-downsampled tokens.

    ``backbone``: 3×3 conv (bias) → 3×3/2 max pool → three bottlenecks of stride 2 (BatchNorm eps 1e-3,
    momentum 0.01; shortcut 1×1/2 conv + default BatchNorm); ``proj``: 1×1 conv to ``embed_dim``.

    Args:
        img_size: int or (H, W); fixes ``grid_size`` (⌈H/16⌉, ⌈W/16⌉) and ``num_patches``.
        patch_size: must be 16 (the stem's reduction; the keyword is part of timm's embed-layer interface).
        in_chans: channels of the input images.
        embed_dim: the token width, ``proj``'s output channels.
        bias: bias of ``proj``.
        dynamic_img_pad: must be False (timm's embed-layer interface): the stem takes any size as it is.
        strict_img_size: refuse inputs whose token grid differs from ``grid_size``.
        output_fmt: ``"NHWC"`` keeps the grid (timm's ``dynamic_img_size``); otherwise tokens ``(B, N, C)``.
        stem_width: channels of the first convolution.
        device: device of the parameters (None: torch's default).
        dtype: dtype of the parameters (None: torch's default).

    Raises:
        ValueError: ``patch_size`` is not 16, ``dynamic_img_pad`` is set, ``output_fmt`` is not None,
            ``"NLC"`` or ``"NHWC"``, or ``img_size`` is not a positive int or pair; in ``forward``, an input
            that is not ``(B, C, H, W)`` or (``strict_img_size``) gives another token grid.

    Shapes: ``(B, in_chans, H, W)`` → ``(B, N, embed_dim)`` with N = ⌈H/16⌉·⌈W/16⌉, or
    ``(B, ⌈H/16⌉, ⌈W/16⌉, embed_dim)`` with ``output_fmt="NHWC"``.
    """

    backbone_channels = _STEM_CHANNELS  # the width of what _build_backbone returns

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 384, bias: bool = True, dynamic_img_pad: bool = False,
                 strict_img_size: bool = True, output_fmt: str | None = None, stem_width: int = 64,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if tuple(to_2tuple(patch_size)) != (16, 16):
            raise ValueError(f"the visual-token stem downsamples by 16; patch_size={patch_size!r} is not supported")
        if dynamic_img_pad:
            raise ValueError("dynamic_img_pad is not supported: the stem takes any image size as it is")
        if output_fmt not in (None, "NHWC", "NLC"):
            raise ValueError(f"output_fmt must be None, 'NLC' or 'NHWC', got {output_fmt!r}")
        dd = {"device": device, "dtype": dtype}
        self.patch_size = (16, 16)
        self.strict_img_size = strict_img_size
        self.output_fmt = output_fmt or "NLC"
        self.set_input_size(img_size)
        self.backbone = self._build_backbone(in_chans, stem_width, dd)
        self.proj = nn.Conv2d(self.backbone_channels, embed_dim, kernel_size=1, bias=bias, **dd)

    def _build_backbone(self, in_chans: int, stem_width: int, dd: dict[str, Any]) -> nn.Sequential:
        """The convolutions before ``proj`` (SoT's DenseNet tokens replace them in a subclass)."""
        block_norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)
        blocks = []
        in_chs = stem_width
        for _ in range(3):
            shortcut = nn.Sequential(nn.Conv2d(in_chs, _STEM_CHANNELS, 1, stride=2, bias=False, **dd),
                                     nn.BatchNorm2d(_STEM_CHANNELS, **dd))
            # timm types norm_layer as a class but only calls it, norm_layer(channels, **dd): a partial works.
            blocks.append(Bottleneck(in_chs, _STEM_CHANNELS // 4, stride=2, downsample=shortcut,
                                     norm_layer=block_norm, **dd))  # type: ignore[arg-type]
            in_chs = _STEM_CHANNELS
        return nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_chans, stem_width, kernel_size=3, padding=1, bias=True, **dd),
            pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            stage=nn.Sequential(*blocks),
        ))

    def set_input_size(self, img_size: int | tuple[int, int] | None = None,
                       patch_size: int | tuple[int, int] | None = None) -> None:
        """Size the token grid for ``img_size`` (None: keep it); ``patch_size`` must be None or 16."""
        if patch_size is not None and tuple(to_2tuple(patch_size)) != (16, 16):
            raise ValueError(f"the visual-token stem downsamples by 16; patch_size={patch_size!r} is not supported")
        if img_size is None:
            return
        size = tuple(to_2tuple(img_size))
        if len(size) != 2 or not all(is_int(s) and s > 0 for s in size):
            raise ValueError(f"img_size must be a positive int or a pair (H, W) of them, got {img_size!r}")
        self.img_size = size
        self.grid_size = self.dynamic_feat_size(size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return 16 if as_scalar else (16, 16)

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return _tokens_per_side(img_size[0]), _tokens_per_side(img_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if self.strict_img_size:
            grid = self.dynamic_feat_size((x.shape[-2], x.shape[-1]))
            if grid != self.grid_size:
                raise ValueError(
                    f"a {x.shape[-2]}×{x.shape[-1]} input gives a {grid[0]}×{grid[1]} token grid but the model was "
                    f"built for img_size={self.img_size} ({self.grid_size[0]}×{self.grid_size[1]} tokens); build it "
                    "with img_size=... or dynamic_img_size=True"
                )
        x = self.proj(self.backbone(x))
        if self.output_fmt == "NHWC":
            return rearrange(x, "b c h w -> b h w c")
        return rearrange(x, "b c h w -> b (h w) c")


# Shape checks that depend on the input: FX treats these modules as leaves (timm's own convention).
register_notrace_module(VisualTokenEmbed)
register_notrace_module(SoViTHead)


class SoViT(VisionTransformer):
    """So-ViT (Xie et al., arXiv:2104.10935) on timm's ``VisionTransformer``: conv visual tokens, ViT blocks and
    a second-order head (:class:`covpool.SoViTHead`).

    Args:
        img_size: int or (H, W); the token grid (⌈H/16⌉ × ⌈W/16⌉) and position embedding are sized from it.
        in_chans: input channels.
        num_classes: classes of both classifiers; 0 makes :meth:`forward` return the ``head_hidden_size``-wide
            pre-logits (class token concatenated with the covariance features).
        global_pool: ``"cov"`` (the So-ViT head) or ``""`` (no head: :meth:`forward_head` returns the
            unpooled tokens; only with ``num_classes=0``).
        embed_dim: the token width.
        depth: the number of transformer blocks.
        num_heads: attention heads per block (they must divide ``embed_dim``).
        mlp_ratio: the blocks' MLP hidden width over ``embed_dim``.
        qkv_bias: bias of the attention's query, key and value projection (none in the paper).
        head: a registered head that pools tokens (:func:`covpool.list_heads`): ``"svpn"`` (the So-ViT release)
            or ``"mpa_cov"`` (Song et al.'s MPA-Lya So-ViT; ``"mpa"`` before covpool 0.2, still accepted with a
            FutureWarning for one release); see the module doc.
        reduced_dim: the head's reduction: (d1, d2) for ``"svpn"``, d for ``"mpa_cov"``.
        backend: square root of a head with one, a name or ``{"name": ..., **options}`` (None: the head's,
            ``mpa_lya`` for ``"mpa_cov"``); the svPN head has none and refuses one.
        pos_embed: ``"sincos"`` (fixed 1-D sinusoid, the paper's) or ``"learn"`` (trunc-normal, trained).
        official_init: initialise as the release (default): trunc-normal(0.02) Linear weights and zero biases,
            class token trunc-normal(0.02), PyTorch-default stem convolutions, no zero-init of the last
            BatchNorm of the stem bottlenecks. False: timm's conventions (class token N(0, 1e-6),
            Kaiming-normal stem, zero-initialised last BatchNorm of each bottleneck). The head is
            initialised as the releases do either way.
        stem_width: channels of the stem's first convolution.
        drop_rate: dropout on the covariance features (0.5 for So-ViT-14/19, as released).
        pos_drop_rate: dropout on the tokens after the position embedding (timm's ViT).
        proj_drop_rate: dropout after the attention's and the MLP's output projections (timm's ViT).
        attn_drop_rate: dropout on the attention weights (timm's ViT).
        drop_path_rate: stochastic depth, the rate of the last block, rising linearly from 0 (timm's ViT).
        dynamic_img_size: resample the position embedding to each input's token grid.
        device: device of the parameters and buffers (None: torch's default).
        dtype: dtype of the parameters and buffers (None: torch's default).
        head_options: further options of the head's pooling (:class:`covpool.SoViTHead`'s ``pool_options``,
            e.g. ``{"iters": 3}`` for more svPN power iterations).

    Raises:
        ValueError: ``global_pool`` or ``pos_embed`` is not one of its names, ``global_pool=""`` comes with
            ``num_classes > 0``, one of ``in_chans``, ``embed_dim``, ``depth``, ``num_heads``, ``stem_width`` is
            not a positive integer, ``num_heads`` does not divide ``embed_dim``, ``head`` is not a registered
            head that pools tokens, or a head option is invalid.

    Attributes:
        num_features: ``embed_dim``, the width of :meth:`forward_features` ``(B, 1 + N, embed_dim)``.
        head_hidden_size: the pre-logits width, ``embed_dim + head.cov_dim`` (``embed_dim`` without head).
    """

    # What a subclass changes (covpool.models.sot.SoT): the visual-token stem.
    _token_embed: type[VisualTokenEmbed] = VisualTokenEmbed

    # timm's VisionTransformer types these attributes by what its own constructor assigns them, narrower than
    # what So-ViT stores: its head (a SoViTHead, or nn.Identity without one), the fixed sinusoid table as a
    # buffer (a Tensor, not a Parameter) and its pooling names ("cov", "").
    head: SoViTHead | nn.Identity  # type: ignore[assignment]
    pos_embed: torch.Tensor  # type: ignore[assignment]
    global_pool: str  # type: ignore[assignment]
    cls_token: nn.Parameter  # So-ViT always has a class token

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "cov",
            embed_dim: int = 384,
            depth: int = 14,
            num_heads: int = 6,
            mlp_ratio: float = 3.0,
            qkv_bias: bool = False,
            head: str = "svpn",
            reduced_dim: int | tuple[int, int] | None = (64, 48),
            backend: str | Mapping[str, Any] | None = None,
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
            head_options: Mapping[str, Any] | None = None,
    ) -> None:
        check_num_classes(num_classes)
        if global_pool not in _GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {_GLOBAL_POOLS} ('cov': So-ViT's head, '': unpooled "
                             f"tokens), got {global_pool!r}")
        if global_pool == "" and num_classes:
            raise ValueError("global_pool='' (unpooled tokens) needs num_classes=0: So-ViT's classifiers act on "
                             "the pooled class token and covariance")
        head = _head_name(head)
        if pos_embed not in _POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {_POS_EMBEDS}, got {pos_embed!r}")
        for name, value in (("in_chans", in_chans), ("embed_dim", embed_dim), ("depth", depth),
                            ("num_heads", num_heads), ("stem_width", stem_width)):
            check_int(name, value)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        super().__init__(
            img_size=img_size, patch_size=16, in_chans=in_chans, num_classes=0, global_pool="token",
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            class_token=True, pos_embed="learn", fc_norm=False, dynamic_img_size=dynamic_img_size,
            pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate, weight_init="skip",
            embed_layer=partial(self._token_embed, stem_width=stem_width),
            norm_layer=nn.LayerNorm, act_layer=nn.GELU, device=device, dtype=dtype,
        )
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.pos_embed_type = pos_embed
        self.official_init = official_init
        if pos_embed == "sincos":
            # A fixed table: a buffer (saved in the state dict under the release's key, but no parameter that
            # optimisers, parameter counts or gradient checks would see). The release keeps it as a
            # requires_grad=False parameter, which is the same state dict.
            table = self.pos_embed.detach()
            del self.pos_embed
            self.register_buffer("pos_embed", torch.empty_like(table))
        self._head_kwargs: _HeadKwargs = {"reduced_dim": reduced_dim, "backend": backend, "drop_rate": drop_rate,
                                          "head": head, "pool_options": dict(head_options or {})}
        if global_pool:
            self.head = SoViTHead(embed_dim, num_classes, **self._head_kwargs, device=device, dtype=dtype)
        self._sync_head_width()
        self.init_weights()

    def _sync_head_width(self) -> None:
        self.head_hidden_size = self.head.num_features if isinstance(self.head, SoViTHead) else self.embed_dim

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """(Re-)initialise every parameter: the release's recipe if ``official_init``, else timm's (see the
        class doc).

        Args:
            mode: accepted for timm's interface; must be empty (timm's ``"jax"``, ``"moco"``, ... are not offered).
            needs_reset: accepted for timm's interface and ignored: every module is drawn afresh either way.

        Raises:
            ValueError: ``mode`` is not empty.
        """
        if mode:
            raise ValueError(f"So-ViT has no init mode {mode!r}; choose official_init=True/False at construction")
        with torch.no_grad():
            if self.pos_embed_type == "sincos":
                self.pos_embed.copy_(sinusoid_pos_embed(self.pos_embed.shape[1], self.embed_dim))
            else:
                trunc_normal_(self.pos_embed, std=0.02)
            if self.official_init:
                trunc_normal_(self.cls_token, std=0.02)
            else:
                nn.init.normal_(self.cls_token, std=1e-6)
            for m in self.blocks.modules():
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    m.reset_parameters()
            if isinstance(self.norm, nn.LayerNorm):  # always: built with norm_layer=nn.LayerNorm
                self.norm.reset_parameters()
            for m in self.patch_embed.modules():
                if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                    m.reset_parameters()
                    if isinstance(m, nn.Conv2d) and not self.official_init:
                        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if not self.official_init:
                for m in self.patch_embed.modules():
                    if isinstance(m, Bottleneck):
                        m.zero_init_last()
            if isinstance(self.head, SoViTHead):
                self.head.reset_parameters()

    def set_input_size(self, img_size: int | tuple[int, int] | None = None,
                       patch_size: int | tuple[int, int] | None = None) -> None:
        """Change the input resolution: a learned position embedding is resampled (timm's way), the fixed
        sinusoid recomputed for the new number of tokens.

        Args:
            img_size: the new input size, an int or (H, W); None keeps it.
            patch_size: None or 16, the stem's fixed reduction (timm's interface).

        Raises:
            ValueError: ``patch_size`` is not 16, or ``img_size`` is not a positive int or pair.
        """
        if self.pos_embed_type == "learn":
            # timm types both as pairs, but hands them to the patch embedding, which takes an int as well.
            super().set_input_size(img_size, patch_size)  # type: ignore[arg-type]
            return
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        table = sinusoid_pos_embed(self.patch_embed.num_patches + self.num_prefix_tokens, self.embed_dim)
        self.pos_embed = table.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        # timm's own method with nothing left to resample: it records the new input size in the model's args.
        super().set_input_size()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Fresh classifiers for ``num_classes`` (0: :meth:`forward` returns the pre-logits). ``global_pool``:
        None keeps the pooling (a classifier on unpooled tokens brings the second-order head back, as
        ``resnet*_isqrt`` does); ``""`` removes the head (unpooled tokens, ``num_classes`` must be 0);
        ``"cov"`` keeps it, or builds a fresh one if it had been removed."""
        check_num_classes(num_classes)
        if global_pool is not None and global_pool not in _GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {_GLOBAL_POOLS} or None, got {global_pool!r}")
        target = (self.global_pool or ("cov" if num_classes else "")) if global_pool is None else global_pool
        if target == "" and num_classes:
            raise ValueError("global_pool='' (unpooled tokens) needs num_classes=0; pass global_pool='cov' to "
                             "classify")
        ref = self.cls_token
        if target == "":
            self.head = nn.Identity()
        elif isinstance(self.head, SoViTHead):
            self.head.reset_classifier(num_classes)
        else:
            self.head = SoViTHead(self.embed_dim, num_classes, **self._head_kwargs, device=ref.device,
                                  dtype=ref.dtype).train(self.training)
        self.global_pool = target
        self.num_classes = num_classes
        self._sync_head_width()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``(B, 1 + N, C)`` → logits, or the pre-logits ``(B, head_hidden_size)``; the tokens unchanged
        with ``global_pool=''``.

        Args:
            x: what :meth:`forward_features` returns, the class token and the N visual tokens.
            pre_logits: return the class token concatenated with the covariance features instead of the logits
                ``(B, num_classes)``.
        """
        if not self.global_pool:
            return x
        return self.head(x, pre_logits=pre_logits)


# Names of the official releases -> covpool's. So-ViT (jiangtaoxie/So-ViT, 2021) and MPA-Lya So-ViT
# (KingJamesSong/FastDifferentiableMatSqrt) share the backbone names and differ in the head.
_RELEASE_PREFIXES = (
    ("visual_tokens.tokens.stem.0.", "patch_embed.backbone.conv."),
    ("visual_tokens.tokens.stage.", "patch_embed.backbone.stage."),
    ("visual_tokens.tokens.transition.", "patch_embed.proj."),
    ("classifier.cls_fc.", "head.fc_cls."),
    ("classifier.visual_fc.", "head.fc_cov."),
)
_RELEASE_SVPN_BRANCH = re.compile(r"^classifier\.representation\.conv_dr_block\.(\d+)\.([01])\.(.+)$")
_RELEASE_MPA_REDUCE = re.compile(r"^classifier\.representation\.conv_dr_block\.([01])\.(.+)$")
_RELEASE_SVPN_V0 = "classifier.normalization.weight"
_LAYER_NAMES = ("conv", "bn")
# The head layout of each release (as _release_key tells them apart) and the head that loads it.
_RELEASE_HEADS = {"svpn": ("svpn", SvPNCrossCov), "mpa": ("mpa_cov", CovPool)}


def _release_key(key: str) -> tuple[str, str | None]:
    """Map one release key; also say which head layout it belongs to ("svpn", "mpa" or None)."""
    renamed = replace_prefix(key, _RELEASE_PREFIXES)
    if renamed is not None:
        return renamed, None
    if key == _RELEASE_SVPN_V0:
        return "head.pool.v0", "svpn"
    match = _RELEASE_SVPN_BRANCH.match(key)
    if match:
        branch, layer, rest = match.groups()
        return f"head.pool.reduce.{branch}.{_LAYER_NAMES[int(layer)]}.{rest}", "svpn"
    match = _RELEASE_MPA_REDUCE.match(key)
    if match:
        layer, rest = match.groups()
        return f"head.pool.reduce.{_LAYER_NAMES[int(layer)]}.{rest}", "mpa"
    return key, None


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: SoViT) -> dict[str, torch.Tensor]:
    """Map a So-ViT checkpoint onto ``model``.

    Accepts covpool's layout and the authors' releases (So-ViT, ``visual_tokens.tokens.*`` /
    ``classifier.*``; MPA-Lya So-ViT, the same with a one-branch ``conv_dr_block``), raw or as a training
    checkpoint (``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model`` entry, as timm picks it) with
    DataParallel ``module.`` prefixes. A checkpoint whose head is of another layout than ``model.head``'s
    pooling raises (build the model with the ``head=`` it names). The position embedding of another token grid is
    replaced by the model's own table if fixed (sinusoid), resampled (bicubic, class token kept) if learned;
    a model without head (``global_pool=''``) drops the checkpoint's head.
    """
    out: dict[str, torch.Tensor] = {}
    kinds = set()
    for key, value in unwrap_checkpoint(state_dict).items():
        new_key, kind = _release_key(key)
        if kind:
            kinds.add(kind)
        out[new_key] = value
    if not isinstance(model.head, SoViTHead):
        return {k: v for k, v in out.items() if not k.startswith("head.")}
    if not kinds:  # covpool's layout: the two releases' heads told apart by their reduction's keys
        kinds.update(k for k, key in (("svpn", "head.pool.reduce.0.conv.weight"),
                                      ("mpa", "head.pool.reduce.conv.weight")) if key in out)
    wrong = sorted(k for k in kinds if not isinstance(model.head.pool, _RELEASE_HEADS[k][1]))
    if wrong:
        raise ValueError(
            f"the checkpoint has a {'/'.join(_RELEASE_HEADS[k][0] for k in sorted(kinds))} So-ViT head but the "
            f"model was built with head={model.head.head_name!r}; build it with head={_RELEASE_HEADS[wrong[0]][0]!r}"
        )
    return fit_pos_embed(out, model)


def fit_pos_embed(state_dict: dict[str, torch.Tensor], model: SoViT) -> dict[str, torch.Tensor]:
    """A checkpoint's position embedding of another token grid, made to fit ``model`` in place: the model's
    own table if fixed (sinusoid), resampled (bicubic, class token kept) if learned.

    Args:
        state_dict: a checkpoint in covpool's names; its ``pos_embed`` ``(1, prefix + N, C)`` entry is replaced
            when its shape differs from the model's (a square grid of N tokens when learned).
        model: the So-ViT (or SoT) it is loaded into.

    Returns:
        ``state_dict`` itself.

    Raises:
        ValueError: a learned embedding's N tokens are not a square grid.
    """
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        if model.pos_embed_type == "sincos":
            state_dict["pos_embed"] = model.pos_embed.detach().clone()
        else:
            num_old = pos_embed.shape[1] - model.num_prefix_tokens
            side = math.isqrt(num_old)
            if side * side != num_old:
                raise ValueError(f"cannot resample a pos_embed of {num_old} tokens: not a square grid")
            state_dict["pos_embed"] = resample_abs_pos_embed(pos_embed, new_size=model.patch_embed.grid_size,
                                                             old_size=(side, side),
                                                             num_prefix_tokens=model.num_prefix_tokens)
    return state_dict


def _create_so_vit(variant: str, pretrained: bool = False, *, svpn_dims: tuple[int, int], mpa_dim: int,
                   svpn_drop: float, **kwargs: Any) -> SoViT:
    head = kwargs["head"] = _head_name(kwargs.get("head", "svpn"))
    # The release's svPN widths and dropout; every other head the MPA-Lya release's one width, no dropout.
    reduced_dim, drop_rate = (svpn_dims, svpn_drop) if head == "svpn" else (mpa_dim, 0.0)
    kwargs.setdefault("reduced_dim", reduced_dim)
    kwargs.setdefault("drop_rate", drop_rate)
    out_indices = kwargs.pop("out_indices", 3)
    # The released .pth.tar files are timm training checkpoints that also pickle the argparse Namespace of
    # the run; allow that one plain class when timm loads them with weights_only=True.
    with torch.serialization.safe_globals([argparse.Namespace]):
        if pretrained:  # a local file of this model keeps its classifier when it has num_classes rows
            kwargs = keep_fitting_classifier(variant, kwargs, rename=lambda key: _release_key(key)[0])
        return build_model_with_cfg(
            SoViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs,
        )


_RELEASE = "https://jiangtaoxie.oss-cn-beijing.aliyuncs.com/So-ViT/"


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "fixed_input_size": True,
        "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.backbone.conv", "classifier": ("head.fc_cls", "head.fc_cov"),
        "paper_ids": "arXiv:2104.10935", "paper_name": "So-ViT: Mind Visual Tokens for Vision Transformer",
        "origin_url": "https://github.com/jiangtaoxie/So-ViT",
        **kwargs,
    }


def _release_cfg(name: str, version: str, top1: float) -> dict[str, Any]:
    return _cfg(
        url=f"{_RELEASE}{name}.pth.tar?versionId={version}",
        notes=(f"The authors' ImageNet-1k weights (head='svpn'); their README reports {top1}% top-1 at 224².",),
    )


default_cfgs = generate_default_cfgs({
    "so_vit_7.in1k": _release_cfg(
        "So-ViT-7", "CAEQAhiBgIDLutbayBciIGI0ZDEwN2ZiZjk3MjQxMjY5ODQxMTU3OGYxZjYzZWYz", 76.8),
    "so_vit_10.in1k": _release_cfg(
        "So-ViT-10", "CAEQAhiBgMDHutbayBciIDViOTY5ZDFlNTI0ZDQ5NWNhM2IxMTA3OWU4OTlmMmUw", 78.7),
    "so_vit_14.in1k": _release_cfg(
        "So-ViT-14", "CAEQAhiBgIDDutbayBciIGM1YjBlOTIxMjYyNDRhMjY4MjE1MzgxMDcyMjEyNTM1", 82.3),
    "so_vit_19.in1k": _release_cfg(
        "So-ViT-19", "CAEQAhiCgIDDutbayBciIGFkNGQ1ODUzNmQxZDRmYmU5YjQ1NzkxNDVmMTJjZDg0", 82.8),
})


@register_model
def so_vit_7(pretrained: bool = False, **kwargs: Any) -> SoViT:
    """So-ViT-7: 7 blocks of width 256, 4 heads, MLP ratio 2; head 48×24 (svpn) or 48 (mpa).

    Args:
        pretrained: download the authors' ImageNet-1k weights (tag ``.in1k``, ``head="svpn"`` only; timm caches them),
            or load a local copy given by ``pretrained_cfg_overlay=dict(file=path)``.
        **kwargs: the arguments of :class:`SoViT` (``num_classes``, ``img_size``, ``head``, ``reduced_dim`` and
            ``drop_rate``, whose defaults are the release's for the head, ``backend``, ``pos_embed``, ...) and timm's
            builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0)
    return _create_so_vit("so_vit_7", pretrained, svpn_dims=(48, 24), mpa_dim=48, svpn_drop=0.0,
                          **dict(model_args, **kwargs))


@register_model
def so_vit_10(pretrained: bool = False, **kwargs: Any) -> SoViT:
    """So-ViT-10: 10 blocks of width 256, 4 heads, MLP ratio 2; head 48×24 (svpn) or 48 (mpa).

    Args:
        pretrained: download the authors' ImageNet-1k weights (tag ``.in1k``, ``head="svpn"`` only; timm caches them),
            or load a local copy given by ``pretrained_cfg_overlay=dict(file=path)``.
        **kwargs: the arguments of :class:`SoViT` (``num_classes``, ``img_size``, ``head``, ``reduced_dim`` and
            ``drop_rate``, whose defaults are the release's for the head, ``backend``, ``pos_embed``, ...) and timm's
            builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0)
    return _create_so_vit("so_vit_10", pretrained, svpn_dims=(48, 24), mpa_dim=48, svpn_drop=0.0,
                          **dict(model_args, **kwargs))


@register_model
def so_vit_14(pretrained: bool = False, **kwargs: Any) -> SoViT:
    """So-ViT-14: 14 blocks of width 384, 6 heads, MLP ratio 3; head 64×48 with dropout 0.5 (svpn) or 64 (mpa).

    Args:
        pretrained: download the authors' ImageNet-1k weights (tag ``.in1k``, ``head="svpn"`` only; timm caches them),
            or load a local copy given by ``pretrained_cfg_overlay=dict(file=path)``.
        **kwargs: the arguments of :class:`SoViT` (``num_classes``, ``img_size``, ``head``, ``reduced_dim`` and
            ``drop_rate``, whose defaults are the release's for the head, ``backend``, ``pos_embed``, ...) and timm's
            builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)
    return _create_so_vit("so_vit_14", pretrained, svpn_dims=(64, 48), mpa_dim=64, svpn_drop=0.5,
                          **dict(model_args, **kwargs))


@register_model
def so_vit_19(pretrained: bool = False, **kwargs: Any) -> SoViT:
    """So-ViT-19: 19 blocks of width 448, 7 heads, MLP ratio 3; head 96×48 with dropout 0.5 (svpn) or 96 (mpa).

    Args:
        pretrained: download the authors' ImageNet-1k weights (tag ``.in1k``, ``head="svpn"`` only; timm caches them),
            or load a local copy given by ``pretrained_cfg_overlay=dict(file=path)``.
        **kwargs: the arguments of :class:`SoViT` (``num_classes``, ``img_size``, ``head``, ``reduced_dim`` and
            ``drop_rate``, whose defaults are the release's for the head, ``backend``, ``pos_embed``, ...) and timm's
            builder options (``pretrained_cfg_overlay``, ``features_only``, ``out_indices``, ...).
    """
    model_args = dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0)
    return _create_so_vit("so_vit_19", pretrained, svpn_dims=(96, 48), mpa_dim=96, svpn_drop=0.5,
                          **dict(model_args, **kwargs))
