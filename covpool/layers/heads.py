"""The second-order heads: a public registry of named presets, as the backends have one.

A second-order head is four choices: the statistic (centred covariance, uncentred second moment, or a compact
random projection of it), the matrix normalisation (a backend's square root, a matrix power, svPN, none), the
element normalisation (signed square root, ℓ2) and the vectorisation (upper triangle, full matrix, the sketch
itself). A :class:`Head` is a name, the module that pools (:class:`covpool.CovPool`, which takes each choice as
an option, or another pooling module) and the options that make the published head; :func:`register_head` adds
one, and every place that takes a head takes its name (:func:`build_head`, :func:`covpool.swap_pooling`,
:class:`covpool.SoViTHead`, the So-ViT and SoT models, configs):

========================  ==================================================================================
``isqrt_cov``             Li et al., CVPR 2018: covariance, Newton–Schulz square root, upper triangle
``bcnn``                  Lin, RoyChowdhury, Maji, ICCV 2015: second moment, signed √, ℓ2, full matrix
``improved_bcnn``         Lin, Maji, BMVC 2017: second moment, matrix square root, signed √, ℓ2, full matrix
``mpn_cov``               Li et al., ICCV 2017: covariance, matrix power α by eigendecomposition, triangle
``cbp_ts`` / ``cbp_rm``   Gao et al., CVPR 2016: Tensor Sketch / Random Maclaurin of the second moment, √, ℓ2
``dropcov``               Wang et al., NeurIPS 2022: adaptive channel dropout before a plain covariance
``mpa_cov``               Song et al., ICLR 2022: covariance, MPA-Lya square root, upper triangle
``svpn``                  Xie et al., 2021 (So-ViT): tokens, cross-covariance of two branches, svPN
``sot``                   Xie et al., 2021 (SoT): multi-headed cross-covariance of transformer tokens, svPN
========================  ==================================================================================
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from covpool.linalg._checks import check_keywords

from .pooling import CovPool, MultiHeadCrossCov, SvPNCrossCov

__all__ = ["Head", "register_head", "list_heads", "get_head", "build_head"]

_LAYOUTS = ("maps", "tokens")


@dataclasses.dataclass(frozen=True)
class Head:
    """A registered second-order head (:func:`register_head`): ``name``, the name every ``head=`` takes;
    ``paper``, the publication it reproduces; ``options``, the keyword options of ``module`` that make the head
    (the caller's override them); ``module``, what ``build`` calls, ``module(in_channels, **options)``: a
    pooling class such as :class:`covpool.CovPool`, or a function returning an ``nn.Module`` whose ``forward``
    takes maps ``(B, C, H, W)`` and/or tokens ``(B, N, C)`` and returns ``(B, out_features)`` (an attribute
    of it); ``layouts``, what it pools: ``("maps", "tokens")``, or ``("tokens",)`` for a transformer-only head;
    ``doc``, one line on what it computes."""

    name: str
    paper: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    module: Callable[..., nn.Module] = CovPool
    layouts: tuple[str, ...] = _LAYOUTS
    doc: str = ""

    @property
    def tokens_only(self) -> bool:
        """Whether it pools transformer tokens only (no feature maps)."""
        return "maps" not in self.layouts

    @property
    def keywords(self) -> list[str]:
        """The keyword options :meth:`build` takes: the named parameters of its ``module`` after the channel
        count."""
        params = list(inspect.signature(self.module).parameters.values())[1:]
        return [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]

    @property
    def uses_backend(self) -> bool:
        """Whether it takes a matrix square root whose backend ``backend=`` chooses (what
        :func:`covpool.set_backend` changes)."""
        if "backend" not in self.keywords:
            return False
        declared = getattr(self.module, "options_class", None)
        return declared is None or declared.reads("backend", self.options)

    def build(self, in_channels: int, **options: Any) -> nn.Module:
        """The head's pooling module for ``in_channels`` channels: its own ``options``, overridden by the ones
        given (an option its ``module`` does not take is a TypeError naming the closest one)."""
        check_keywords(f"covpool.build_head({self.name!r}, ...)", options, self.keywords)
        return self.module(in_channels, **{**copy.deepcopy(dict(self.options)), **options})


_HEADS: dict[str, Head] = {}


def register_head(name: str, module: Callable[..., nn.Module] = CovPool, options: Mapping[str, Any] | None = None,
                  *, paper: str = "", doc: str = "", layouts: Sequence[str] = _LAYOUTS) -> Head:
    """Register a second-order head under ``name``, so that every ``head=`` takes it (:func:`build_head`,
    :func:`covpool.swap_pooling`, :class:`covpool.SoViTHead`, a config's ``model.head``).

    Args:
        name: the head's name, a non-empty string not yet registered.
        module: what builds its pooling, ``module(in_channels, **options)``: a pooling class (default
            :class:`covpool.CovPool`, whose options give the whole covariance family) or a function returning an
            ``nn.Module`` whose forward returns ``(B, out_features)`` and which has an integer ``out_features``.
        options: the head's keyword options of ``module``, checked against its keywords now (a caller's
            override them at build time); None: none.
        paper: the publication the head reproduces, for the heads reference and :class:`Head`.
        doc: one line on what it computes, for the same.
        layouts: what it pools: ``("maps", "tokens")`` (default), ``("maps",)``, or ``("tokens",)`` for a
            transformer-only head (which :class:`covpool.SoViTHead` requires).

    Returns:
        The registered :class:`Head`.

    Raises:
        TypeError: ``name`` is not a non-empty string; ``module`` is not callable; an option ``module`` does
            not take (naming the closest).
        ValueError: ``name`` is already registered; ``layouts`` empty or with another entry.

    Example::

        >>> import torch, covpool
        >>> head = covpool.register_head("cov_power_03", options={"normalization": "power", "alpha": 0.3},
        ...                              paper="example", doc="covariance to the power 0.3, upper triangle")
        >>> covpool.build_head("cov_power_03", 16, reduced_dim=4)(torch.randn(2, 16, 5, 5)).shape
        torch.Size([2, 10])
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a head name must be a non-empty string, got {name!r}")
    if name in _HEADS:
        raise ValueError(f"head {name!r} is already registered; pick another name")
    if not callable(module):
        raise TypeError(f"module must be a pooling class or a function (in_channels, **options) -> nn.Module, "
                        f"got {type(module).__name__}")
    layouts = tuple(layouts)
    if not layouts or set(layouts) - set(_LAYOUTS):
        raise ValueError(f"layouts must be a non-empty choice of {_LAYOUTS}, got {layouts!r}")
    head = Head(name, paper, types.MappingProxyType(dict(options or {})), module, layouts, doc)
    check_keywords(f"covpool.register_head({name!r}, ...)", head.options, head.keywords)
    _HEADS[name] = head
    return head


def list_heads() -> list[str]:
    """Names of the registered heads, in registration order."""
    return list(_HEADS)


def get_head(name: str) -> Head:
    """The :class:`Head` registered as ``name``; an unknown name raises and lists the valid ones."""
    try:
        return _HEADS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown head {name!r}; valid heads are: {', '.join(_HEADS)}") from None


def build_head(name: str, in_channels: int, **options: Any) -> nn.Module:
    """The pooling module of head ``name`` for ``in_channels`` channels: the head's options, overridden by
    ``options`` (:meth:`Head.build`). A :class:`covpool.CovPool` (maps or tokens) for the covariance heads, a
    :class:`covpool.layers.SvPNCrossCov` or :class:`covpool.layers.MultiHeadCrossCov` (tokens ``(B, N, C)``)
    for ``"svpn"`` and ``"sot"``. An option that module does not take is a TypeError naming the closest one
    (:attr:`Head.keywords`).

    Example::

        >>> import torch, covpool
        >>> pool = covpool.build_head("bcnn", 64, reduced_dim=16)
        >>> pool(torch.randn(2, 64, 7, 7)).shape, pool.out_features
        (torch.Size([2, 256]), 256)
    """
    return get_head(name).build(in_channels, **options)


register_head("isqrt_cov", paper="Li, Xie, Wang, Gao, CVPR 2018 (iSQRT-COV)",
              doc="covariance, ns square root (5 iterations), upper triangle")
register_head("bcnn", options={"centered": False, "normalization": "none", "vectorize": "full", "signed_sqrt": True,
                               "l2": True},
              paper="Lin, RoyChowdhury, Maji, ICCV 2015 (bilinear CNN)",
              doc="uncentred second moment, signed square root, l2, full matrix")
register_head("improved_bcnn", options={"centered": False, "backend": {"name": "ns", "norm": "fro", "num_iters": 5},
                                        "vectorize": "full", "signed_sqrt": True, "l2": True},
              paper="Lin, Maji, BMVC 2017 (improved bilinear pooling)",
              doc="uncentred second moment, matrix square root (their Newton–Schulz: Frobenius-normalised, "
                  "5 iterations; any backend), signed square root, l2, full matrix")
register_head("mpn_cov", options={"normalization": "power", "alpha": 0.5},
              paper="Li, Xie, Wang, Zuo, ICCV 2017 (MPN-COV)",
              doc="covariance, matrix power alpha by eigendecomposition, upper triangle")
register_head("cbp_ts", options={"centered": False, "normalization": "none", "sketch": "tensor", "signed_sqrt": True,
                                 "l2": True},
              paper="Gao, Beijbom, Zhang, Darrell, CVPR 2016 (compact bilinear, Tensor Sketch)",
              doc="Tensor Sketch of the second moment to sketch_dim (8192), signed square root, l2")
register_head("cbp_rm", options={"centered": False, "normalization": "none", "sketch": "maclaurin",
                                 "signed_sqrt": True, "l2": True},
              paper="Gao, Beijbom, Zhang, Darrell, CVPR 2016 (compact bilinear, Random Maclaurin)",
              doc="Random Maclaurin projection of the second moment to sketch_dim (8192), signed square root, l2")
register_head("dropcov", options={"normalization": "none", "channel_drop": "adaptive"},
              paper="Wang, Gao, Zhang, Xie, Li, Hu, NeurIPS 2022 (DropCov)",
              doc="adaptive channel dropout in training, then a plain covariance (no normalisation, as the "
                  "authors' code), upper triangle")
register_head("mpa_cov", options={"backend": "mpa_lya"},
              paper="Song, Sebe, Wang, ICLR 2022 (Fast Differentiable Matrix Square Root: MPA-Lya)",
              doc="covariance, MPA-Lya square root (Padé approximant, Lyapunov backward; any backend), upper "
                  "triangle: the head of their So-ViT (so_vit_*(head='mpa_cov'))")
register_head("svpn", SvPNCrossCov, layouts=("tokens",),
              paper="Xie, Zeng, Wang, Zhou, Li, 2021 (So-ViT)",
              doc="transformer tokens: cross-covariance of two 1×1 conv → BN → ReLU branches (reduced_dim=(d1, d2)), "
                  "svPN (singular-value power normalisation), full matrix: the head of the So-ViT release")
register_head("sot", MultiHeadCrossCov, {"reduced_dim": (6, 24), "centering": "scalar"}, layouts=("tokens",),
              paper="Xie, Zeng, Wang, Zhou, Li, 2021 (SoT)",
              doc="transformer tokens: multi-headed cross-covariance (6 heads of 24) centred by one mean per head as "
                  "the release, svPN, full matrices")
