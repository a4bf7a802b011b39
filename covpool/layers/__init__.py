"""``nn.Module`` meta-layers built on :mod:`covpool.linalg`, and the functions that do their maths.

- :class:`CovPool`: global covariance pooling with square-root normalisation (iSQRT-COV).
- :class:`ZCABatchNorm1d`, :class:`ZCABatchNorm2d`, :func:`convert_zca`, :func:`convert_sync_zca`:
  decorrelated (ZCA whitening) batch normalisation, the BatchNorm2d swap and its multi-process form.
- :class:`SoViTHead`: So-ViT's class-token + covariance classification head.
- :func:`set_backend`: change the square-root backend of a built model's covpool layers.
- :func:`list_heads`, :func:`get_head`, :func:`build_head`, :class:`Head`: the published second-order heads as
  presets of :class:`CovPool` (and SoT's token head).
- :class:`AdaptiveChannelDrop`, :class:`MultiHeadCrossCov`, :class:`SvPNCrossCov`: the pieces some presets add
  (DropCov's channel dropout, SoT's multi-headed and So-ViT's single cross-covariance).
- :func:`cov_pool`, :func:`zca_batch_norm`: the functional forms.
"""
from .backend_switch import set_backend
from .covpool_layer import AdaptiveChannelDrop, CovPool
from .functional import cov_pool, zca_batch_norm
from .heads import Head, build_head, get_head, list_heads
from .sovit_head import MultiHeadCrossCov, SoViTHead, SvPNCrossCov
from .zca import ZCABatchNorm1d, ZCABatchNorm2d, convert_sync_zca, convert_zca

__all__ = [
    "CovPool",
    "ZCABatchNorm1d",
    "ZCABatchNorm2d",
    "convert_zca",
    "convert_sync_zca",
    "SoViTHead",
    "cov_pool",
    "zca_batch_norm",
    "set_backend",
    "list_heads",
    "get_head",
    "build_head",
    "Head",
    "AdaptiveChannelDrop",
    "MultiHeadCrossCov",
    "SvPNCrossCov",
]
