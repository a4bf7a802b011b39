"""So-ViT: a vision transformer with a convolutional visual-token stem and a second-order head.

Xie, Zeng, Wang, Zhou, Li. "So-ViT: Mind Visual Tokens for Vision Transformer." arXiv:2104.10935, 2021.

Three parts, as in the paper:

- visual tokens from a light ResNet stem (3×3 conv, max pool, three bottleneck blocks of stride 2, a 1×1
  projection): 16× downsampling, 14×14 tokens at 224²;
- a class token, learned absolute position embeddings and pre-norm transformer blocks (timm's ``Block``);
- :class:`covpool.SoViTHead`: a linear classifier on the class token plus one on the square-root
  normalised covariance of the visual tokens, summed.

Differences from the authors' code, each for a reason: the position embedding is learned (timm's ViT
convention) rather than a fixed sinusoid, so checkpoints of another resolution are resampled on load with
timm's ``resample_abs_pos_embed``; the token grid follows ``img_size`` for any size (the original code only
supported 224 and 112); the head pools the full covariance of ``cov_reduced_dim`` reduced token channels
(dimension chosen per variant so the head has the width of the paper's 48×24 / 64×48 / 96×48
cross-covariance) with the ``mpa_lya`` square root instead of the paper's single-power-iteration svPN; the
stem's first convolution is followed by BatchNorm and ReLU like a ResNet stem.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, downsample_conv
from timm.models.vision_transformer import Block
from torch import nn

from ..layers import SoViTHead
from ._common import check_num_classes

__all__ = ["SoViT", "VisualTokenStem", "checkpoint_filter_fn"]


def _check_global_pool(global_pool: str | None) -> None:
    if global_pool is not None:
        raise ValueError(f"global_pool={global_pool!r} is not supported: So-ViT's head always combines the class "
                         "token with covariance pooling of the visual tokens (pass None)")


def _tokens_per_side(size: int, num_halvings: int) -> int:
    # Every downsampling layer of the stem (3×3/s2/p1 conv, 3×3/s2/p1 max pool, 1×1/s2 projection)
    # maps n to ceil(n / 2).
    for _ in range(num_halvings):
        size = (size + 1) // 2
    return size


class VisualTokenStem(nn.Module):
    """So-ViT's visual-token embedding: a small ResNet that turns an image into a 16×-downsampled grid.

    3×3 conv (stride 1) + BN + ReLU, 3×3 max pool (stride 2), three timm ``Bottleneck`` blocks of stride 2
    (64 → 256 → 256 → 256 channels), then a 1×1 conv to ``embed_dim``.

    Args:
        img_size: int or (H, W); fixes ``grid_size`` (the token grid) and ``num_patches``.
        in_chans: input channels.
        embed_dim: token width.
        stem_width: channels of the first convolution.

    Shapes: ``(B, in_chans, H, W)`` → ``(B, embed_dim, ⌈H/16⌉, ⌈W/16⌉)``.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, embed_dim: int = 384,
                 stem_width: int = 64) -> None:
        super().__init__()
        self.img_size = tuple(to_2tuple(img_size))
        if len(self.img_size) != 2 or not all(isinstance(s, int) and s > 0 for s in self.img_size):
            raise ValueError(f"img_size must be a positive int or a pair (H, W) of them, got {img_size!r}")
        self.grid_size = tuple(_tokens_per_side(s, 4) for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv = nn.Conv2d(in_chans, stem_width, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(stem_width)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        planes = 64
        blocks = []
        in_chs = stem_width
        for _ in range(3):
            out_chs = planes * Bottleneck.expansion
            blocks.append(Bottleneck(in_chs, planes, stride=2, downsample=downsample_conv(in_chs, out_chs, 1, stride=2)))
            in_chs = out_chs
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Conv2d(in_chs, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.bn(self.conv(x))))
        return self.proj(self.blocks(x))


class SoViT(nn.Module):
    """So-ViT (Xie et al., arXiv:2104.10935): conv visual tokens, ViT blocks and a second-order head.

    Args:
        img_size: int or (H, W); the token grid and position embedding are sized from it.
        in_chans: input channels.
        num_classes: classes of both classifiers of the head; 0 makes :meth:`forward` return the
            ``num_features``-wide pre-logits (class token concatenated with the covariance vector).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer width, blocks, heads, MLP expansion
            and whether q, k, v have biases (False in the paper).
        stem_width: channels of the stem's first convolution.
        cov_reduced_dim: channels the head reduces the visual tokens to before the covariance;
            the covariance vector has ``d(d+1)/2`` entries.
        backend: matrix square-root backend of the head, a name or ``{"name": ..., **options}``, passed
            to :class:`covpool.SoViTHead` untouched.
        drop_rate: dropout before the classifiers; pos_drop_rate, attn_drop_rate, proj_drop_rate and
            drop_path_rate: dropout after the position embedding, on attention and projections, and
            stochastic depth (linearly increasing over the blocks).
        dynamic_img_size: resample the position embedding to each input's token grid instead of
            requiring the ``img_size`` the model was built for.

    Attributes:
        num_features, head_hidden_size: width of ``forward_head(x, pre_logits=True)``: embed_dim + cov_dim.
        embed_dim: token width, the last dimension of ``forward_features``.

    Shapes: ``(B, in_chans, H, W)`` → ``forward_features`` ``(B, 1 + N, embed_dim)`` (class token first)
    → ``forward`` ``(B, num_classes)``.
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str | None = None,
            embed_dim: int = 384,
            depth: int = 14,
            num_heads: int = 6,
            mlp_ratio: float = 3.0,
            qkv_bias: bool = False,
            stem_width: int = 64,
            cov_reduced_dim: int = 78,
            backend: str | Mapping[str, Any] = "mpa_lya",
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            dynamic_img_size: bool = False,
    ) -> None:
        super().__init__()
        _check_global_pool(global_pool)
        for name, value in (("in_chans", in_chans), ("embed_dim", embed_dim), ("depth", depth),
                            ("num_heads", num_heads), ("stem_width", stem_width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = VisualTokenStem(img_size, in_chans, embed_dim, stem_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # Plain Python (not torch.linspace) so the model can be built on the meta device.
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=nn.LayerNorm, act_layer=nn.GELU)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = SoViTHead(embed_dim, num_classes, reduced_dim=cov_reduced_dim, backend=backend,
                              drop_rate=drop_rate)
        self.num_features = self.head_hidden_size = self.head.num_features
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's ViT initialisation for the transformer; the stem keeps timm's ResNet initialisation and the
        # head its own.
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.patch_embed.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if hasattr(m, "zero_init_last"):
                m.zero_init_last()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Fresh class-token and covariance classifiers with ``num_classes`` outputs (``nn.Identity`` for
        0, when :meth:`forward` returns the ``num_features``-wide pre-logits)."""
        check_num_classes(num_classes)
        _check_global_pool(global_pool)
        self.num_classes = num_classes
        self.head.reset_classifier(num_classes)

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos_embed = self.pos_embed
        if grid != self.patch_embed.grid_size:
            if not self.dynamic_img_size:
                raise ValueError(
                    f"input gives a {grid[0]}×{grid[1]} token grid but the model was built for "
                    f"img_size={self.patch_embed.img_size} ({self.patch_embed.grid_size[0]}×"
                    f"{self.patch_embed.grid_size[1]} tokens); build it with img_size=... or dynamic_img_size=True"
                )
            pos_embed = resample_abs_pos_embed(pos_embed, new_size=grid, old_size=self.patch_embed.grid_size,
                                               num_prefix_tokens=self.num_prefix_tokens)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        x = self.patch_embed(x)
        grid = (x.shape[-2], x.shape[-1])
        x = self._pos_embed(x.flatten(2).transpose(1, 2), grid)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: SoViT) -> dict[str, torch.Tensor]:
    """Adapt a So-ViT checkpoint to ``model``: a position embedding for another token grid is resampled
    (bicubic, class token kept) with timm's ``resample_abs_pos_embed``; a non-square source grid must be
    resampled by the caller, since a flat embedding does not record its height and width."""
    out = dict(state_dict)
    pos_embed = out.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        num_old = pos_embed.shape[1] - model.num_prefix_tokens
        side = math.isqrt(num_old)
        if side * side != num_old:
            raise ValueError(f"cannot resample a pos_embed of {num_old} tokens: not a square grid")
        out["pos_embed"] = resample_abs_pos_embed(pos_embed, new_size=model.patch_embed.grid_size,
                                                  old_size=(side, side), num_prefix_tokens=model.num_prefix_tokens)
    return out


