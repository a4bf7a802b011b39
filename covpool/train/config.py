"""The training configuration: one dataclass schema that declares every key with its default, help and rules.

A YAML file fills it (a path, or the name of a config shipped inside the package, see
:func:`shipped_configs`); ``key=value`` overrides on the command line use dotted keys for nested sections
(``optim.lr=0.01``) and YAML scalars for values. An unknown key raises :class:`ConfigError` listing the
valid keys of its section. ``model.kwargs`` and ``model.covpool`` are free-form dicts passed on untouched.

Each key declares its rules on its field (how: ``_schema``): the interval of a number, and the values a name
takes, fixed (``amp``, ``device``) or taken from the registry that will receive it (timm's models and
optimizers, covpool's heads and backends, the data sets). :func:`config_schema` lists them; the checks on
reading, :func:`covpool.train.check_config`, ``covpool train --help`` (:func:`describe_config`) and the
config reference of the documentation all read them there.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import covpool

from ..precision import AMP_MODES
from ._config_files import ConfigNotFoundError, read_config_file, resolve_config, shipped_configs, yaml_problem
from ._datasets import dataset_names
from ._dist import DEVICES
from ._schema import (
    Choices,
    ConfigError,
    _Section,
    check_field,
    choices_text,
    coerce,
    did_you_mean,
    is_section,
    key,
    range_text,
    type_hints,
    unknown_key,
)

__all__ = [
    "ConfigError",
    "ConfigNotFoundError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "load_config",
    "resolve_config",
    "shipped_configs",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "describe_config",
    "config_schema",
    "ConfigKey",
    "Choices",
    "config_diff",
    "format_config_diff",
    "MISSING",
    "did_you_mean",
    "SCHEDULERS",
    "TORCHVISION_PREFIX",
    "torchvision_models",
]


# ---- the registries whose names the keys take -----------------------------------------------------------------
#: ``model.name`` prefix of a torchvision classification model (``torchvision:resnet50``)
TORCHVISION_PREFIX = "torchvision:"

#: the names timm's ``create_scheduler_v2`` takes that work with covpool's per-step schedule (timm keeps no
#: list of them; ``plateau`` steps once per epoch on a validation metric, which a per-step schedule cannot)
SCHEDULERS = ("cosine", "tanh", "step", "constant", "multistep", "poly", "wsd", "rsqrt", "none")


def torchvision_models() -> list[str]:
    """The torchvision classification models ``model.name=torchvision:<name>`` takes."""
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)


def _model_names() -> list[str]:
    import timm

    return [*timm.list_models(), *(TORCHVISION_PREFIX + n for n in torchvision_models())]


def _is_model(name: str) -> bool:
    import timm
    from timm.models import parse_model_name

    if name.startswith(TORCHVISION_PREFIX):
        return name[len(TORCHVISION_PREFIX):] in torchvision_models()
    try:
        source, _ = parse_model_name(name)
    except ValueError:
        return False
    return source is not None or timm.is_model(name)  # hf-hub: / local-dir: names are checked when loaded


def _optimizers() -> list[str]:
    from timm.optim import list_optimizers

    return [name for name in list_optimizers() if isinstance(name, str)]  # names only, without with_description


def _is_optimizer(name: str) -> bool:
    *prefix, base = name.lower().split("_")  # timm's own parsing: lookahead_<name> wraps <name> in Lookahead
    return prefix in ([], ["lookahead"]) and base in _optimizers()


def _compile_backends() -> list[str]:
    return torch.compiler.list_backends(exclude_tags=())


def _folder_name(key: str, value: Any, where: str = "") -> None:
    """A run name names one folder inside output_dir, never a path out of it."""
    if value in ("", ".", "..") or any(sep in value for sep in ("/", "\\", "\0")):
        raise ConfigError(f"config key {key!r} must be a folder name (no '/', '\\', '.' or '..'), got "
                          f"{value!r}{where}: the run's outputs go to <output_dir>/<name>/; put the path in output_dir")


_AMP_HELP = "; ".join(f"{mode.name}: {mode.about}" for mode in AMP_MODES.values())


# ---- the schema ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig(_Section):
    """The ``model`` section of a training config: the timm model, its second-order head and ZCA layers."""

    name: str = key("resnet18", "any timm model name, covpool's included (resnet50_isqrt, so_vit_7, ...), or "
                    "torchvision:<name> for a torchvision classification model",
                    choices=Choices("a timm model", _model_names, _is_model,
                                    "see timm.list_models() (covpool's models included), or torchvision:<name> for "
                                    "torchvision.models.list_models()"))
    pretrained: bool | str = key(
        False, "true: the hub's weights (timm's; torchvision's for torchvision: names; needs the network once); "
        "a path: a local weights file, or a covpool checkpoint (last.pt/best.pt, loaded after the surgery; another "
        "class count re-initialises the classifier); false: random init"
    )
    num_classes: int | None = key(None, "classifier size; null takes it from the data set", "[1, inf)")
    swap_pooling: bool = key(False, "replace the model's pooling + classifier by a second-order head "
                             "(covpool.swap_pooling: covariance pooling for CNNs, on the patch tokens for ViTs)")
    head: str = key("isqrt_cov", "the second-order head of model.swap_pooling, a name of covpool.list_heads() "
                    "(a token head, such as sot, for ViTs only)",
                    choices=Choices("a second-order head", covpool.list_heads))
    covpool: dict = key({}, "keyword options for covpool.swap_pooling and the head, e.g. {reduced_dim: 256, "
                        "backend: ns, last_stride: 1}", backends=("backend",))
    zca: str = key("none", "ZCA whitening batch norm (covpool.ZCABatchNorm2d) in place of BatchNorm2d: stem replaces "
                   "the first one, all every one; synchronised across processes under DDP",
                   choices=Choices.of("a ZCA mode", "none", "stem", "all"))
    zca_options: dict = key({}, "keyword options for covpool.ZCABatchNorm2d, e.g. {group_size: 16, backend: ns}",
                            backends=("backend",))
    backend_schedule: list | None = key(None, "square-root backend of the covariance pooling per epoch: "
                                        "[[start_epoch, backend], ...] from 0, e.g. [[0, ns], [10, svd_pade]]")
    cifar_stem: bool = key(False, "ResNet stem for 32x32 input: 3x3 stride-1 first conv, no max-pool")
    grad_checkpointing: bool = key(False, "recompute activations in the backward instead of storing them (timm's "
                                   "set_grad_checkpointing): less memory, more time (ResNet-18 on a CPU: +30 %)")
    kwargs: dict = key({}, "extra keyword arguments for timm.create_model (drop_rate, output_stride, img_size, ...)",
                       backends=("backend",))


@dataclass
class DataConfig(_Section):
    """The ``data`` section of a training config: the data set, its transforms and loaders."""

    dataset: str = key("embedded", "the data set (embedded: the texture task that ships with covpool, no download; "
                       "imagefolder: train/ and val/ folders of class folders)",
                       choices=Choices("a data set of covpool train", dataset_names))
    root: str | None = key(None, "data-set folder (not needed for 'embedded')")
    download: bool = key(False, "let torchvision download the data set into root (where torchvision can)")
    img_size: int = key(224, "input resolution (square); also the img_size of models built for one input size "
                        "(ViTs, Swin, So-ViT) unless model.kwargs.img_size is set", "[1, inf)")
    batch_size: int = key(32, "batch size per process", "[1, inf)")
    val_batch_size: int | None = key(None, "evaluation batch size; null uses 2 x batch_size", "[1, inf)")
    workers: int = key(2, "data-loader worker processes per process", "[0, inf)")
    scale: list | None = key(None, "RandomResizedCrop area range [low, high]; null is timm's [0.08, 1.0]", "(0, 1]",
                             length=2, ascending=True)
    hflip: float = key(0.5, "horizontal flip probability", "[0, 1]")
    color_jitter: float = key(0.0, "colour jitter strength", "[0, inf)")
    auto_augment: str | None = key(None, "timm auto-augment string, e.g. rand-m9-mstd0.5-inc1")
    re_prob: float = key(0.0, "random-erasing probability", "[0, 1]")
    crop_pct: float | None = key(None, "evaluation centre-crop fraction; null is the model's", "(0, 1]")
    interpolation: str | None = key(None, "resize interpolation; null is the model's")
    embedded_train_per_class: int = key(160, "embedded data set: training patches per class", "[1, inf)")
    embedded_val_per_class: int = key(60, "embedded data set: validation patches per class", "[1, inf)")
    embedded_grayscale: bool = key(True, "embedded data set: grey patches, so texture (not colour) tells classes "
                                   "apart")


@dataclass
class OptimConfig(_Section):
    """The ``optim`` section of a training config: the optimizer and the learning-rate schedule."""

    opt: str = key("sgd", "timm optimizer name (sgd, adamw, ...; lookahead_<name> wraps one in Lookahead)",
                   choices=Choices("a timm optimizer", _optimizers, _is_optimizer, "see timm.optim.list_optimizers()"))
    lr: float = key(0.01, "learning rate of the backbone (per batch_size x processes as given)", "[0, inf)")
    head_lr_mult: float = key(1.0, "learning-rate multiplier of the new head (classifier + covariance pooling)",
                              "[0, inf)")
    momentum: float = key(0.9, "momentum (SGD)", "[0, 1)")
    weight_decay: float = key(1e-4, "weight decay (not applied to biases and norm parameters)", "[0, inf)")
    sched: str = key("cosine", "timm scheduler, stepped after every optimizer step",
                     choices=Choices.of("a timm scheduler covpool can step", *SCHEDULERS))
    warmup_epochs: float = key(0, "linear warm-up epochs", "[0, inf)")
    warmup_lr: float = key(1e-5, "learning rate at the start of the warm-up", "[0, inf)")
    min_lr: float = key(0.0, "floor of the decaying schedules", "[0, inf)")
    decay_epochs: float = key(30, "step schedule: epochs between decays", "(0, inf)")
    decay_milestones: list = key([30, 60, 90], "multistep schedule: epochs to decay at", "[0, inf)", ascending=True)
    decay_rate: float = key(0.1, "step/multistep decay factor", "(0, 1]")
    layer_decay: float | None = key(None, "timm's layer-wise learning-rate decay per block from the top (e.g. 0.75 "
                                    "for a pretrained ViT), combined with head_lr_mult; null: off", "(0, 1]")


@dataclass
class TrainConfig(_Section):
    """A training config: the top-level keys and the ``model``, ``data`` and ``optim`` sections (every
    key, its default, help and range: ``covpool train --help``)."""

    name: str = key("run", "run name, a folder name; outputs go to <output_dir>/<name>/", check=_folder_name)
    output_dir: str = key("runs", "parent folder of the run folders")
    seed: int = key(0, "seed of every random number generator (data order, init, augmentation)", "[0, 4294967295]")
    epochs: int = key(10, "number of epochs", "[1, inf)")
    device: str = key("auto", "where to train (auto: cuda when available)", choices=Choices.of("a device", *DEVICES))
    amp: str = key("none", f"mixed precision ({_AMP_HELP})", choices=Choices.of("a mixed-precision mode", *AMP_MODES))
    grad_accum_steps: int = key(1, "batches whose gradients add up to one optimizer step: the effective batch is "
                                "data.batch_size x grad_accum_steps x processes", "[1, inf)")
    channels_last: bool = key(False, "NHWC memory layout for the model and its inputs (faster convolutions on "
                              "recent GPUs)")
    compile: bool | str = key(False, "torch.compile the training forward: true (inductor), a torch.compile backend "
                              "name, or false",
                              choices=Choices("a torch.compile backend (true: inductor)", _compile_backends))
    clip_grad: float | None = key(None, "clip the gradients to this value (see clip_mode); null: no clipping",
                                  "(0, inf)")
    clip_mode: str = key("norm", "how clip_grad clips (timm's dispatch_clip_grad): norm the global norm, value each "
                         "element, agc adaptively per unit relative to the weight norm",
                         choices=Choices.of("a clipping mode of timm's dispatch_clip_grad", "norm", "value", "agc"))
    ema: bool = key(False, "keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it too")
    ema_decay: float = key(0.9998, "EMA decay (weight of the old average per step)", "[0, 1)")
    label_smoothing: float = key(0.0, "label smoothing of the cross-entropy loss", "[0, 1)")
    mixup: float = key(0.0, "mixup alpha (0: off)", "[0, inf)")
    cutmix: float = key(0.0, "cutmix alpha (0: off)", "[0, inf)")
    max_steps_per_epoch: int | None = key(None, "cap on training steps per epoch (smoke tests); null: whole epoch",
                                          "[1, inf)")
    max_val_steps: int | None = key(None, "cap on evaluation batches; null: whole validation set", "[1, inf)")
    progress: bool = key(True, "show tqdm progress bars")
    log_interval: int = key(50, "steps between plain progress lines when the output is not a terminal (a log "
                            "file)", "[1, inf)")
    dist_timeout: float | None = key(None, "seconds a process waits for the others in a collective before the "
                                     "job stops naming the missing rank; null: $COVPOOL_DIST_TIMEOUT or 600",
                                     "(0, inf)")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model section"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data section"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer and schedule section"})

    @property
    def run_dir(self) -> Path:
        """The run's folder, ``<output_dir>/<name>``: its checkpoints, ``config.yaml``, ``metrics.csv`` and
        ``curves.png``."""
        return Path(self.output_dir) / self.name


@dataclass(frozen=True)
class ConfigKey:
    """One key of the training config, as :func:`config_schema` lists it.

    Attributes:
        key: the dotted key (``optim.lr``).
        section: ``""`` for a top-level key, else ``model``, ``data`` or ``optim``.
        type: its type as written in the schema (``float | None``).
        default: its default value.
        help: what it does.
        range: the interval a number must lie in, in words (``in [0, 1)``, ``>= 1 or null``), or ``""``.
        values: the values it takes, in words (``none | bf16 | fp16``, or where a registry lists them), or ``""``.
        choices: the :class:`Choices` behind ``values`` (None for a free-form section's backends).
        backends: the entries of a free-form section that are backend specs (``("backend",)``).
    """

    key: str
    section: str
    type: str
    default: Any
    help: str
    range: str
    values: str
    choices: Choices | None
    backends: tuple[str, ...]


def config_schema() -> list[ConfigKey]:
    """Every key of the training config, in schema order, with its type, default, help, range and values
    (the values of a registry's key are the names it holds now: a head you registered is among them).

    >>> amp = next(k for k in config_schema() if k.key == "amp")
    >>> amp.default, amp.values
    ('none', 'none | bf16 | fp16')
    """
    keys: list[ConfigKey] = []

    def walk(cls: type, prefix: str) -> None:
        defaults = cls()
        for f in dataclasses.fields(cls):
            hint = type_hints(cls)[f.name]
            if is_section(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            keys.append(ConfigKey(prefix + f.name, prefix.rstrip("."), str(f.type), getattr(defaults, f.name),
                                  f.metadata["help"], range_text(f), choices_text(f), f.metadata.get("choices"),
                                  f.metadata.get("backends", ())))

    walk(TrainConfig, "")
    return keys


def _build(cls: type, data: Any, prefix: str, where: Callable[[str], str]) -> Any:
    """``cls`` from ``data``; ``where(dotted_key)`` says where a key's value came from, for errors."""
    if not isinstance(data, dict):
        section = prefix.rstrip(".")
        raise ConfigError(f"config section {section or '<top>'!r}{where(section)} must be a mapping, got {data!r}")
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise unknown_key(str(name), cls, prefix, where(prefix + str(name)))
        hint = hints[name]
        if is_section(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, f"{prefix}{name}.", where)
        else:
            kwargs[name] = coerce(value, hint, prefix + name, where(prefix + name))
            check_field(fields[name], kwargs[name], prefix + name, where(prefix + name))
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "", overrides: list[str] | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from ``data``, a (nested) plain dict (None or empty: the defaults), with
    ``key=value`` ``overrides`` on top (:func:`apply_overrides`); ``where`` names the dict's source in errors
    (e.g. ``" in c.yaml"``), errors in an override name it. Raises :class:`ConfigError` for an unknown key (the
    message names the closest), a value of the wrong type or out of its range or choices, a malformed override."""
    overrides = list(overrides or [])
    data = apply_overrides(data, overrides) if overrides else data
    overridden = [item.partition("=")[0].strip() for item in overrides]

    def source(key: str) -> str:
        # a value set by an override, or inside a section an override replaced, is the override's doing
        for o in overridden:
            if o == key or o.startswith(key + ".") or key.startswith(o + "."):
                return " (command-line override)"
        return where

    return _build(TrainConfig, data or {}, "", source)


def config_to_dict(cfg: TrainConfig) -> dict:
    """``cfg`` as plain nested dicts/lists/scalars (what checkpoints and ``config.yaml`` store)."""
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, cls: type, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node, prefix = data, ""
    section: type | None = cls
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if section is not None:
            names = {f.name for f in dataclasses.fields(section)}
            if part not in names:
                raise unknown_key(part, section, prefix, " (command-line override)")
            hint = type_hints(section)[part]
            section = hint if is_section(hint) else None
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


def apply_overrides(data: Any, overrides: list[str]) -> dict[str, Any]:
    """Apply ``overrides``, ``key=value`` strings (dotted keys, YAML-scalar values, e.g. ``optim.lr=0.01``), in
    order to ``data``, a plain nested config dict (what a YAML file or a checkpoint holds; None: empty), and
    return the result, a new dict (``data`` is not modified).

    Raises:
        ConfigError: ``data`` is not a mapping, an override is not ``key=value``, its value not valid YAML or its
            key unknown (the message names the closest and lists the valid ones).
    """
    if not isinstance(data, dict) and data is not None:
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
    out = yaml.safe_load(yaml.safe_dump(data or {}))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.01)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({yaml_problem(err)})") from None
        _set_dotted(out, TrainConfig, key.strip(), value)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (a file, or a shipped config's name; the defaults when ``path`` is None) and apply
    ``overrides``, ``key=value`` strings (:func:`apply_overrides`), in order.

    Raises:
        ConfigError: ``path`` is neither a file nor a shipped config's name (:class:`ConfigNotFoundError`), the
            file is not a YAML mapping, or a key or value is wrong (the message names it and where it came from).
    """
    data: dict = {}
    where = ""
    if path is not None:
        path = resolve_config(path)
        data = read_config_file(path)
        where = f" in {path}"
    return config_from_dict(data, where, overrides)


class _Missing:
    """The value of a key that one of two configs compared by :func:`config_diff` does not have."""

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> str:
        return "MISSING"


#: Stands for a key that one of two configs compared by :func:`config_diff` does not have.
MISSING = _Missing()


def config_diff(old: dict | TrainConfig, new: dict | TrainConfig,
                ignore: tuple[str, ...] | list[str] = ()) -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ between configs ``old`` and ``new``: ``(key, old_value, new_value)``.

    Configs are :class:`TrainConfig` or plain dicts (what a checkpoint stores); nested sections and free-form
    dicts (``model.kwargs``) are compared key by key, a key present on one side only has :data:`MISSING` on the
    other; ``1`` equals ``1.0`` and a tuple equals the list with the same items. Keys in ``ignore``, and
    every key under them, are skipped. Order: the new config's keys first, then keys only the old one has.

    >>> config_diff({"epochs": 1, "optim": {"lr": 0.1}}, {"epochs": 3, "optim": {"lr": 0.1}})
    [('epochs', 1, 3)]
    """
    old = config_to_dict(old) if isinstance(old, TrainConfig) else old
    new = config_to_dict(new) if isinstance(new, TrainConfig) else new
    ignored = tuple(ignore)
    out: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        key = prefix.rstrip(".")
        if key and any(key == i or key.startswith(i + ".") for i in ignored):
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in [*b, *(k for k in a if k not in b)]:
                walk(a.get(k, MISSING), b.get(k, MISSING), f"{prefix}{k}.")
        elif not _same(a, b):
            out.append((key, a, b))

    walk(old or {}, new or {}, "")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):  # True == 1 in Python, not in a config
        return type(a) is type(b) and a == b
    return a is b or (type(a) is not _Missing and type(b) is not _Missing and a == b)


def format_config_diff(diff: list[tuple[str, Any, Any]]) -> str:
    """``diff``, :func:`config_diff`'s result, as one line: ``epochs: 1 -> 3, optim.lr: 0.1 -> 0.01``."""
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in diff)


def describe_config() -> str:
    """Every key with its default, help, range and values, for ``covpool train --help``."""
    lines = []
    for k in config_schema():
        values = f"values: {k.values}" if k.choices is not None else k.values
        help_ = "; ".join(filter(None, [k.help, k.range, values]))
        lines.append(f"  {k.key:<32} {k.default!r:<12} {help_}")
    return "\n".join(lines)
