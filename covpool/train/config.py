"""The training configuration: one dataclass schema that lists every key with its default and help.

A YAML file fills it; ``key=value`` overrides on the command line use dotted keys for nested sections
(``optim.lr=0.01``) and YAML scalars for values. An unknown key raises :class:`ConfigError` listing the
valid keys of its section. ``model.kwargs`` and ``model.covpool`` are free-form dicts passed on untouched.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "describe_config",
]


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


def _opt(default: Any, help_: str) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_})
    return field(default=default, metadata={"help": help_})


@dataclass
class ModelConfig:
    name: str = _opt("resnet18", "any timm model name, covpool's included (resnet50_isqrt, so_vit_7, ...)")
    pretrained: bool | str = _opt(
        False, "true: timm's hub weights (needs the network once); a path: a local checkpoint file; false: random init"
    )
    num_classes: int | None = _opt(None, "classifier size; null takes it from the data set")
    swap_pooling: bool = _opt(False, "replace a ResNet's average pooling + fc by covariance pooling (covpool.swap_pooling)")
    covpool: dict = _opt({}, "keyword options for covpool.swap_pooling, e.g. {reduced_dim: 256, backend: ns, "
                         "last_stride: 1}")
    zca: str = _opt("none", "ZCA whitening batch norm (covpool.ZCABatchNorm2d) in place of BatchNorm2d: none | stem "
                    "(the first one) | all; synchronised across processes under DDP")
    zca_options: dict = _opt({}, "keyword options for covpool.ZCABatchNorm2d, e.g. {group_size: 16, backend: ns}")
    backend_schedule: list | None = _opt(None, "square-root backend of the covariance pooling per epoch: "
                                         "[[start_epoch, backend], ...] from 0, e.g. [[0, ns], [10, svd_pade]]")
    cifar_stem: bool = _opt(False, "ResNet stem for 32x32 input: 3x3 stride-1 first conv, no max-pool")
    kwargs: dict = _opt({}, "extra keyword arguments for timm.create_model (drop_rate, output_stride, img_size, ...)")


@dataclass
class DataConfig:
    dataset: str = _opt("embedded", "embedded | imagefolder | cub200 | stanford_cars | fgvc_aircraft | flowers102 | "
                        "oxford_pet | cifar10 | cifar100")
    root: str | None = _opt(None, "data-set folder (not needed for 'embedded')")
    download: bool = _opt(False, "let torchvision download the data set into root (where torchvision can)")
    img_size: int = _opt(224, "input resolution (square)")
    batch_size: int = _opt(32, "batch size per process")
    val_batch_size: int | None = _opt(None, "evaluation batch size; null uses 2 x batch_size")
    workers: int = _opt(2, "data-loader worker processes per process")
    scale: list | None = _opt(None, "RandomResizedCrop scale range; null is timm's (0.08, 1.0)")
    hflip: float = _opt(0.5, "horizontal flip probability")
    color_jitter: float = _opt(0.0, "colour jitter strength")
    auto_augment: str | None = _opt(None, "timm auto-augment string, e.g. rand-m9-mstd0.5-inc1")
    re_prob: float = _opt(0.0, "random-erasing probability")
    crop_pct: float | None = _opt(None, "evaluation centre-crop fraction; null is the model's")
    interpolation: str | None = _opt(None, "resize interpolation; null is the model's")
    embedded_train_per_class: int = _opt(160, "embedded data set: training patches per class")
    embedded_val_per_class: int = _opt(60, "embedded data set: validation patches per class")
    embedded_grayscale: bool = _opt(True, "embedded data set: grey patches, so texture (not colour) tells classes apart")


@dataclass
class OptimConfig:
    opt: str = _opt("sgd", "timm optimizer name (sgd, adamw, ...)")
    lr: float = _opt(0.01, "learning rate of the backbone (per batch_size x processes as given)")
    head_lr_mult: float = _opt(1.0, "learning-rate multiplier of the new head (classifier + covariance pooling)")
    momentum: float = _opt(0.9, "momentum (SGD)")
    weight_decay: float = _opt(1e-4, "weight decay (not applied to biases and norm parameters)")
    sched: str = _opt("cosine", "timm scheduler: cosine | step | multistep | constant | poly | ...")
    warmup_epochs: float = _opt(0, "linear warm-up epochs")
    warmup_lr: float = _opt(1e-5, "learning rate at the start of the warm-up")
    min_lr: float = _opt(0.0, "floor of the decaying schedules")
    decay_epochs: float = _opt(30, "step schedule: epochs between decays")
    decay_milestones: list = _opt([30, 60, 90], "multistep schedule: epochs to decay at")
    decay_rate: float = _opt(0.1, "step/multistep decay factor")


@dataclass
class TrainConfig:
    name: str = _opt("run", "run name; outputs go to <output_dir>/<name>/")
    output_dir: str = _opt("runs", "parent folder of the run folders")
    seed: int = _opt(0, "seed of every random number generator (data order, init, augmentation)")
    epochs: int = _opt(10, "number of epochs")
    device: str = _opt("auto", "auto | cpu | cuda (auto: cuda when available)")
    amp: str = _opt("none", "mixed precision: none | bf16 | fp16 (fp16 only on CUDA, with a GradScaler)")
    clip_grad: float | None = _opt(None, "clip the global gradient norm to this value; null: no clipping")
    ema: bool = _opt(False, "keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it too")
    ema_decay: float = _opt(0.9998, "EMA decay")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss")
    mixup: float = _opt(0.0, "mixup alpha (0: off)")
    cutmix: float = _opt(0.0, "cutmix alpha (0: off)")
    max_steps_per_epoch: int | None = _opt(None, "cap on training steps per epoch (smoke tests); null: whole epoch")
    max_val_steps: int | None = _opt(None, "cap on evaluation batches; null: whole validation set")
    progress: bool = _opt(True, "show tqdm progress bars")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model section"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data section"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer and schedule section"})


def _is_section(cls: Any) -> bool:
    return isinstance(cls, type) and dataclasses.is_dataclass(cls)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _valid_keys(cls: type, prefix: str) -> list[str]:
    return [f"{prefix}{f.name}" for f in dataclasses.fields(cls)]


def _unknown(key: str, cls: type, prefix: str, where: str) -> ConfigError:
    valid = _valid_keys(cls, prefix)
    close = difflib.get_close_matches(f"{prefix}{key}", valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {prefix + key!r}{where}{hint}; valid keys: {', '.join(valid)}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type; ints become floats and numeric strings (PyYAML reads
    ``1e-4`` as a string) become numbers where the field is a float."""
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"config key {key!r} cannot be null")
    for opt in options:
        base = typing.get_origin(opt) or opt
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is str and isinstance(value, str):
            return value
        if base in (list, dict) and isinstance(value, base):
            return value
        if base is list and isinstance(value, tuple):
            return list(value)
    if float in options and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"config key {key!r} must be {names}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'!r}{where} must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(str(key), cls, prefix, where)
        hint = hints[key]
        if _is_section(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, f"{prefix}{key}.", where)
        else:
            kwargs[key] = _coerce(value, hint, prefix + key)
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "") -> TrainConfig:
    """Build a :class:`TrainConfig` from a (nested) plain dict; ``where`` names the source in errors."""
    return _build(TrainConfig, data or {}, "", where)


