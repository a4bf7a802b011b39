"""The second-order pooling family as presets of one head, and the pieces the presets add to iSQRT-COV.

A second-order head is four choices: the statistic (centred covariance, uncentred
second moment, or a compact random projection of it), the matrix normalisation (a backend's square root, a
matrix power, none), the element normalisation (signed square root, ℓ2) and the vectorisation (upper
triangle, full matrix, the sketch itself). :class:`covpool.CovPool` takes each as an option; a published head
is a named preset of them (:func:`list_heads`, :func:`get_head`, :func:`build_head`):

========================  ==================================================================================
``isqrt_cov``             Li et al., CVPR 2018: covariance, Newton–Schulz square root, upper triangle
``bcnn``                  Lin, RoyChowdhury, Maji, ICCV 2015: second moment, signed √, ℓ2, full matrix
``improved_bcnn``         Lin, Maji, BMVC 2017: second moment, matrix square root, signed √, ℓ2, full matrix
``mpn_cov``               Li et al., ICCV 2017: covariance, matrix power α by eigendecomposition, triangle
``cbp_ts`` / ``cbp_rm``   Gao et al., CVPR 2016: Tensor Sketch / Random Maclaurin of the second moment, √, ℓ2
``dropcov``               Wang et al., NeurIPS 2022: adaptive channel dropout before a plain covariance
``sot``                   Xie et al., 2021: multi-headed cross-covariance of transformer tokens, svPN
========================  ==================================================================================
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from covpool.linalg._checks import check_keywords

from .covpool_layer import CovPool
from .sovit_head import SOT_CENTERING, MultiHeadCrossCov

__all__ = ["Head", "list_heads", "get_head", "build_head"]


# ------------------------------------------------------------------------------------------ presets
@dataclasses.dataclass(frozen=True)
class Head:
    """A published second-order head: its paper and the options that make it (:class:`covpool.CovPool`'s,
    or for a token head :class:`covpool.layers.sovit_head.MultiHeadCrossCov`'s)."""

    name: str
    paper: str
    options: Mapping[str, Any]
    tokens_only: bool = False
    doc: str = ""

    @property
    def module(self) -> type[nn.Module]:
        """The pooling class that :func:`build_head` builds (:class:`covpool.CovPool`, or
        :class:`covpool.layers.sovit_head.MultiHeadCrossCov` for a token head)."""
        return MultiHeadCrossCov if self.tokens_only else CovPool

    @property
    def keywords(self) -> list[str]:
        """The keyword options :func:`build_head` takes for this head (its pooling class's, but the channel count)."""
        params = list(inspect.signature(self.module.__init__).parameters.values())[2:]  # self, in_channels
        return [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


_HEADS: dict[str, Head] = {}


def _register(head: Head) -> None:
    if head.name in _HEADS:
        raise ValueError(f"head {head.name!r} is already registered")
    _HEADS[head.name] = head


_register(Head("isqrt_cov", "Li, Xie, Wang, Gao, CVPR 2018 (iSQRT-COV)", {},
               doc="covariance, ns square root (5 iterations), upper triangle"))
_register(Head("bcnn", "Lin, RoyChowdhury, Maji, ICCV 2015 (bilinear CNN)",
               {"centered": False, "normalization": "none", "vectorize": "full", "signed_sqrt": True, "l2": True},
               doc="uncentred second moment, signed square root, l2, full matrix"))
_register(Head("improved_bcnn", "Lin, Maji, BMVC 2017 (improved bilinear pooling)",
               {"centered": False, "backend": {"name": "ns", "norm": "fro", "num_iters": 5}, "vectorize": "full",
                "signed_sqrt": True, "l2": True},
               doc="uncentred second moment, matrix square root (their Newton–Schulz: Frobenius-normalised, "
                   "5 iterations; any backend), signed square root, l2, full matrix"))
_register(Head("mpn_cov", "Li, Xie, Wang, Zuo, ICCV 2017 (MPN-COV)", {"normalization": "power", "alpha": 0.5},
               doc="covariance, matrix power alpha by eigendecomposition, upper triangle"))
_register(Head("cbp_ts", "Gao, Beijbom, Zhang, Darrell, CVPR 2016 (compact bilinear, Tensor Sketch)",
               {"centered": False, "normalization": "none", "sketch": "tensor", "signed_sqrt": True, "l2": True},
               doc="Tensor Sketch of the second moment to sketch_dim (8192), signed square root, l2"))
_register(Head("cbp_rm", "Gao, Beijbom, Zhang, Darrell, CVPR 2016 (compact bilinear, Random Maclaurin)",
               {"centered": False, "normalization": "none", "sketch": "maclaurin", "signed_sqrt": True, "l2": True},
               doc="Random Maclaurin projection of the second moment to sketch_dim (8192), signed square root, l2"))
_register(Head("dropcov", "Wang, Gao, Zhang, Xie, Li, Hu, NeurIPS 2022 (DropCov)",
               {"normalization": "none", "channel_drop": "adaptive"},
               doc="adaptive channel dropout in training, then a plain covariance (no normalisation, as the "
                   "authors' code), upper triangle"))
_register(Head("sot", "Xie, Zeng, Wang, Zhou, Li, 2021 (SoT)", {"reduced_dim": (6, 24), "centering": SOT_CENTERING},
               tokens_only=True, doc="transformer tokens: multi-headed cross-covariance (6 heads of 24) centred by one "
                                     "mean per head as the release, svPN, full matrices"))


def list_heads() -> list[str]:
    """Names of the second-order head presets, in registration order."""
    return list(_HEADS)


def get_head(name: str) -> Head:
    """The :class:`Head` preset called ``name``; an unknown name raises and lists the valid ones."""
    try:
        return _HEADS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown head {name!r}; valid heads are: {', '.join(_HEADS)}") from None


def build_head(name: str, in_channels: int, **options: Any) -> nn.Module:
    """The pooling module of head ``name`` for ``in_channels`` channels: the preset's options, overridden by
    ``options``. A :class:`covpool.CovPool` (maps or tokens), or for ``"sot"`` a
    :class:`covpool.layers.sovit_head.MultiHeadCrossCov` (tokens ``(B, N, C)`` only). An option that class does
    not take is a TypeError naming the closest one (:attr:`Head.keywords`).

    Example::

        >>> import torch, covpool
        >>> pool = covpool.build_head("bcnn", 64, reduced_dim=16)
        >>> pool(torch.randn(2, 64, 7, 7)).shape, pool.out_features
        (torch.Size([2, 256]), 256)
    """
    head = get_head(name)
    check_keywords(f"covpool.build_head({name!r}, ...)", options, head.keywords)
    return head.module(in_channels, **{**head.options, **options})
