"""The training configuration: one dataclass schema that lists every key with its default and help.

A YAML file fills it (a path, or the name of a config shipped inside the package, see
:func:`shipped_configs`); ``key=value`` overrides on the command line use dotted keys for nested sections
(``optim.lr=0.01``) and YAML scalars for values. An unknown key raises :class:`ConfigError` listing the
valid keys of its section. ``model.kwargs`` and ``model.covpool`` are free-form dicts passed on untouched.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
    "config_diff",
    "format_config_diff",
    "MISSING",
    "did_you_mean",
]


class ConfigError(ValueError):
    """A config file or override is unreadable, names an unknown key or holds a value of the wrong type."""


class ConfigNotFoundError(ConfigError, FileNotFoundError):
    """The config file given does not exist (a :class:`ConfigError` and a :class:`FileNotFoundError`)."""


@dataclass(frozen=True)
class _Interval:
    """A key's allowed values, written as in maths: ``[0, 1)``, ``(0, inf)``; numbers must also be finite."""

    text: str
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> _Interval:
        low, high = (float(x) for x in text[1:-1].split(","))
        return cls(text, low, high, text[0] == "[", text[-1] == "]")

    def __contains__(self, x: float) -> bool:
        return (math.isfinite(x) and (self.low <= x if self.low_closed else self.low < x)
                and (x <= self.high if self.high_closed else x < self.high))

    def __str__(self) -> str:
        if math.isinf(self.high):
            low = self.text[1:].split(",")[0].strip()
            return f"{'>=' if self.low_closed else '>'} {low}"
        return f"in {self.text}"


def _opt(default: Any, help_: str, interval: str | None = None, *, length: int | None = None,
         ascending: bool = False, check: Callable[[str, Any, str], None] | None = None) -> Any:
    """A config key: default, help and, for a number (or each number of a list), the interval it must lie in;
    ``length`` and ``ascending`` further constrain a list; ``check(key, value, where)`` raises :class:`ConfigError`
    for any other rule of the key."""
    meta: dict[str, Any] = {"help": help_}
    if check is not None:
        meta["check"] = check
    if interval is not None:
        meta["interval"] = _Interval.parse(interval)
    if length is not None:
        meta["length"] = length
    if ascending:
        meta["ascending"] = True
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _range_text(f: dataclasses.Field) -> str:
    """The constraint of a key in words, for ``--help`` and errors ('' when it has none)."""
    meta = f.metadata
    if "interval" not in meta:
        return ""
    words = str(meta["interval"])
    if "length" in meta or "ascending" in meta:
        shape = " ".join(x for x in (f"{meta['length']}" if "length" in meta else "",
                                     "ascending" if meta.get("ascending") else "") if x)
        words = f"{shape} numbers, each {words}"
    return words + (" or null" if f.default is None else "")


def _check_field(f: dataclasses.Field, value: Any, key: str, where: str = "") -> None:
    """Raise :class:`ConfigError` when ``value`` lies outside the range that key ``f`` declares, or breaks
    its other rule."""
    if "check" in f.metadata and value is not None:
        f.metadata["check"](key, value, where)
    interval = f.metadata.get("interval")
    if interval is None or value is None:
        return
    numbers = list(value) if isinstance(value, (list, tuple)) else [value]
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and x in interval for x in numbers)
    ok = ok and len(numbers) == f.metadata.get("length", len(numbers))
    ok = ok and (not f.metadata.get("ascending") or numbers == sorted(numbers))
    if not ok:
        raise ConfigError(f"config key {key!r} must be {_range_text(f)}, got {value!r}{where}")


def _folder_name(key: str, value: Any, where: str = "") -> None:
    """A run name names one folder inside output_dir, never a path out of it."""
    if value in ("", ".", "..") or any(sep in value for sep in ("/", "\\", "\0")):
        raise ConfigError(f"config key {key!r} must be a folder name (no '/', '\\', '.' or '..'), got "
                          f"{value!r}{where}: the run's outputs go to <output_dir>/<name>/; put the path in output_dir")


