"""``CovPool``: global second-order pooling, iSQRT-COV by default and the whole family by its options, and
DropCov's adaptive channel dropout."""
from __future__ import annotations

import copy
import inspect
import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from covpool.linalg import BackendSpec, resolve_backend
from covpool.linalg._checks import check_int, check_keywords, check_number, work_dtype

from .functional import (
    as_maps,
    check_layout,
    check_smoothing,
    check_used,
    cov_pool,
    element_norm,
    normalization_mode,
    random_maclaurin,
    tensor_sketch,
    vectorize_mode,
)

__all__ = ["CovPool", "AdaptiveChannelDrop"]


def _reduction(in_channels: int, out_channels: int, factory: dict) -> nn.Sequential:
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
    the numbers are the same (:doc:`second-order heads </guides/heads>`).
    """

    def __init__(self, channels: int, *, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("channels", channels, 2)  # the drop rate divides by log₂ of the channel count
        self.channels = channels
        self.conv = nn.Conv1d(1, 1, kernel_size=3, padding=1, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        a = torch.softmax(self.conv(x.mean(-1).unsqueeze(1)).squeeze(1), dim=-1)
        x = x * (1 + a).unsqueeze(-1)
        with torch.no_grad():
            xc = x - x.mean(-1, keepdim=True)
            rows = (xc @ xc.sum(1, keepdim=True).mT).squeeze(-1) / x.shape[-1]  # Σ_j Cov(x')_ij
            cosine = F.cosine_similarity(a, rows, dim=-1, eps=1e-8)
            p = (1 - 10 / math.log2(self.channels) * cosine.mean()).clamp(0.0, 1.0)
            keep = torch.rand(x.shape[:2], device=x.device) >= p
            mask = keep.to(x.dtype) * torch.where(p < 1, 1 / (1 - p), 0.0).to(x.dtype)
        return x * mask.unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.channels}"


def _option_defaults() -> dict[str, Any]:
    """``CovPool``'s options (its keyword arguments but the channel count and the factory kwargs) and their
    defaults, read from its signature: one list for :attr:`CovPool.options` and for unpickling."""
    params = inspect.signature(CovPool.__init__).parameters.values()
    return {p.name: p.default for p in params
            if p.name not in ("self", "in_channels", "device", "dtype") and p.kind is not p.VAR_KEYWORD}


_SKETCHES = ("tensor", "maclaurin")
_CHANNEL_DROPS = ("adaptive",)


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
        signed_sqrt, l2: sign(x)·√|x| per feature, then ℓ2 normalisation of the vector (bilinear heads).
        sqrt_smoothing: δ > 0 makes the signed square root's backward ``½/(√|z| + δ)``, z the statistic summed
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
        device, dtype: factory kwargs of the parameters and buffers.

    Any other keyword is a TypeError naming the closest option (``reduced_dimm`` → "did you mean
    'reduced_dim'?") and listing them all.

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

    def __init__(
        self,
        in_channels: int,
        reduced_dim: int | None = 256,
        backend: BackendSpec = "ns",
        vectorize: bool | str = True,
        *,
        centered: bool = True,
        normalization: str | None = "sqrt",
        alpha: float = 0.5,
        signed_sqrt: bool = False,
        l2: bool = False,
        sqrt_smoothing: float = 0.0,
        sketch: str | None = None,
        sketch_dim: int = 8192,
        sketch_seed: int = 0,
        channel_drop: str | None = None,
        gram: bool | str = "auto",
        layout: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        # A typo ends in the closest option's name, not in Python's bare "unexpected keyword argument".
        check_keywords("covpool.CovPool", unknown, [*_option_defaults(), "device", "dtype"])
        check_int("in_channels", in_channels)
        check_int("reduced_dim", reduced_dim, allow_none=True)
        entry, _ = resolve_backend(backend)
        entry.uses_gram(1, 1, gram)  # checks the value, and that a forced Gram side exists for the backend
        mode, norm = vectorize_mode(vectorize), normalization_mode(normalization)
        for name, flag in (("centered", centered), ("signed_sqrt", signed_sqrt), ("l2", l2)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        if norm == "power":
            check_number("alpha", alpha, 0.0, open_low=True, note="the power of normalization='power'")
        if sketch is not None:
            if sketch not in _SKETCHES:
                raise ValueError(f"sketch must be one of {', '.join(map(repr, _SKETCHES))} or None, got {sketch!r}")
            if norm != "none":
                raise ValueError(f"sketch={sketch!r} projects the second moment to a vector: no matrix to normalise, "
                                 f"pass normalization='none' (got {normalization!r})")
            check_int("sketch_dim", sketch_dim, 2)
            check_int("sketch_seed", sketch_seed, 0)
        if channel_drop is not None and channel_drop not in _CHANNEL_DROPS:
            raise ValueError(f"channel_drop must be 'adaptive' or None, got {channel_drop!r}")
        check_layout(layout)
        # An option the chosen head would never read is a mistake to report, not to ignore (as set_backend does).
        check_used(norm, sketch, signed_sqrt, backend=backend, alpha=alpha, sketch_dim=sketch_dim,
                   sketch_seed=sketch_seed, sqrt_smoothing=sqrt_smoothing)
        check_smoothing(sqrt_smoothing)
        if mode == "matrix" and (signed_sqrt or l2 or sketch):
            raise ValueError("signed_sqrt, l2 and sketch produce a vector: use vectorize='triu' or 'full'")
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.reduced_dim = reduced_dim
        self.backend = backend
        self.vectorize = mode
        self.centered, self.normalization, self.alpha = centered, norm, float(alpha)
        self.signed_sqrt, self.l2, self.sqrt_smoothing = signed_sqrt, l2, float(sqrt_smoothing)
        self.sketch, self.sketch_dim, self.sketch_seed = sketch, sketch_dim, sketch_seed
        self.channel_drop = channel_drop
        self.gram = gram
        self.layout = layout
        self.dim = in_channels if reduced_dim is None else reduced_dim
        if sketch is not None:
            self.out_features = sketch_dim
        else:
            self.out_features = {"triu": self.dim * (self.dim + 1) // 2, "full": self.dim * self.dim,
                                 "matrix": self.dim}[mode]
        if reduced_dim is None:
            self.reduce: nn.Module = nn.Identity()
        else:
            self.reduce = _reduction(in_channels, reduced_dim, factory)
        self.drop: nn.Module = AdaptiveChannelDrop(self.dim, **factory) if channel_drop else nn.Identity()
        if sketch is not None:
            self._draw_sketch(factory)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A module pickled whole (torch.save(model)) by covpool 0.1.0 lacks the options added since: the
        # constructor's defaults are what it computed with.
        for key, value in _option_defaults().items():
            state.setdefault(key, value)
        state["vectorize"] = vectorize_mode(state["vectorize"])
        super().__setstate__(state)
        if "drop" not in self._modules:
            self.drop = nn.Identity()

    @property
    def uses_backend(self) -> bool:
        """Whether ``backend`` computes anything: a square root (``normalization="sqrt"``, no sketch)."""
        return self.normalization == "sqrt" and self.sketch is None

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments that build this pooling again, ``CovPool(pool.in_channels, **pool.options)``
        (fresh parameters; the same sketch, drawn from the same seed). Every option is kept as an attribute of
        its own name."""
        return {name: copy.deepcopy(getattr(self, name)) for name in _option_defaults()}

    def _draw_sketch(self, factory: dict) -> None:
        """The sketch's fixed random parameters, drawn from ``sketch_seed`` with a generator of its own (the
        global random state is untouched): Tensor Sketch hashes h₁, h₂ in [0, D) and signs s₁, s₂ in ±1,
        independent for the two count sketches; Random Maclaurin projections W₁, W₂ of ±1/√D (Rademacher, the
        authors' scaling)."""
        g = torch.Generator().manual_seed(self.sketch_seed)
        d, dim = self.dim, self.sketch_dim
        if self.sketch == "tensor":
            for t in (1, 2):
                self.register_buffer(f"h{t}", torch.randint(dim, (d,), generator=g).to(factory["device"]))
                sign = torch.randint(2, (d,), generator=g) * 2 - 1
                self.register_buffer(f"s{t}", sign.to(device=factory["device"], dtype=factory["dtype"] or
                                                       torch.get_default_dtype()))
        else:
            for t in (1, 2):
                w = (torch.randint(2, (d, dim), generator=g) * 2 - 1) / math.sqrt(dim)
                self.register_buffer(f"w{t}", w.to(device=factory["device"], dtype=factory["dtype"] or
                                                   torch.get_default_dtype()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` or ``(B, N, C)`` → ``(B, out_features)`` (or ``(B, d, d)``)."""
        maps = as_maps(x, self.in_channels, "CovPool", self.layout)
        feats = self.drop(self.reduce(maps).flatten(2))
        if self.sketch is None:
            return cov_pool(feats, self.backend, self.vectorize, self.gram, centered=self.centered,
                            normalization=self.normalization, alpha=self.alpha, signed_sqrt=self.signed_sqrt,
                            l2=self.l2, sqrt_smoothing=self.sqrt_smoothing)
        out_dtype = feats.dtype if feats.is_floating_point() else torch.get_default_dtype()
        with torch.autocast(device_type=feats.device.type, enabled=False):
            f = feats.to(work_dtype(out_dtype))
            if self.centered:
                f = f - f.mean(-1, keepdim=True)
            if self.sketch == "tensor":
                out = tensor_sketch(f, self.h1, self.s1, self.h2, self.s2, self.sketch_dim)
            else:
                out = random_maclaurin(f, self.w1.to(f.dtype), self.w2.to(f.dtype))
            # sqrt_smoothing is δ on the sum over positions, covpool's statistic their average: δ/√N on it.
            out = element_norm(out, self.signed_sqrt, self.l2, self.sqrt_smoothing / math.sqrt(f.shape[-1]))
        return out.to(out_dtype)

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}", f"reduced_dim={self.reduced_dim}"]
        if self.sketch is None:
            if self.normalization == "sqrt":
                parts.append(f"backend={self.backend!r}")
            elif self.normalization == "power":
                parts.append(f"normalization='power', alpha={self.alpha}")
            else:
                parts.append("normalization='none'")
            parts.append(f"vectorize={self.vectorize!r}")
        else:
            parts.append(f"sketch={self.sketch!r}, sketch_dim={self.sketch_dim}, sketch_seed={self.sketch_seed}")
        if not self.centered:
            parts.append("centered=False")
        parts += [f"{k}=True" for k in ("signed_sqrt", "l2") if getattr(self, k)]
        if self.sqrt_smoothing:
            parts.append(f"sqrt_smoothing={self.sqrt_smoothing}")
        if self.channel_drop:
            parts.append(f"channel_drop={self.channel_drop!r}")
        if self.gram != "auto":
            parts.append(f"gram={self.gram!r}")
        if self.layout != "auto":
            parts.append(f"layout={self.layout!r}")
        parts.append(f"out_features={self.out_features}")
        return ", ".join(parts)
