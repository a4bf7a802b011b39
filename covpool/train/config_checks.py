"""Every config mistake found before anything is built: names checked against the registries that will
receive them, backend specs, the environment, and a dry run of the model's construction.

:func:`check_config` runs at the start of :func:`covpool.train.train` and :func:`covpool.train.evaluate`
(so ``covpool train`` / ``eval`` report a mistake as one ``error:`` line, exit status 2, before a model or a
data set exists). A config file's keys, types and ranges are checked when it is read
(:mod:`covpool.train.config`); what needs the libraries' registries is checked here, against the names they
hold now (a backend or a timm model registered by your own code counts), with the closest name suggested.
Which keys take names from which registry is declared on the keys themselves
(:func:`~covpool.train.config.config_schema`).

This module was ``covpool.train.validate``, a name timm gives to evaluating a model; that path still works,
with a warning, for one release.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import covpool

from ..outputs import first_line
from ..precision import amp_mode
from ._datasets import check_img_size
from ._dist import dist_timeout_s, uses_cuda
from ._model import build_model, fixed_input_size, set_grad_checkpointing
from ._optim import make_scheduler
from ._resume import model_changes
from ._schedule import BackendSchedule, check_backend_spec
from .config import (
    TORCHVISION_PREFIX,
    ConfigError,
    OptimConfig,
    TrainConfig,
    config_schema,
    format_config_diff,
)

__all__ = ["check_config", "check_same_model"]


def _value(cfg: TrainConfig, key: str) -> Any:
    """The value of dotted ``key`` in ``cfg``."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for any mistake in ``cfg`` that reading it could not see: a name no
    registry holds now (with the closest one), an invalid backend spec, ``device`` / ``amp`` this machine cannot
    run, an invalid ``COVPOOL_DIST_TIMEOUT``, or model options the model's and covpool's layers refuse (a dry
    run of :func:`covpool.train.build_model` on torch's meta device: no memory, no weights, no download)."""
    for key in config_schema():
        value = _value(cfg, key.key)
        if key.choices is not None and isinstance(value, str):
            key.choices.check(key.key, value)
        for entry in key.backends if isinstance(value, Mapping) else ():
            if entry in value:
                check_backend_spec(value[entry], f"{key.key}.{entry}")
    _check_schedule_options(cfg.optim, cfg.epochs)
    schedule = BackendSchedule(cfg.model.backend_schedule, cfg.epochs)
    try:
        dist_timeout_s(cfg.dist_timeout)
        refusal = amp_mode(cfg.amp).refusal("cuda" if uses_cuda(cfg.device) else "cpu")  # refuses cuda without CUDA
        if refusal:
            raise ValueError(refusal)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_img_size(cfg.data)
    _dry_run_model(cfg, schedule)


def _check_schedule_options(o: OptimConfig, epochs: int) -> None:
    """timm's own checks of the scheduler's options (e.g. ``rsqrt`` needs a long enough run), on a stand-in
    optimizer."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max(o.lr, 1e-3))
    try:
        make_scheduler(optimizer, o, epochs, steps_per_epoch=1)
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"optim.sched={o.sched!r}: {err}") from None


def _dry_run_model(cfg: TrainConfig, schedule: BackendSchedule) -> None:
    """Build the model on the meta device, so its constructor, covpool's layers (``model.covpool``,
    ``model.zca_options``), ``model.grad_checkpointing`` and ``model.backend_schedule`` check themselves, and
    send a ``data.img_size`` input through it (:func:`_check_input_size`). A model that cannot be built on
    the meta device (an init that reads tensor values) is left to the real build."""
    num_classes = cfg.model.num_classes or 10  # the classifier's size does not change what is checked
    try:
        with torch.device("meta"):
            model = build_model(cfg.model, num_classes, for_checkpoint=True, img_size=cfg.data.img_size)
    except ConfigError:
        raise
    except Exception:  # meta tensors have no values; the real build reports a real problem
        return
    set_grad_checkpointing(model, cfg.model)
    schedule.apply(0, [model], announce=False)
    _check_input_size(model, cfg)


class _Reached(Exception):
    """Raised by the dry run's hook when the input reaches the second-order pooling: the rest is not needed."""


# Messages of the errors a forward raises for an input size the model cannot take (timm's "Input height (32)
# doesn't match model (224)", a kernel larger than its input, So-ViT's token grid, ...); other errors on the
# meta device (a value read by .item(), an operator without a meta kernel) say nothing about the config.
_SIZE_WORDS = ("size", "match", "grid", "shape", "small", "height", "width")


def _positions(module: torch.nn.Module, x: torch.Tensor) -> int:
    """The number of positions (pixels or tokens) a covariance is computed from."""
    if x.dim() == 4:
        return x.shape[-2] * x.shape[-1]
    return x.shape[2] if getattr(module, "layout", "auto") == "maps" else x.shape[1]


def _check_input_size(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Send a ``(2, 3, data.img_size, data.img_size)`` meta tensor through the model, up to its second-order
    pooling: an input size the model refuses (a ViT built for another size, a map that vanishes) is a
    :class:`ConfigError`, as is a centred covariance of one position (a 1x1 final map: the covariance of one
    sample is 0 for every image, so the head would train on constant features; the uncentred heads, bcnn and
    the sketches, see x xᵀ and still learn)."""
    size = cfg.data.img_size
    seen: list[tuple[torch.nn.Module, int]] = []

    def reached(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        seen.append((module, _positions(module, args[0])))
        raise _Reached

    hooks = [m.register_forward_pre_hook(reached) for m in model.modules()
             if isinstance(m, (covpool.CovPool, covpool.MultiHeadCrossCov, covpool.SvPNCrossCov))]
    try:
        model.eval()(torch.empty(2, 3, size, size, device="meta"))
    except _Reached:
        pass
    except (AssertionError, RuntimeError, ValueError) as err:
        if not any(word in str(err).lower() for word in _SIZE_WORDS):
            return
        if "img_size" in cfg.model.kwargs:
            sized = "model.kwargs.img_size"
        elif not cfg.model.name.startswith(TORCHVISION_PREFIX) and fixed_input_size(cfg.model.name):
            sized = "data.img_size (passed to the model as its img_size)"
        else:
            sized = "data.img_size, or the model's own size option in model.kwargs,"
        raise ConfigError(f"model.name={cfg.model.name!r} cannot take data.img_size={size} inputs: "
                          f"{first_line(err).rstrip('.')}; change {sized} to a size the model takes") from None
    finally:
        for hook in hooks:
            hook.remove()
    for module, positions in seen:
        if positions == 1 and getattr(module, "centered", False):
            raise ConfigError(
                f"model.name={cfg.model.name!r} at data.img_size={size} ends in a 1x1 feature map: the covariance of "
                "one position is 0 for every image, so the second-order head would train on constant features. "
                "Raise data.img_size, or keep more resolution (model.cifar_stem=true for ResNets on 32x32 images, "
                "model.covpool.last_stride=1), or use an uncentred head (model.head=bcnn)")


def check_same_model(stored: Mapping[str, Any], cfg: TrainConfig, path: Any) -> None:
    """Raise :class:`ConfigError` when ``cfg`` describes another model than the one whose weights a
    checkpoint (``path``, written with config ``stored``) holds."""
    changes = model_changes(stored, cfg)
    if changes:
        raise ConfigError(f"the config describes another model than the one {path} holds: "
                          f"{format_config_diff(changes)} (checkpoint -> config); evaluate it with its own "
                          "config (leave out --config) or a config of the same model")