def did_you_mean(value: Any, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` with the valid name closest to ``value``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(value), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Section:
    """Checks every key's range when a section is built directly in Python, as files and overrides are."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name), f.name)


@dataclass
class ModelConfig(_Section):
    """The ``model`` section of a training config: the timm model, its second-order head and ZCA layers."""

    name: str = _opt("resnet18", "any timm model name, covpool's included (resnet50_isqrt, so_vit_7, ...), or "
                     "torchvision:<name> for a torchvision classification model")
    pretrained: bool | str = _opt(
        False, "true: the hub's weights (timm's; torchvision's for torchvision: names; needs the network once); "
        "a path: a local weights file, or a covpool checkpoint (last.pt/best.pt, loaded after the surgery; another "
        "class count re-initialises the classifier); false: random init"
    )
    num_classes: int | None = _opt(None, "classifier size; null takes it from the data set", "[1, inf)")
    swap_pooling: bool = _opt(False, "replace the model's pooling + classifier by a second-order head "
                              "(covpool.swap_pooling: covariance pooling for CNNs, on the patch tokens for ViTs)")
    head: str = _opt("isqrt_cov", "the second-order head of model.swap_pooling, a name of covpool.list_heads(): "
                     "isqrt_cov | bcnn | improved_bcnn | mpn_cov | cbp_ts | cbp_rm | dropcov | sot (ViTs)")
    covpool: dict = _opt({}, "keyword options for covpool.swap_pooling and the head, e.g. {reduced_dim: 256, "
                         "backend: ns, last_stride: 1}")
    zca: str = _opt("none", "ZCA whitening batch norm (covpool.ZCABatchNorm2d) in place of BatchNorm2d: none | stem "
                    "(the first one) | all; synchronised across processes under DDP")
    zca_options: dict = _opt({}, "keyword options for covpool.ZCABatchNorm2d, e.g. {group_size: 16, backend: ns}")
    backend_schedule: list | None = _opt(None, "square-root backend of the covariance pooling per epoch: "
                                         "[[start_epoch, backend], ...] from 0, e.g. [[0, ns], [10, svd_pade]]")
    cifar_stem: bool = _opt(False, "ResNet stem for 32x32 input: 3x3 stride-1 first conv, no max-pool")
    grad_checkpointing: bool = _opt(False, "recompute activations in the backward instead of storing them (timm's "
                                    "set_grad_checkpointing): less memory, more time (ResNet-18 on a CPU: +30 %)")
    kwargs: dict = _opt({}, "extra keyword arguments for timm.create_model (drop_rate, output_stride, img_size, ...)")


@dataclass
class DataConfig(_Section):
    """The ``data`` section of a training config: the data set, its transforms and loaders."""

    dataset: str = _opt("embedded", "embedded | imagefolder | cub200 | stanford_cars | fgvc_aircraft | flowers102 | "
                        "oxford_pet | cifar10 | cifar100")
    root: str | None = _opt(None, "data-set folder (not needed for 'embedded')")
    download: bool = _opt(False, "let torchvision download the data set into root (where torchvision can)")
    img_size: int = _opt(224, "input resolution (square); also the img_size of models built for one input size "
                         "(ViTs, Swin, So-ViT) unless model.kwargs.img_size is set", "[1, inf)")
    batch_size: int = _opt(32, "batch size per process", "[1, inf)")
    val_batch_size: int | None = _opt(None, "evaluation batch size; null uses 2 x batch_size", "[1, inf)")
    workers: int = _opt(2, "data-loader worker processes per process", "[0, inf)")
    scale: list | None = _opt(None, "RandomResizedCrop area range [low, high]; null is timm's [0.08, 1.0]", "(0, 1]",
                               length=2, ascending=True)
    hflip: float = _opt(0.5, "horizontal flip probability", "[0, 1]")
    color_jitter: float = _opt(0.0, "colour jitter strength", "[0, inf)")
    auto_augment: str | None = _opt(None, "timm auto-augment string, e.g. rand-m9-mstd0.5-inc1")
    re_prob: float = _opt(0.0, "random-erasing probability", "[0, 1]")
    crop_pct: float | None = _opt(None, "evaluation centre-crop fraction; null is the model's", "(0, 1]")
    interpolation: str | None = _opt(None, "resize interpolation; null is the model's")
    embedded_train_per_class: int = _opt(160, "embedded data set: training patches per class", "[1, inf)")
    embedded_val_per_class: int = _opt(60, "embedded data set: validation patches per class", "[1, inf)")
    embedded_grayscale: bool = _opt(True, "embedded data set: grey patches, so texture (not colour) tells classes "
                                    "apart")


@dataclass
class OptimConfig(_Section):
    """The ``optim`` section of a training config: the optimizer and the learning-rate schedule."""

    opt: str = _opt("sgd", "timm optimizer name (sgd, adamw, ...)")
    lr: float = _opt(0.01, "learning rate of the backbone (per batch_size x processes as given)", "[0, inf)")
    head_lr_mult: float = _opt(1.0, "learning-rate multiplier of the new head (classifier + covariance pooling)",
                              "[0, inf)")
    momentum: float = _opt(0.9, "momentum (SGD)", "[0, 1)")
    weight_decay: float = _opt(1e-4, "weight decay (not applied to biases and norm parameters)", "[0, inf)")
    sched: str = _opt("cosine", "timm scheduler: cosine | step | multistep | constant | poly | ...")
    warmup_epochs: float = _opt(0, "linear warm-up epochs", "[0, inf)")
    warmup_lr: float = _opt(1e-5, "learning rate at the start of the warm-up", "[0, inf)")
    min_lr: float = _opt(0.0, "floor of the decaying schedules", "[0, inf)")
    decay_epochs: float = _opt(30, "step schedule: epochs between decays", "(0, inf)")
    decay_milestones: list = _opt([30, 60, 90], "multistep schedule: epochs to decay at", "[0, inf)", ascending=True)
    decay_rate: float = _opt(0.1, "step/multistep decay factor", "(0, 1]")
    layer_decay: float | None = _opt(None, "timm's layer-wise learning-rate decay per block from the top (e.g. 0.75 "
                                     "for a pretrained ViT), combined with head_lr_mult; null: off", "(0, 1]")


@dataclass
class TrainConfig(_Section):
    """A training config: the top-level keys and the ``model``, ``data`` and ``optim`` sections (every
    key, its default, help and range: ``covpool train --help``)."""

    name: str = _opt("run", "run name, a folder name; outputs go to <output_dir>/<name>/", check=_folder_name)
    output_dir: str = _opt("runs", "parent folder of the run folders")
    seed: int = _opt(0, "seed of every random number generator (data order, init, augmentation)",
                     "[0, 4294967295]")
    epochs: int = _opt(10, "number of epochs", "[1, inf)")
    device: str = _opt("auto", "auto | cpu | cuda (auto: cuda when available)")
    amp: str = _opt("none", "mixed precision: none | bf16 | fp16 (fp16 only on CUDA, with a GradScaler)")
    grad_accum_steps: int = _opt(1, "batches whose gradients add up to one optimizer step: the effective batch is "
                                 "data.batch_size x grad_accum_steps x processes", "[1, inf)")
    channels_last: bool = _opt(False, "NHWC memory layout for the model and its inputs (faster convolutions on "
                               "recent GPUs)")
    compile: bool | str = _opt(False, "torch.compile the training forward: true (inductor), a torch.compile backend "
                               "name, or false")
    clip_grad: float | None = _opt(None, "clip the gradients to this value (see clip_mode); null: no clipping",
                                   "(0, inf)")
    clip_mode: str = _opt("norm", "how clip_grad clips (timm's dispatch_clip_grad): norm (the global norm) | value "
                          "(each element) | agc (adaptive, per unit, relative to the weight norm)")
    ema: bool = _opt(False, "keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it too")
    ema_decay: float = _opt(0.9998, "EMA decay (weight of the old average per step)", "[0, 1)")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss", "[0, 1)")
    mixup: float = _opt(0.0, "mixup alpha (0: off)", "[0, inf)")
    cutmix: float = _opt(0.0, "cutmix alpha (0: off)", "[0, inf)")
    max_steps_per_epoch: int | None = _opt(None, "cap on training steps per epoch (smoke tests); null: whole epoch",
                                            "[1, inf)")
    max_val_steps: int | None = _opt(None, "cap on evaluation batches; null: whole validation set", "[1, inf)")
    progress: bool = _opt(True, "show tqdm progress bars")
    log_interval: int = _opt(50, "steps between plain progress lines when the output is not a terminal (a log "
                             "file)", "[1, inf)")
    dist_timeout: float | None = _opt(None, "seconds a process waits for the others in a collective before the "
                                      "job stops naming the missing rank; null: $COVPOOL_DIST_TIMEOUT or 600",
                                      "(0, inf)")
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
    return ConfigError(f"unknown config key {prefix + key!r}{where}{did_you_mean(prefix + key, valid)}; valid keys: "
                       f"{', '.join(valid)}")


def _coerce(value: Any, hint: Any, key: str, where: str = "") -> Any:
    """Check ``value`` against a field's type; ints become floats and numeric strings (PyYAML reads
    ``1e-4`` as a string) become numbers where the field is a float."""
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"config key {key!r} cannot be null{where}")
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
    names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"config key {key!r} must be {names}, got {value!r} ({type(value).__name__}){where}")


def _build(cls: type, data: Any, prefix: str, where: Callable[[str], str]) -> Any:
    """``cls`` from ``data``; ``where(dotted_key)`` says where a key's value came from, for errors."""
    if not isinstance(data, dict):
        section = prefix.rstrip(".")
        raise ConfigError(f"config section {section or '<top>'!r}{where(section)} must be a mapping, got {data!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(str(key), cls, prefix, where(prefix + str(key)))
        hint = hints[key]
        if _is_section(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, f"{prefix}{key}.", where)
        else:
            kwargs[key] = _coerce(value, hint, prefix + key, where(prefix + key))
            _check_field(fields[key], kwargs[key], prefix + key, where(prefix + key))
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "", overrides: list[str] | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a (nested) plain dict with ``key=value`` ``overrides`` on top;
    ``where`` names the dict's source in errors (e.g. ``" in c.yaml"``), errors in an override name it."""
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
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
        _set_dotted(out, TrainConfig, key.strip(), value)
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not "the last wins"."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                        f"found the key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_config_file(path: str | Path) -> dict:
    """The plain dict a YAML config file holds; every way it can be unusable is a :class:`ConfigError`
    that names the file (missing: :class:`ConfigNotFoundError`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigNotFoundError(f"config file {str(path)!r} not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror or err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values (key: value lines), "
                          f"but its top level is a {type(data).__name__}")
    return data


def _shipped_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> dict[str, Path]:
    """The configs shipped inside the package, name (file name without ``.yaml``) -> file, sorted by name.
    ``covpool train --config <name>`` and :func:`load_config` accept these names."""
    return {p.stem: p for p in sorted(_shipped_dir().glob("*.yaml"))}


def resolve_config(name_or_path: str | Path) -> Path:
    """The config file meant by ``name_or_path``: an existing file first (a local path always wins), else
    the shipped config of that name, with or without ``.yaml`` (``configs/<name>.yaml`` too, so the documented
    commands work from any folder once covpool is installed). Raises :class:`ConfigNotFoundError` listing
    the shipped names otherwise."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        yamls = sorted(p.name for p in path.glob("*.y*ml"))
        inside = f" (it holds {', '.join(yamls)})" if yamls else " (it holds no .yaml file)"
        raise ConfigError(f"config {str(name_or_path)!r} is a folder, not a config file{inside}; give a YAML file "
                          "or the name of a shipped config")
    shipped = shipped_configs()
    bare = len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == "configs")
    if bare and path.suffix in ("", ".yaml", ".yml"):
        stem = path.stem if path.suffix else path.name
        if stem in shipped:
            return shipped[stem]
    raise ConfigNotFoundError(f"config {str(name_or_path)!r} not found: no such file, and no shipped config of "
                              f"that name; shipped configs: {', '.join(shipped) or '(none)'}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (a file, or a shipped config's name; the defaults when ``path`` is None) and apply
    ``key=value`` overrides."""
    data: dict = {}
    where = ""
    if path is not None:
        path = resolve_config(path)
        data = _read_config_file(path)
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
    """The dotted keys whose values differ between two configs, as ``(key, old_value, new_value)``.

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
    """``config_diff``'s result as one line: ``epochs: 1 -> 3, optim.lr: 0.1 -> 0.01``."""
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in diff)


def describe_config() -> str:
    """Every key with its default, help and range, for ``covpool train --help``."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        defaults = cls()
        for f in dataclasses.fields(cls):
            hint = _hints(cls)[f.name]
            if _is_section(hint):
                walk(hint, f"{prefix}{f.name}.")
            else:
                limits = _range_text(f)
                help_ = f.metadata["help"] + (f"; {limits}" if limits else "")
                lines.append(f"  {prefix + f.name:<32} {getattr(defaults, f.name)!r:<12} {help_}")

    walk(TrainConfig, "")
    return "\n".join(lines)
