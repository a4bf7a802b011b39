"""``set_backend``: change the square-root backend of a built model's covpool layers."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

from covpool.linalg import BackendSpec, resolve_backend

from .heads import get_head, list_heads
from .pooling import CovPool, MultiHeadCrossCov, SvPNCrossCov
from .zca import _ZCABatchNorm

__all__ = ["set_backend"]

# The layers whose ``backend`` attribute selects the square-root backend of their forward pass (a SoViTHead's
# "mpa_cov" head and what swap_pooling makes hold a CovPool).
_BACKEND_LAYERS: tuple[type[CovPool | _ZCABatchNorm], ...] = (CovPool, _ZCABatchNorm)
_PUBLIC_NAMES = "CovPool, ZCABatchNorm1d, ZCABatchNorm2d"


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers, so the returned names are the bare model's ``named_modules()``."""
    while True:
        compiled = getattr(model, "_orig_mod", None)
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(compiled, nn.Module):
            model = compiled
        else:
            return model


def _layer_types(layers: Any) -> tuple[type[CovPool | _ZCABatchNorm], ...]:
    if layers is None:
        return _BACKEND_LAYERS
    given = tuple(layers) if isinstance(layers, (tuple, list, set, frozenset)) else (layers,)
    chosen = tuple(t for t in given if isinstance(t, type) and issubclass(t, _BACKEND_LAYERS))
    if not chosen or len(chosen) < len(given):
        raise TypeError(f"layers must be None or covpool layer classes ({_PUBLIC_NAMES}, or subclasses), "
                        f"got {layers!r}")
    return chosen


def set_backend(
    model: nn.Module,
    backend: BackendSpec,
    *,
    layers: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
) -> dict[str, BackendSpec]:
    """Set the square-root backend of every covpool layer in ``model``, in place, and return the old ones.

    Changes the ``backend`` of each :class:`CovPool` that takes a square root (also the one inside a
    ``head="mpa_cov"`` :class:`SoViTHead` and what :func:`covpool.swap_pooling` makes), :class:`ZCABatchNorm1d` and
    :class:`ZCABatchNorm2d` in the model (``layers=`` restricts it to those of the given classes), e.g. for the
    hybrid protocol of Song, Sebe and Wang, "Why Approximate Matrix Square Root Outperforms Accurate SVD in
    Global Covariance Pooling?", ICCV 2021: Newton–Schulz (``"ns"``) early in training, where its smooth
    gradient avoids the explosions that close eigenvalues cause in SVD gradients, then an SVD-based layer
    (``"svd_pade"``), which keeps the large eigenvalues that a few NS iterations flatten.

    Only the backend changes: no parameter or buffer is touched (ZCA layers keep running *covariances*,
    which do not depend on the backend), so ``state_dict`` and optimizer state stay valid. Models wrapped
    in ``DistributedDataParallel``/``DataParallel`` or compiled with ``torch.compile`` are handled through
    the wrapped model; a compiled model recompiles on its next call, since dynamo guards on the layers'
    ``backend`` attribute. The spec is checked before any layer changes, and each layer gets its own copy
    of a dict spec.

    Args:
        model: any ``nn.Module`` holding covpool layers (a timm ``resnet50_isqrt``, a ``so_vit_7``, a model
            from :func:`covpool.swap_pooling`, a single layer, ...), possibly wrapped as above.
        backend: the new backend, a name or ``{"name": ..., **options}``, validated as everywhere.
        layers: None for every covpool layer, or a layer class (or tuple of classes) to change only those,
            e.g. ``covpool.CovPool`` to leave ZCA whitening layers alone.

    Returns:
        ``{module name: previous spec}`` in ``named_modules()`` order of the (unwrapped) model; ``""`` names
        the model itself when it is a layer. ``set_backend(model.get_submodule(name), spec)`` restores one.

    Raises:
        ValueError, TypeError: an unknown backend name or option, a malformed spec, a ``layers`` entry that
            is not a covpool layer class, or a model without any (selected) covpool layer. Nothing has
            changed when it raises.

    Example::

        >>> import timm, torch, covpool
        >>> model = timm.create_model("resnet18_isqrt", num_classes=10).eval()
        >>> covpool.set_backend(model, {"name": "svd_pade", "degree": 4})
        {'global_pool': {'name': 'ns', 'num_iters': 5}}
        >>> model.global_pool.backend
        {'name': 'svd_pade', 'degree': 4}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_backend expects an nn.Module, got {type(model).__name__}")
    resolve_backend(backend)
    types = _layer_types(layers)
    root = _unwrap(model)
    chosen = [(name, m) for name, m in root.named_modules() if isinstance(m, types)]
    # A covariance head without a square root (bilinear, MPN-COV's power, a sketch, DropCov) has no backend.
    targets = [(name, m) for name, m in chosen if not isinstance(m, CovPool) or m.uses_backend]
    if not targets:
        which = ", ".join(t.__name__ for t in types) if layers is not None else _PUBLIC_NAMES
        if chosen:
            raise ValueError(f"{type(root).__name__}'s covariance pooling has no matrix square root whose backend "
                             "could be set (its head normalises by a matrix power, a sketch or not at all); only "
                             f"normalization='sqrt' heads ({', '.join(_rooted_heads())}) take a backend")
        svpn = [m for m in root.modules() if isinstance(m, (SvPNCrossCov, MultiHeadCrossCov))]
        if svpn:
            head = ("SoT / DropCov head (head='sot') normalises by svPN (singular-value power normalisation) or not "
                    "at all, and" if isinstance(svpn[0], MultiHeadCrossCov) else
                    "So-ViT svPN head normalises by svPN (singular-value power normalisation), which")
            raise ValueError(f"{type(root).__name__} has no covpool layer ({which}) whose backend could be set: "
                             f"its {head} has no matrix square root, so there is no backend to choose. Backends "
                             "belong to the square-root heads: a model built with one takes them (swap_pooling on the "
                             f"original backbone with head={' or '.join(map(repr, _rooted_heads()))}; "
                             "head='mpa_cov' for so_vit_* models)")
        raise ValueError(f"{type(root).__name__} has no covpool layer ({which}) whose backend could be set; "
                         "build it with one (e.g. covpool.swap_pooling(model) or a *_isqrt / so_vit_* model)")
    previous: dict[str, BackendSpec] = {}
    for name, layer in targets:
        previous[name] = layer.backend
        layer.backend = copy.deepcopy(dict(backend)) if isinstance(backend, Mapping) else backend
    return previous


def _rooted_heads() -> list[str]:
    """The registered heads with a square root whose backend can be chosen."""
    return [h for h in list_heads() if get_head(h).uses_backend]