def config_to_dict(cfg: TrainConfig) -> dict:
    """The config as plain nested dicts/lists/scalars (what checkpoints and ``config.yaml`` store)."""
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, cls: type, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node, section, prefix = data, cls, ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if section is not None:
            names = {f.name for f in dataclasses.fields(section)}
            if part not in names:
                raise _unknown(part, section, prefix, " (command-line override)")
            hint = _hints(section)[part]
            section = hint if _is_section(hint) else None
            free_dict = section is None and (typing.get_origin(hint) or hint) is dict
            if not last and section is None and not free_dict:
                raise ConfigError(f"config key {prefix + part!r} is not a section; cannot set {dotted!r}")
        if last:
            node[part] = value
        else:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        prefix += part + "."


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` strings (dotted keys, YAML-scalar values) to a plain config dict, in order."""
    out = yaml.safe_load(yaml.safe_dump(data or {}))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.01)")
        key, raw = item.split("=", 1)
        _set_dotted(out, TrainConfig, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    where = ""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} not found; the shipped ones are in configs/")
        data = yaml.safe_load(path.read_text()) or {}
        where = f" in {path}"
    data = apply_overrides(data, list(overrides or []))
    return config_from_dict(data, where)


def describe_config() -> str:
    """Every key with its default and help, for ``covpool train --help``."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        defaults = cls()
        for f in dataclasses.fields(cls):
            hint = _hints(cls)[f.name]
            if _is_section(hint):
                walk(hint, f"{prefix}{f.name}.")
            else:
                lines.append(f"  {prefix + f.name:<32} {getattr(defaults, f.name)!r:<12} {f.metadata['help']}")

    walk(TrainConfig, "")
    return "\n".join(lines)
