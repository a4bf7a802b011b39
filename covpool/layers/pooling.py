"""The second-order pooling modules: :class:`CovPool` (iSQRT-COV by default, the whole covariance family by its
options), DropCov's :class:`AdaptiveChannelDrop`, So-ViT's :class:`SvPNCrossCov` and SoT's
:class:`MultiHeadCrossCov`. Each owns its parameters and buffers and calls :mod:`covpool.layers.functional`."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import warnings
from collections import OrderedDict
from typing import Any

import torch
from einops import rearrange
from torch import nn

from covpool.linalg import BackendSpec
from covpool.linalg._checks import check_int, check_number, full_precision

from ._common import Factory
from ._options import CovPoolOptions, as_maps, check_layout, options_signature
from .functional import (
    adaptive_channel_drop,
    compact_bilinear,
    cov_pool,
    cross_covariance,
    multi_head_cross_covariance,
    svpn,
)

__all__ = ["CovPool", "AdaptiveChannelDrop", "SvPNCrossCov", "MultiHeadCrossCov"]


def _reduction(in_channels: int, out_channels: int, factory: Factory) -> nn.Sequential:
    """The 1×1 conv → BatchNorm → ReLU channel reduction of iSQRT-COV and both So-ViT heads."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False, **factory),
        bn=nn.BatchNorm2d(out_channels, **factory),
        act=nn.ReLU(inplace=True),
    ))


