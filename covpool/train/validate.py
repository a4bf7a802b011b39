"""Every config mistake found before anything is built: names checked against the registries that will
receive them, backend specs, the environment, and a dry run of the model's construction.

:func:`check_config` runs at the start of :func:`covpool.train.train` and :func:`covpool.train.evaluate`
(so ``covpool train`` / ``eval`` report a mistake as one ``error:`` line, exit status 2, before a model or a
data set exists). A config file's keys, types and ranges are checked when it is read
(:mod:`covpool.train.config`); what needs the libraries' registries is checked here, against the names they
hold now (a backend or a timm model registered by your own code counts), with the closest name suggested.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

import covpool

from ..outputs import first_line
from ._dist import DEVICES, dist_timeout_s, uses_cuda
from ._model import TORCHVISION_PREFIX, build_model, fixed_input_size, set_grad_checkpointing, torchvision_models
from ._resume import model_changes
from ._schedule import BackendSchedule, check_backend_spec
from .config import ConfigError, OptimConfig, TrainConfig, config_to_dict, did_you_mean, format_config_diff
from .data import dataset_names

__all__ = ["check_config", "check_same_model", "SCHEDULERS"]

#: the names timm's ``create_scheduler_v2`` takes that work with covpool's per-step schedule (timm keeps no
#: list of them; ``plateau`` steps once per epoch on a validation metric, which a per-step schedule cannot)
SCHEDULERS = ("cosine", "tanh", "step", "constant", "multistep", "poly", "wsd", "rsqrt", "none")


@dataclass(frozen=True)
class _Registry:
    """Where the valid values of a config key come from: ``names()`` lists them (for the suggestion),
    ``accepts(value)`` decides (default: being listed); ``where`` points to the list when it is too long to
    print."""

    what: str
    names: Callable[[], Iterable[str]]
    accepts: Callable[[str], bool] | None = None
    where: str = ""

    def check(self, key: str, value: str) -> None:
        names = list(self.names())
        if (self.accepts(value) if self.accepts is not None else value in names):
            return
        error = _unknown_name(key, value, names, self.what, listed=not self.where)
        raise ConfigError(f"{error}; {self.where}") if self.where else error


def _unknown_name(key: str, value: Any, valid: Iterable[str], what: str, listed: bool = True) -> ConfigError:
    """The error for a name that no registry holds: the key, the value, the closest valid name and
    (``listed``) all of them, e.g. ``model.name='resnet5O' is not a timm model (did you mean 'resnet50'?)``."""
    valid = list(valid)
    names = f"; valid: {', '.join(valid)}" if listed else ""
    return ConfigError(f"{key}={value!r} is not {what}{did_you_mean(value, valid)}{names}")


def _timm_models() -> list[str]:
    import timm

    return [*timm.list_models(), *(TORCHVISION_PREFIX + n for n in torchvision_models())]


def _is_timm_model(name: str) -> bool:
    import timm
    from timm.models import parse_model_name

    if name.startswith(TORCHVISION_PREFIX):
        return name[len(TORCHVISION_PREFIX):] in torchvision_models()
    try:
        source, _ = parse_model_name(name)
    except ValueError:
        return False
    return source is not None or timm.is_model(name)  # hf-hub: / local-dir: names are checked when loaded


def _timm_optimizers() -> list[str]:
    from timm.optim import list_optimizers

    return list_optimizers()


def _is_timm_optimizer(name: str) -> bool:
    *prefix, base = name.lower().split("_")  # timm's own parsing: lookahead_<name> wraps <name> in Lookahead
    return prefix in ([], ["lookahead"]) and base in _timm_optimizers()


def _compile_backends() -> list[str]:
    return torch.compiler.list_backends(exclude_tags=())


def _choices(*names: str) -> Callable[[], Collection[str]]:
    return lambda: names


# config key -> the registry its value must be a name of. A new registry (covpool.list_heads(), ...) is one
# line here; a key inside a free-form section is dotted as on the command line (model.kwargs.<name>).
_NAMED: Mapping[str, _Registry] = MappingProxyType({
    "model.name": _Registry("a timm model", _timm_models, _is_timm_model, "see timm.list_models() (covpool adds "
                            "resnet18/50/101_isqrt and so_vit_7/10/14/19), or torchvision:<name> for "
                            "torchvision.models.list_models()"),
    "optim.opt": _Registry("a timm optimizer", _timm_optimizers, _is_timm_optimizer,
                           "see timm.optim.list_optimizers()"),
    "optim.sched": _Registry("a timm scheduler covpool can step", _choices(*SCHEDULERS)),
    "data.dataset": _Registry("a data set of covpool train", dataset_names),
    "device": _Registry("a device", _choices(*DEVICES)),
    "amp": _Registry("a mixed-precision mode", _choices("none", "bf16", "fp16")),
    "clip_mode": _Registry("a clipping mode of timm's dispatch_clip_grad", _choices("norm", "value", "agc")),
    "model.zca": _Registry("a ZCA mode", _choices("none", "stem", "all")),
    "model.head": _Registry("a second-order head", covpool.list_heads),
    "compile": _Registry("a torch.compile backend (true: inductor)", _compile_backends),
})

# config keys whose value is a backend spec (a name or {name: ..., options}); model.backend_schedule holds more
_BACKEND_KEYS = ("model.covpool.backend", "model.zca_options.backend", "model.kwargs.backend")

_MISSING = object()


def _dotted(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def check_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for any mistake in ``cfg`` that the config schema cannot see: a name no
    registry holds (with the closest one), an invalid backend spec, ``device`` / ``amp`` this machine cannot
    run, an invalid ``COVPOOL_DIST_TIMEOUT``, or model options the model's and covpool's layers refuse (a dry
    run of :func:`covpool.train.build_model` on torch's meta device: no memory, no weights, no download)."""
    config = config_to_dict(cfg)
    for key, registry in _NAMED.items():
        value = _dotted(config, key)
        if isinstance(value, str):
            registry.check(key, value)
    _check_schedule_options(cfg.optim, cfg.epochs)
    specs = {key: _dotted(config, key) for key in _BACKEND_KEYS}
    for key, spec in specs.items():
        if spec is not _MISSING:
            check_backend_spec(spec, key)
    schedule = BackendSchedule(cfg.model.backend_schedule, cfg.epochs)
    try:
        dist_timeout_s(cfg.dist_timeout)
        if not uses_cuda(cfg.device) and cfg.amp == "fp16":  # uses_cuda refuses device=cuda without CUDA
            raise ValueError("amp=fp16 needs CUDA (float16 autocast on the CPU is slow and unscaled); use amp=bf16")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.data.dataset == "embedded" and cfg.data.img_size < 8:
        raise ConfigError(f"data.img_size={cfg.data.img_size}: the embedded data set cuts patches of at least 8x8 "
                          "pixels; use data.img_size >= 8")
    _dry_run_model(cfg, schedule)


def _check_schedule_options(o: OptimConfig, epochs: int) -> None:
    """timm's own checks of the scheduler's options (e.g. ``rsqrt`` needs a long enough run), on a stand-in
    optimizer."""
    from timm.scheduler import create_scheduler_v2

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max(o.lr, 1e-3))
    try:
        create_scheduler_v2(optimizer, sched=o.sched, num_epochs=epochs, decay_epochs=o.decay_epochs,
                            decay_milestones=list(o.decay_milestones), decay_rate=o.decay_rate, min_lr=o.min_lr,
                            warmup_lr=o.warmup_lr, warmup_epochs=o.warmup_epochs, step_on_epochs=False,
                            updates_per_epoch=1)
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
    from covpool.layers import MultiHeadCrossCov, SvPNCrossCov

    size = cfg.data.img_size
    seen: list[tuple[torch.nn.Module, int]] = []

    def reached(module, args):
        seen.append((module, _positions(module, args[0])))
        raise _Reached

    hooks = [m.register_forward_pre_hook(reached) for m in model.modules()
             if isinstance(m, (covpool.CovPool, MultiHeadCrossCov, SvPNCrossCov))]
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
