"""``nn.Module`` meta-layers built on :mod:`covpool.linalg`, and the functions that do their maths.

- :class:`CovPool`: global covariance pooling with square-root normalisation (iSQRT-COV).
- :class:`ZCABatchNorm1d`, :class:`ZCABatchNorm2d`, :func:`convert_zca`, :func:`convert_sync_zca`:
  decorrelated (ZCA whitening) batch normalisation, the BatchNorm2d swap and its multi-process form.
- :class:`SoViTHead`: So-ViT's class-token + covariance classification head.
- :func:`set_backend`: change the square-root backend of a built model's covpool layers.
- :func:`register_head`, :func:`list_heads`, :func:`get_head`, :func:`build_head`, :class:`Head`: the registry
  of second-order heads, a name and the module that pools (presets of :class:`CovPool`, So-ViT's and SoT's
  token poolings, and any a user registers).
- :class:`AdaptiveChannelDrop`, :class:`MultiHeadCrossCov`, :class:`SvPNCrossCov`: the pooling modules some
  heads use (DropCov's channel dropout, SoT's multi-headed and So-ViT's single cross-covariance), in
  :mod:`covpool.layers.pooling` with :class:`CovPool`.
- :func:`cov_pool`, :func:`zca_batch_norm`: the functional forms (the rest in :mod:`covpool.layers.functional`).
"""
from .backend_switch import set_backend
from .functional import cov_pool, zca_batch_norm
from .heads import Head, build_head, get_head, list_heads, register_head
from .pooling import AdaptiveChannelDrop, CovPool, MultiHeadCrossCov, SvPNCrossCov
from .sovit_head import SoViTHead
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
    "register_head",
    "list_heads",
    "get_head",
    "build_head",
    "Head",
    "AdaptiveChannelDrop",
    "MultiHeadCrossCov",
    "SvPNCrossCov",
]
