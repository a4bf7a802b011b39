"""ZCA whitening batch normalisation (Decorrelated Batch Normalization) and its synchronised form."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from covpool.linalg import BackendSpec, resolve_backend
from covpool.linalg._checks import check_int, check_number

from ._common import Factory
from .functional import zca_batch_norm

__all__ = ["ZCABatchNorm1d", "ZCABatchNorm2d", "convert_zca", "convert_sync_zca"]

_CONVERT_MODES = ("all", "stem")


class _ZCABatchNorm(nn.Module):
    """Parameters, buffers and BatchNorm conventions shared by the 1d and 2d layers."""

    _layouts: tuple[tuple[int, str], ...] = ()
    # As torch's BatchNorm: None without affine (the parameters) or track_running_stats (the buffers).
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: torch.Tensor | None
    running_cov: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None

    def __init__(
        self,
        num_features: int,
        group_size: int = 16,
        backend: BackendSpec = "eig",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        sync: bool = False,
        process_group: Any = None,
    ) -> None:
        super().__init__()
        check_int("num_features", num_features)
        check_int("group_size", group_size)
        if num_features % group_size:
            nearest = max(g for g in range(1, group_size) if num_features % g == 0)
            raise ValueError(f"group_size={group_size} does not divide num_features={num_features}; pick a divisor "
                             f"such as {nearest}")
        check_number("eps", eps, 0.0, open_low=True)
        check_number("momentum", momentum, 0.0, 1.0, allow_none=True, note="None: cumulative average")
        resolve_backend(backend)
        self.num_features = num_features
        self.group_size = group_size
        self.num_groups = num_features // group_size
        self.backend = backend
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.sync = bool(sync)
        self.process_group = process_group
        factory: Factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_cov", torch.zeros(self.num_groups, group_size, group_size, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_cov", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean to zero, running covariance to the identity, batch count to zero."""
        running = self._running_stats()
        if running is not None:
            mean, cov, count = running
            mean.zero_()
            cov.copy_(torch.eye(self.group_size, dtype=cov.dtype, device=cov.device).expand_as(cov))
            count.zero_()

    def _running_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The buffers ``running_mean``, ``running_cov`` and ``num_batches_tracked``, or None when they are not
        tracked."""
        if (not self.track_running_stats or self.running_mean is None or self.running_cov is None
                or self.num_batches_tracked is None):
            return None
        return self.running_mean, self.running_cov, self.num_batches_tracked

    def reset_parameters(self) -> None:
        """Reset the running statistics, weight to one and bias to zero."""
        self.reset_running_stats()
        if self.affine and self.weight is not None and self.bias is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() not in dict(self._layouts) or x.shape[1] != self.num_features:
            expected = " or ".join(layout.replace("C", str(self.num_features)) for _, layout in self._layouts)
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects input {expected}, "
                             f"got shape {tuple(x.shape)}")

    def _sync_group(self) -> Any:
        """The process group to pool statistics over, or None when there is nothing to synchronise."""
        if not (self.sync and self.training and torch.distributed.is_available()
                and torch.distributed.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else torch.distributed.group.WORLD
        return group if torch.distributed.get_world_size(group) > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        factor = 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            # As torch's BatchNorm: momentum None means a cumulative average over the batches seen.
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_running = not self.training and self.track_running_stats
        return zca_batch_norm(
            x,
            self.running_mean if self.track_running_stats else None,
            self.running_cov if self.track_running_stats else None,
            self.weight,
            self.bias,
            training=not use_running,
            momentum=factor,
            eps=self.eps,
            group_size=self.group_size,
            backend=self.backend,
            process_group=self._sync_group(),
        )

    def extra_repr(self) -> str:
        sync = ", sync=True" if self.sync else ""
        return (f"{self.num_features}, group_size={self.group_size}, backend={self.backend!r}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, track_running_stats={self.track_running_stats}"
                f"{sync}")


class ZCABatchNorm2d(_ZCABatchNorm):
    """Decorrelated (ZCA-whitening) batch normalisation of ``(B, C, H, W)`` feature maps.

    Huang et al., "Decorrelated Batch Normalization", CVPR 2018. The C channels are split into
    C / ``group_size`` contiguous groups. In training each group is centred by its batch mean and
    whitened by (Σ + eps·I)^{-1/2} of its batch covariance over all B·H·W positions, so its output
    covariance is (close to) the identity; then each channel is scaled and shifted (``weight``,
    ``bias``). The inverse square root comes from ``backend``; Song et al., "Fast Differentiable Matrix
    Square Root", ICLR 2022, whiten with ``"mpa_lya"``. The maths is :func:`zca_batch_norm`.

    Follows :class:`torch.nn.BatchNorm2d`: ``running_mean`` ``(C,)``, ``running_cov``
    ``(C / group_size, group_size, group_size)`` (unbiased) and ``num_batches_tracked`` are buffers in
    the ``state_dict``, updated with ``momentum`` (None: cumulative average) and detached from the
    graph; eval mode whitens with them; ``track_running_stats=False`` uses batch statistics in eval too.

    Design choices:

    - The running *covariance* is averaged, not the whitening matrix: (E Σ)^{-1/2} whitens the data
      distribution, whereas an average of batch whitening matrices is biased by batch noise (Jensen),
      and covariance buffers do not depend on the backend. Eval mode pays one inverse square root of
      the small group matrices per forward.
    - Default ``backend="eig"``: whitening uses the inverse root itself, not only its gradient, and the
      approximate backends lose accuracy fast with the conditioning of Σ + eps·I (for a 16×16 group in
      float32 the MPA-Lya inverse root is 0.6 % off at condition number 10 but 19 % off at 100; feature
      covariances are routinely worse). ``eig`` is exact, its backward is finite for repeated
      eigenvalues, and 16×16 eigendecompositions are cheap.
    - Default ``group_size=16`` as in Huang et al.; it must divide ``num_features``.

    Multi-process training: :func:`convert_sync_zca` (or ``sync=True``) pools the group means and
    covariances over a process group with differentiable all-reduces, so N ranks with batch b whiten
    (and back-propagate) exactly as one process with batch N·b; unequal batches are weighted by their
    sample counts.

    Args:
        num_features: C, the number of channels.
        group_size: channels per whitening group.
        backend: inverse-square-root backend, a name or ``{"name": ..., **options}``.
        eps: added to the covariance diagonal; bounds the gain along null directions by eps^{-1/2}.
        momentum: weight of the new batch in the running statistics, or None for a cumulative average.
        affine: learn per-channel ``weight`` (ones) and ``bias`` (zeros).
        track_running_stats: keep running statistics for eval mode.
        device: device of the parameters and buffers (None: torch's default).
        dtype: dtype of the parameters and buffers (None: torch's default).
        sync: pool the training statistics over ``process_group`` when ``torch.distributed`` is
            initialised (keyword only; :func:`convert_sync_zca` sets it).
        process_group: the group to synchronise over; None is the default (world) group.

    Shapes: input ``(B, C, H, W)``, output the same.

    Raises:
        ValueError: at construction, ``num_features`` or ``group_size`` not a positive integer, a
            ``group_size`` that does not divide ``num_features`` (naming a divisor), ``eps`` <= 0,
            ``momentum`` outside [0, 1], an unknown backend name; in the forward, an input of another shape or
            channel count, or batch statistics from a single value per channel.
        TypeError: a backend option the backend does not have.

    Numerical caveats: a group needs more than ``group_size`` samples per batch for a full-rank
    covariance; with fewer, eps alone bounds the whitening. Half-precision input is whitened in float32.

    Example::

        >>> import torch
        >>> from covpool.layers import ZCABatchNorm2d
        >>> zca = ZCABatchNorm2d(8, group_size=4)
        >>> zca(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
        >>> zca.running_cov.shape
        torch.Size([2, 4, 4])
    """

    _layouts = ((4, "(B, C, H, W)"),)


class ZCABatchNorm1d(_ZCABatchNorm):
    """Decorrelated (ZCA-whitening) batch normalisation of ``(B, C)`` vectors or ``(B, C, L)`` sequences.

    Huang et al., "Decorrelated Batch Normalization", CVPR 2018, with the inverse root by ``backend``
    (Song et al., ICLR 2022). Same arguments, buffers, defaults, errors and synchronisation as
    :class:`ZCABatchNorm2d`; the statistics run over the B (or B·L) samples.

    Args:
        num_features: C, the number of channels.
        group_size: channels per whitening group; must divide ``num_features``.
        backend: inverse-square-root backend, a name or ``{"name": ..., **options}`` (``"eig"``).
        eps: added to the covariance diagonal, > 0.
        momentum: weight of the new batch in the running statistics, or None for a cumulative average.
        affine: learn per-channel ``weight`` (ones) and ``bias`` (zeros).
        track_running_stats: keep running statistics for eval mode.
        device: device of the parameters and buffers (None: torch's default).
        dtype: dtype of the parameters and buffers (None: torch's default).
        sync: pool the training statistics over ``process_group`` (keyword only; :func:`convert_sync_zca`).
        process_group: the group to synchronise over; None is the default (world) group.

    Shapes: input ``(B, C)`` or ``(B, C, L)``, channels second as in :class:`torch.nn.BatchNorm1d`
    (transpose ``(B, L, C)`` tokens first), output the same.

    Example::

        >>> import torch
        >>> from covpool.layers import ZCABatchNorm1d
        >>> zca = ZCABatchNorm1d(8, group_size=4)
        >>> zca(torch.randn(32, 8)).shape, zca(torch.randn(4, 8, 10)).shape
        (torch.Size([32, 8]), torch.Size([4, 8, 10]))
    """

    _layouts = ((2, "(B, C)"), (3, "(B, C, L)"))


def _zca_from_batch_norm(bn: nn.BatchNorm2d, options: dict[str, Any]) -> ZCABatchNorm2d:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    factory: Factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    opts = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
            "track_running_stats": bn.track_running_stats, **factory, **options}
    zca = ZCABatchNorm2d(bn.num_features, **opts)
    with torch.no_grad():
        if (zca.affine and bn.affine and zca.weight is not None and zca.bias is not None
                and bn.weight is not None and bn.bias is not None):
            zca.weight.copy_(bn.weight)
            zca.bias.copy_(bn.bias)
            zca.weight.requires_grad_(bn.weight.requires_grad)
            zca.bias.requires_grad_(bn.bias.requires_grad)
        running = zca._running_stats()
        if (running is not None and bn.track_running_stats and bn.running_mean is not None
                and bn.running_var is not None and bn.num_batches_tracked is not None):
            # BatchNorm's running variances are the diagonal of a running covariance: whitening with
            # them is exactly BatchNorm's eval-mode normalisation, until training updates the rest.
            mean, cov, count = running
            mean.copy_(bn.running_mean)
            cov.copy_(torch.diag_embed(bn.running_var.reshape(zca.num_groups, zca.group_size)))
            count.copy_(bn.num_batches_tracked)
    return zca.train(bn.training)


def convert_zca(module: nn.Module, mode: str = "all", **zca_options: Any) -> nn.Module:
    """Replace the :class:`torch.nn.BatchNorm2d` layers of ``module`` by :class:`ZCABatchNorm2d`, like
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`.

    Decorrelated BN (Huang et al., CVPR 2018) in an existing network: ``mode="all"`` replaces every
    ``BatchNorm2d``, ``mode="stem"`` only the first one in ``module.named_modules()`` order (the stem's,
    in a ResNet; the paper's cheapest variant). Only layers of exactly that class are replaced, not
    subclasses such as timm's ``BatchNormAct2d`` or ``SyncBatchNorm``, whose forward differs.

    Each new layer takes the batch norm's ``eps``, ``momentum``, ``affine``, ``track_running_stats``,
    device, dtype and train/eval mode, then ``zca_options`` (e.g. ``group_size``, ``backend``; they
    override). Where both layers have them it copies the affine ``weight``/``bias``, ``running_mean``,
    ``num_batches_tracked``, and the running variances as a diagonal ``running_cov``: a converted
    model in eval mode computes what it computed before, and a pretrained one starts from its
    statistics. A freshly built model (unit weight and variance, zero bias and mean) gets the same
    layers as ``ZCABatchNorm2d(num_features, **zca_options)``.

    Args:
        module: a model, or a single ``BatchNorm2d``.
        mode: ``"all"`` or ``"stem"``.
        **zca_options: keyword arguments of :class:`ZCABatchNorm2d`.

    Returns:
        ``module`` with its layers replaced in place, or the new layer when ``module`` is itself a
        ``BatchNorm2d``: write ``model = convert_zca(model)`` as with torch.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``; a keyword :class:`ZCABatchNorm2d` does not take.
        ValueError: an unknown ``mode``; a model without a ``BatchNorm2d``; a ``group_size`` that does not
            divide a layer's channels, or another option :class:`ZCABatchNorm2d` refuses.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from covpool.layers import convert_zca
        >>> model = convert_zca(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)), group_size=8)
        >>> model[1]
        ZCABatchNorm2d(16, group_size=8, backend='eig', eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_zca expects an nn.Module, got {type(module).__name__}")
    if mode not in _CONVERT_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _CONVERT_MODES))}, got {mode!r}")
    targets = [(name, m) for name, m in module.named_modules() if type(m) is nn.BatchNorm2d]
    if not targets:
        raise ValueError(f"{type(module).__name__} has no BatchNorm2d to replace")
    for name, bn in targets[:1] if mode == "stem" else targets:
        zca = _zca_from_batch_norm(bn, zca_options)
        if not name:
            return zca
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, zca)
    return module


def convert_sync_zca(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every :class:`ZCABatchNorm1d`/:class:`ZCABatchNorm2d` in ``module`` synchronise its training
    statistics across ranks, like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`.

    Decorrelated BN (Huang et al., CVPR 2018) whitens with batch statistics; synchronised, N DDP ranks
    with batch b whiten exactly as one process with batch N·b (mean and covariance are all-reduced,
    differentiably, so input and parameter gradients match too). The layers keep their class,
    parameters and buffers (checkpoints load either way); they are switched in place and ``module`` is
    returned, so ``model = convert_sync_zca(model)`` reads as with torch. Without an initialised process
    group, or with one rank, the layers behave as before.

    Args:
        module: a model (or a single ZCA layer).
        process_group: the ``torch.distributed`` group to pool over; None means the default group.

    Returns:
        ``module``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.

    Example::

        >>> from torch import nn
        >>> from covpool.layers import ZCABatchNorm2d, convert_sync_zca
        >>> model = convert_sync_zca(nn.Sequential(nn.Conv2d(3, 16, 3), ZCABatchNorm2d(16)))
        >>> model[1].sync
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_sync_zca expects an nn.Module, got {type(module).__name__}")
    for layer in module.modules():
        if isinstance(layer, _ZCABatchNorm):
            layer.sync = True
            layer.process_group = process_group
    return module