def _init_reduction(module: nn.Module) -> None:
    """The releases' initialisation of the reductions in ``module``: Kaiming-normal (fan-out) convolutions,
    unit/zero BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()


class AdaptiveChannelDrop(nn.Module):
    """DropCov's adaptive channel dropout (Wang, Gao, Zhang, Xie, Li, Hu, "DropCov: A Simple yet Effective
    Method for Improving Deep Architectures", NeurIPS 2022; the authors' code, mingzeG/DropCov, ResNet head).

    In training, before the covariance of features ``x`` ``(B, d, N)``: channel weights a = softmax over the
    channels of a 3-tap 1-D convolution of the channels' means (their ECA layer with softmax), x' = x·(1 + a);
    then one drop rate for the batch, p = clamp(1 − (10/log₂ d)·mean_b cos(a_b, r_b), 0, 1), where r_b are the
    row sums of image b's covariance of x', and whole channels of x' are zeroed with probability p (kept ones
    scaled by 1/(1 − p)). In eval mode ``x`` passes unchanged: the method is free at inference.

    Differences from the authors' code: p stays a tensor (theirs is read to the host with ``.item()``, a
    synchronisation per step), and the row sums are two matrix–vector products instead of the d×d covariance;
    the numbers are the same (:doc:`second-order heads </guides/heads>`). The maths:
    :func:`covpool.layers.functional.adaptive_channel_drop`.

    Args:
        channels: d, the channels of the features, an integer >= 2 (else a ValueError: the drop rate divides by
            log₂ d).
        device: device of the channel-weight convolution's parameter (None: torch's default).
        dtype: dtype of that parameter (None: torch's default).
    """

    def __init__(self, channels: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("channels", channels, 2)  # the drop rate divides by log₂ of the channel count
        self.channels = channels
        self.conv = nn.Conv1d(1, 1, kernel_size=3, padding=1, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_channel_drop(x, self.conv.weight) if self.training else x

    def extra_repr(self) -> str:
        return f"{self.channels}"


class _OptionsSignature:
    """A layer class's signature generated from its ``options_class`` (what :func:`inspect.signature`, the docs and
    :attr:`covpool.layers.Head.keywords` read); an instance has none of its own (``inspect`` then reads
    ``forward``)."""

    def __get__(self, obj: Any, cls: type[CovPool]) -> inspect.Signature:
        if obj is not None:
            raise AttributeError("__signature__")
        return options_signature(cls.options_class)


class CovPool(nn.Module):
    """Global second-order pooling: iSQRT-COV by default, and every head of :func:`covpool.list_heads`.

    Li et al., "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square
    Root Normalization", CVPR 2018. Replaces global average pooling: optional channel reduction
    (1×1 conv → BatchNorm → ReLU to ``reduced_dim``), covariance Σ = (1/N) X_c X_cᵀ over the N
    positions, Σ^{1/2} by ``backend``, and the upper triangle as the feature vector. The keyword options
    change each step (the statistic, the matrix normalisation, the vectorisation, the element
    normalisation); the published heads are presets of them (:func:`covpool.build_head`,
    ``swap_pooling(model, head=...)``).

    Two input layouts, told apart by ``ndim`` (``layout="auto"``):

    - ``(B, C, H, W)`` feature maps: N = H·W positions;
    - ``(B, N, C)`` tokens (e.g. a ViT's patch tokens): N tokens, channels last.

    Tokens go through the same reduction as a ``(B, C, N, 1)`` map, so one set of parameters serves both
    layouts: the 1×1 conv is a Linear on each token and the BatchNorm normalises each reduced channel over
    all B·N tokens (BatchNorm1d over tokens).

    Args:
        in_channels: C of the input.
        reduced_dim: d, the channels after reduction (256 in the paper: 32 896 output features), or None
            to pool the C input channels as they are.
        backend: square-root backend, a name or ``{"name": ..., **options}``; the default ``"ns"`` is the
            paper's Newton–Schulz iteration (5 iterations).
        vectorize: ``"triu"`` (True, default) the upper triangle, d(d+1)/2 features; ``"full"`` the whole
            matrix, d² (bilinear pooling); ``"matrix"`` (False) the ``(B, d, d)`` matrix.
        centered: the covariance (default); False the uncentred second moment (1/N)·X Xᵀ (bilinear).
        normalization: ``"sqrt"`` (default, by ``backend``), ``"power"`` (Σ^``alpha`` by eigendecomposition,
            MPN-COV) or ``"none"``.
        alpha: the power of ``normalization="power"`` (0.5).
        signed_sqrt: sign(z)·√|z| per feature z of the vector (bilinear heads;
            :func:`covpool.layers.functional.signed_sqrt`).
        l2: ℓ2 normalisation of the vector, after the signed square root (bilinear heads).
        sqrt_smoothing: δ > 0 makes the signed square root's backward ½/(√|z| + δ), z the statistic summed
            over the positions, as the compact bilinear code has it (0.1 in its MatConvNet layers, 0.03 in
            Caffe's, whose Tensor Sketch is also D times larger: 0.03/√D here); 0 (default) is the bilinear-CNN
            package's ``½/√(|z| + 1e-8)`` (:func:`covpool.cov_pool`; :doc:`/guides/heads`).
        sketch: ``"tensor"`` or ``"maclaurin"``: a compact random projection of the second moment to
            ``sketch_dim`` features instead of the matrix (compact bilinear pooling; needs
            ``normalization="none"``); its random hashes, signs or projections are buffers drawn once from
            ``sketch_seed``, so a checkpoint reproduces them.
        channel_drop: ``"adaptive"``: DropCov's adaptive channel dropout before the covariance, in training
            only (:class:`AdaptiveChannelDrop`).
        gram: where a matrix function is computed. With N < d positions (7×7 maps of 256 channels) the
            covariance has rank below N and the same result, and gradient, comes from the N×N Gram matrix for
            (N/d)³ of the products; ``"auto"`` (default) takes that side where it measured cheaper, True or
            False force it (:func:`covpool.linalg.covariance_sqrtm`).
        layout: ``"auto"``, ``"maps"`` or ``"tokens"``; ``"auto"`` refuses a ``(B, C, C)`` input, which could
            be either.
        device: device of the parameters and buffers (None: torch's default), keyword only.
        dtype: dtype of the floating-point parameters and buffers (None: torch's default), keyword only.

    Raises:
        TypeError: a keyword that is not an option, naming the closest one (``reduced_dimm`` → "did you mean
            'reduced_dim'?") and listing them all; more positional arguments than ``in_channels``,
            ``reduced_dim``, ``backend``, ``vectorize``; an option given twice; a ``backend`` option the backend
            does not have.
        ValueError: ``in_channels`` not a positive integer; an option's value out of its range or an unknown
            backend name, naming it; an option the chosen head never reads
            (``backend`` without ``normalization="sqrt"``, ``alpha`` without ``"power"``, ``sketch_dim`` without a
            sketch, ...); a sketch with a matrix normalisation; ``signed_sqrt``, ``l2`` or a sketch with
            ``vectorize="matrix"``; ``gram=True`` with a backend that has no Gram side.

    Attributes:
        dim: d, the side of the covariance matrix.
        out_features: the output width: d(d+1)/2, d², ``sketch_dim``, or d (the last dimension of the
            ``(B, d, d)`` matrix).

    Numerical caveats: N < d gives a rank-deficient covariance, whose square root and gradient every backend
    computes finitely. ``eig``'s gradient with respect to the features stays close to the exact one there (0.17%
    in float32 on 49 positions of 256 channels; its large kernel between two null directions never reaches
    the features), the SVD family's within 1.5–5%; the iterative backends stop short of convergence on the
    null space, 20–35% below the exact gradient and 18–130% off the exact root (:doc:`choosing a backend
    </guides/backends>`). ``ns`` is the paper's choice. Half-precision input is pooled in float32 and cast back; integer
    features (``reduced_dim=None``) are promoted to the default float dtype, and so is the output.

    Example::

        >>> import torch
        >>> from covpool.layers import CovPool
        >>> pool = CovPool(32, reduced_dim=8)
        >>> pool(torch.randn(2, 32, 7, 7)).shape
        torch.Size([2, 36])
        >>> pool(torch.randn(2, 49, 32)).shape, pool.out_features
        (torch.Size([2, 36]), 36)
        >>> CovPool(32, 8, sketch="tensor", sketch_dim=128, centered=False, normalization="none").out_features
        128
    """

    #: the declaration of the options: signature, checks, :attr:`options`, unpickling and ``extra_repr`` read it
    options_class: type[CovPoolOptions] = CovPoolOptions
    __signature__ = _OptionsSignature()

    # Every option is an attribute of its own name, set from options_class in __init__; declared here with its
    # type after the checks (vectorize and normalization normalised to their names).
    reduced_dim: int | None
    backend: BackendSpec
    vectorize: str
    centered: bool
    normalization: str
    alpha: float
    signed_sqrt: bool
    l2: bool
    sqrt_smoothing: float
    sketch: str | None
    sketch_dim: int
    sketch_seed: int
    channel_drop: str | None
    gram: bool | str
    layout: str
    # The sketch's fixed random parameters, buffers of a sketch head only (_draw_sketch).
    h1: torch.Tensor
    s1: torch.Tensor
    h2: torch.Tensor
    s2: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor

    def __init__(self, in_channels: int, *args: Any, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__()
        # A typo ends in the closest option's name, not in Python's bare "unexpected keyword argument".
        declared = self.options_class.bind("covpool.CovPool", args, options)
        check_int("in_channels", in_channels)
        factory: Factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        for name, value in dataclasses.asdict(declared).items():  # every option an attribute of its own name
            setattr(self, name, value)
        self.dim = in_channels if self.reduced_dim is None else self.reduced_dim
        if self.sketch is not None:
            self.out_features = self.sketch_dim
        else:
            self.out_features = {"triu": self.dim * (self.dim + 1) // 2, "full": self.dim * self.dim,
                                 "matrix": self.dim}[self.vectorize]
        if self.reduced_dim is None:
            self.reduce: nn.Module = nn.Identity()
        else:
            self.reduce = _reduction(in_channels, self.reduced_dim, factory)
        self.drop: nn.Module = AdaptiveChannelDrop(self.dim, **factory) if self.channel_drop else nn.Identity()
        if self.sketch is not None:
            self._draw_sketch(factory)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A module pickled whole (torch.save(model)) by an older covpool lacks the options added since: their
        # defaults are what it computed with. Older spellings (vectorize=True) are normalised by the checks.
        for f in dataclasses.fields(self.options_class):
            state[f.name] = f.metadata["check"](f.name, state.get(f.name, f.default))
        super().__setstate__(state)
        if "drop" not in self._modules:
            self.drop = nn.Identity()

    def _declared(self) -> CovPoolOptions:
        return self.options_class(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self.options_class)})

    @property
    def uses_backend(self) -> bool:
        """Whether ``backend`` computes anything: a square root (``normalization="sqrt"``, no sketch)."""
        return self.options_class.reads("backend", {"normalization": self.normalization, "sketch": self.sketch})

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments that build this pooling again, ``CovPool(pool.in_channels, **pool.options)``
        (fresh parameters; the same sketch, drawn from the same seed): every option the head reads or that differs
        from its default. Every option is kept as an attribute of its own name."""
        return copy.deepcopy(self._declared().read())

    def _draw_sketch(self, factory: Factory) -> None:
        """The sketch's fixed random parameters, drawn from ``sketch_seed`` with a generator of its own (the
        global random state is untouched): Tensor Sketch hashes h₁, h₂ in [0, D) and signs s₁, s₂ in ±1,
        independent for the two count sketches; Random Maclaurin projections W₁, W₂ of ±1/√D (Rademacher, the
        authors' scaling)."""
        g = torch.Generator().manual_seed(self.sketch_seed)
        d, dim = self.dim, self.sketch_dim
        device = factory.get("device")
        float_factory: Factory = {"device": device, "dtype": factory.get("dtype") or torch.get_default_dtype()}
        if self.sketch == "tensor":
            for t in (1, 2):
                self.register_buffer(f"h{t}", torch.randint(dim, (d,), generator=g).to(device))
                sign = torch.randint(2, (d,), generator=g) * 2 - 1
                self.register_buffer(f"s{t}", sign.to(**float_factory))
        else:
            for t in (1, 2):
                w = (torch.randint(2, (d, dim), generator=g) * 2 - 1) / math.sqrt(dim)
                self.register_buffer(f"w{t}", w.to(**float_factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``x``: feature maps ``(B, C, H, W)`` or tokens ``(B, N, C)`` → ``(B, out_features)`` (or
        ``(B, d, d)`` with ``vectorize="matrix"``), in the dtype of ``x``. A ValueError names a shape that is
        neither (or both, with ``layout="auto"``) and an input without a position."""
        maps = as_maps(x, self.in_channels, "CovPool", self.layout)
        feats = self.drop(self.reduce(maps).flatten(2))
        if self.sketch is None:
            return cov_pool(feats, self.backend, self.vectorize, self.gram, centered=self.centered,
                            normalization=self.normalization, alpha=self.alpha, signed_sqrt=self.signed_sqrt,
                            l2=self.l2, sqrt_smoothing=self.sqrt_smoothing)
        projection = (self.h1, self.s1, self.h2, self.s2) if self.sketch == "tensor" else (self.w1, self.w2)
        return compact_bilinear(feats, self.sketch, projection, self.sketch_dim, centered=self.centered,
                                signed_sqrt=self.signed_sqrt, l2=self.l2, sqrt_smoothing=self.sqrt_smoothing)

    def extra_repr(self) -> str:
        return ", ".join([f"{self.in_channels}", *self._declared().shown(), f"out_features={self.out_features}"])


_CENTERINGS = ("feature", "scalar")
_TOKEN_NORMALIZATIONS = ("svpn", "none")


class SvPNCrossCov(nn.Module):
    """So-ViT's cross-covariance pooling with svPN normalisation (the release's ``Covariance(cov_type='cross')``
    followed by ``svPN``).

    Two branches 1×1 conv → BatchNorm → ReLU reduce the C channels to d1 and d2; the cross-covariance
    ``(d1, d2)`` of the two (means removed over the N positions) is normalised by :func:`svpn` with a learned
    power-iteration start vector ``v0`` ``(d1,)``, and flattened row-major: ``d1·d2`` features.

    Args:
        in_channels: C.
        reduced_dim: (d1, d2), (48, 24) for So-ViT-7/10, (64, 48) for So-ViT-14, (96, 48) for So-ViT-19 (called
            ``dims`` before covpool 0.2: that keyword still works for one release, with a FutureWarning).
        alpha: svPN's exponent of the top singular value (0.5 released).
        iters: svPN's power iterations, >= 1 (1 released).
        eps: svPN's denominator guard (1e-5 released).
        layout: ``"auto"``, ``"maps"`` or ``"tokens"``, as :class:`covpool.CovPool`'s.
        device: device of the parameters and buffers (None: torch's default).
        dtype: dtype of the parameters and buffers (None: torch's default).
        **deprecated: ``dims=``, the old name of ``reduced_dim`` (a FutureWarning); any other keyword is a
            TypeError.

    Shapes: ``(B, C, H, W)`` or tokens ``(B, N, C)`` → ``(B, d1·d2)``. The BatchNorms normalise over all
    B·N positions. Half-precision input is pooled in float32 and cast back. A count that is not a positive
    integer, ``reduced_dim`` not a pair or an unknown ``layout`` is a ValueError naming it.
    """

    def __init__(self, in_channels: int, reduced_dim: tuple[int, int] = (64, 48), alpha: float = 0.5,
                 iters: int = 1, eps: float = 1e-5, *, layout: str = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, **deprecated: Any) -> None:
        super().__init__()
        unknown = sorted(deprecated.keys() - {"dims"})
        if unknown:
            raise TypeError(f"SvPNCrossCov got an unexpected keyword argument {unknown[0]!r}")
        if "dims" in deprecated:
            warnings.warn("SvPNCrossCov(dims=...) is now SvPNCrossCov(reduced_dim=...), as every head's reduction is "
                          "called; dims= goes in the next release", FutureWarning, stacklevel=2)
            reduced_dim = deprecated["dims"]
        check_int("in_channels", in_channels)
        dims = reduced_dim
        if not isinstance(dims, (tuple, list)) or len(dims) != 2:
            raise ValueError(f"reduced_dim must be a pair (d1, d2) of branch widths, got {dims!r}")
        for d in dims:
            check_int("reduced_dim[i]", d)
        check_int("iters", iters)
        check_layout(layout)
        factory: Factory = {"device": device, "dtype": dtype}
        d1, d2 = dims
        self.in_channels = in_channels
        self.reduced_dim = (d1, d2)
        self.alpha, self.iters, self.eps = float(alpha), iters, float(eps)
        self.layout = layout
        self.out_features = d1 * d2
        self.reduce = nn.ModuleList([_reduction(in_channels, d, factory) for d in self.reduced_dim])
        self.v0 = nn.Parameter(torch.empty(d1, **factory))
        self.reset_parameters()

    @property
    def dims(self) -> tuple[int, int]:
        """``reduced_dim``, its name before covpool 0.2."""
        return self.reduced_dim

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments that build this pooling again (fresh parameters)."""
        return {"reduced_dim": self.reduced_dim, "alpha": self.alpha, "iters": self.iters, "eps": self.eps,
                "layout": self.layout}

    def reset_parameters(self) -> None:
        """The release's initialisation: Kaiming-normal (fan-out) convolutions, unit/zero BatchNorm,
        standard-normal start vector."""
        _init_reduction(self.reduce)
        nn.init.normal_(self.v0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = as_maps(x, self.in_channels, "SvPNCrossCov", self.layout)
        a, b = (branch(maps).flatten(2) for branch in self.reduce)
        return full_precision(lambda a, b: svpn(cross_covariance(a, b), self.v0, self.alpha, self.iters,
                                                self.eps).flatten(-2), a, b, dtype=x.dtype)

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "dims" in state:  # pickled whole before the reduction took its common name
            state["reduced_dim"] = state.pop("dims")
        super().__setstate__(state)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, reduced_dim={self.reduced_dim}, alpha={self.alpha}, iters={self.iters}, "
                f"eps={self.eps}")


class MultiHeadCrossCov(nn.Module):
    """SoT's multi-headed global cross-covariance pooling of transformer tokens (Xie, Zeng, Wang, Zhou, Li,
    "SoT: Delving Deeper into Classification Head for Transformer", 2021; jiangtaoxie/SoT,
    ``MultiHeadPooling``).

    The tokens ``(B, N, C)`` are projected without bias to 2·h·d_r channels (``proj``, their ``wr``) and split
    into h heads of a query and a key ``(N, d_r)``; each head's cross-covariance P = Q_cᵀ K_c / N is
    normalised by svPN with a learned start vector ``v0`` ``(d_r,)`` shared by the heads (their
    ``norm.weight``; SoT iterates from the right, P·v0, which is :func:`svpn` of Pᵀ, transposed), and the
    h matrices are flattened row-major: h·d_r² features.

    The transformers of DropCov (Wang, Gao, Zhang, Xie, Li, Hu, NeurIPS 2022; mingzeG/DropCov,
    ``Transformers/src``) use this pooling with ``normalization="none"`` and ``token_drop=0.2``: no svPN, and
    in training a token's query and key rows of one head are zeroed together.

    Args:
        in_channels: C, the token width.
        reduced_dim: (h, d_r): 6 heads of 14, 24 and 38 in SoT-Tiny, -Small and -Base.
        alpha: svPN's exponent of the top singular value, in (0, 1] (0.5 released).
        iters: svPN's power iterations, >= 1 (1 released).
        eps: svPN's denominator guard, >= 0 (1e-5 released).
        centering: ``"feature"`` (default) subtracts each channel's mean over the tokens, the
            cross-covariance; ``"scalar"`` subtracts one mean over all of a head's tokens and channels, which
            is what the released code computes (``adaptive_avg_pool2d`` on a 3-D tensor), and what the ``sot``
            head uses. With tokens that have per-channel means the two are ~100%
            apart (:doc:`second-order heads </guides/heads>`).
        normalization: ``"svpn"`` (default, SoT) or ``"none"`` (the plain matrices, DropCov's transformers;
            no ``v0`` then).
        token_drop: in training, each (image, head, token) has its query and key rows zeroed with this
            probability before the centring, the kept ones scaled by 1/(1 − p) (0.2 in DropCov's
            transformers). The mask is drawn as their ``Dropout2d`` on a ``(B·h, N, ·)`` tensor draws it (one
            Bernoulli per row, in that order), so a seeded run draws the same tokens. 0 (default): none.
        layout: ``"tokens"`` (default) or ``"auto"`` (also ``(B, C, H, W)`` maps, as positions).
        device: device of the parameters (None: torch's default).
        dtype: dtype of the parameters (None: torch's default).

    Shapes: ``(B, N, C)`` → ``(B, h·d_r²)``. Half-precision input is pooled in float32 and cast back. A count
    that is not a positive integer, ``reduced_dim`` not a pair, a number out of its range or an unknown
    ``centering``, ``normalization`` or ``layout`` is a ValueError naming it.
    """

    def __init__(self, in_channels: int, reduced_dim: tuple[int, int] = (6, 24), alpha: float = 0.5,
                 iters: int = 1, eps: float = 1e-5, *, centering: str = "feature", normalization: str = "svpn",
                 token_drop: float = 0.0, layout: str = "tokens", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        if not isinstance(reduced_dim, (tuple, list)) or len(reduced_dim) != 2:
            raise ValueError(f"reduced_dim must be a pair (heads, head width), got {reduced_dim!r}")
        heads, width = reduced_dim
        check_int("reduced_dim[0] (heads)", heads)
        check_int("reduced_dim[1] (head width)", width)
        check_int("iters", iters)
        check_number("alpha", alpha, 0.0, 1.0, open_low=True)
        check_number("eps", eps, 0.0)
        if centering not in _CENTERINGS:
            raise ValueError(f"centering must be one of {_CENTERINGS}, got {centering!r}")
        if normalization not in _TOKEN_NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {_TOKEN_NORMALIZATIONS}, got {normalization!r}")
        check_number("token_drop", token_drop, 0.0, 1.0, open_high=True)
        check_layout(layout, ("tokens", "auto"))
        factory: Factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.reduced_dim = (heads, width)
        self.alpha, self.iters, self.eps = float(alpha), iters, float(eps)
        self.centering, self.layout = centering, layout
        self.normalization, self.token_drop = normalization, float(token_drop)
        self.out_features = heads * width * width
        self.proj = nn.Linear(in_channels, 2 * heads * width, bias=False, **factory)
        self.v0 = nn.Parameter(torch.empty(width, **factory)) if normalization == "svpn" else None
        self.reset_parameters()

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments that build this pooling again (fresh parameters)."""
        return {"reduced_dim": self.reduced_dim, "alpha": self.alpha, "iters": self.iters, "eps": self.eps,
                "centering": self.centering, "normalization": self.normalization, "token_drop": self.token_drop,
                "layout": self.layout}

    def reset_parameters(self) -> None:
        """The release's initialisation: trunc-normal (std 0.02) projection, standard-normal start vector."""
        nn.init.trunc_normal_(self.proj.weight, std=0.02, a=-2.0, b=2.0)
        if self.v0 is not None:
            nn.init.normal_(self.v0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = as_maps(x, self.in_channels, "MultiHeadCrossCov", self.layout).flatten(2).mT  # (B, N, C)
        q, k = rearrange(self.proj(tokens), "b n (two h d) -> two b h n d", two=2, h=self.reduced_dim[0])
        drop = self.token_drop if self.training else 0.0
        return full_precision(lambda q, k: multi_head_cross_covariance(
            q, k, self.v0, centering=self.centering, alpha=self.alpha, iters=self.iters, eps=self.eps,
            token_drop=drop), q, k, dtype=x.dtype)

    def extra_repr(self) -> str:
        drop = f", token_drop={self.token_drop}" if self.token_drop else ""
        return (f"{self.in_channels}, reduced_dim={self.reduced_dim}, normalization={self.normalization!r}, "
                f"alpha={self.alpha}, iters={self.iters}, centering={self.centering!r}{drop}, "
                f"out_features={self.out_features}")