def _create_so_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> SoViT:
    return build_model_with_cfg(SoViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "fixed_input_size": True,
        "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv", "classifier": ("head.fc_cls", "head.fc_cov"),
        "paper_ids": "arXiv:2104.10935", "paper_name": "So-ViT: Mind Visual Tokens for Vision Transformer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "so_vit_7": _cfg(),
    "so_vit_10": _cfg(),
    "so_vit_14": _cfg(),
    "so_vit_19": _cfg(),
})


@register_model
def so_vit_7(pretrained: bool = False, **kwargs: Any) -> SoViT:
    """So-ViT-7: 7 blocks of width 256, 4 heads, MLP ratio 2."""
    model_args = dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, cov_reduced_dim=48)
    return _create_so_vit("so_vit_7", pretrained, **dict(model_args, **kwargs))


@register_model
def so_vit_10(pretrained: bool = False, **kwargs: Any) -> SoViT:
    """So-ViT-10: 10 blocks of width 256, 4 heads, MLP ratio 2."""
    model_args = dict(embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0, cov_reduced_dim=48)
    return _create_so_vit("so_vit_10", pretrained, **dict(model_args, **kwargs))


@register_model
def so_vit_14(pretrained: bool = False, **kwargs: Any) -> SoViT:
    """So-ViT-14: 14 blocks of width 384, 6 heads, MLP ratio 3."""
    model_args = dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, cov_reduced_dim=78)
    return _create_so_vit("so_vit_14", pretrained, **dict(model_args, **kwargs))


@register_model
def so_vit_19(pretrained: bool = False, **kwargs: Any) -> SoViT:
    """So-ViT-19: 19 blocks of width 448, 7 heads, MLP ratio 3."""
    model_args = dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0, cov_reduced_dim=96)
    return _create_so_vit("so_vit_19", pretrained, **dict(model_args, **kwargs))
