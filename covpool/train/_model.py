"""Model construction for ``covpool train``, ``eval``, ``predict`` and :func:`covpool.load_model`: a timm or
torchvision model, the config's surgery (CIFAR stem, ZCA batch norm, second-order head) and its first weights.

``model.pretrained`` is ``true`` (the hub's weights: timm's, or torchvision's for ``torchvision:<name>``),
``false``, or a local file. A file written by ``covpool train`` (``last.pt`` / ``best.pt``) is recognised and
loaded *after* the surgery, into the model it was trained as (a swapped ResNet, a wrapped ViT, a torchvision
model with a second-order head); with another class count its classifier is re-initialised, and any other
difference is a :class:`ConfigError` naming the keys. Any other file goes through timm's loader (and its
checkpoint filters), before the surgery, keeping its classifier when the class count fits.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import covpool

from ..outputs import first_line
from ._resume import model_changes
from .config import TORCHVISION_PREFIX, ConfigError, ModelConfig, format_config_diff

__all__ = ["PretrainedWeightsError", "BuiltModel", "build_model", "make_model", "set_grad_checkpointing",
           "classifier_names", "pooling_modules", "head_modules", "head_parameter_names", "param_groups",
           "fixed_input_size", "load_fitting"]

# Where a model keeps its global pooling: timm's models (covpool's, and the wrapper swap_pooling puts around the
# others) in `global_pool`, torchvision's in `avgpool`. Only a second-order head puts parameters there (timm's and
# torchvision's global poolings have none), and those are as new as the classifier when a pretrained backbone is
# fine-tuned, whichever head built them: a registered one's module (covpool.register_head) included.
_POOLING_ATTRS = ("global_pool", "avgpool")
_CLASSIFIER_ATTRS = ("fc", "classifier", "head")


class PretrainedWeightsError(RuntimeError):
    """The hub's pretrained weights could not be fetched (no network, the hub unreachable or offline)."""


@dataclass(frozen=True)
class BuiltModel:
    """A model built from a config, with what the start-up header says about its weights.

    Attributes:
        model: the model, on the CPU (or the device of the ``torch.device`` context it was built in).
        weights: where its weights come from, e.g. ``"timm hub (timm/resnet50.a1_in1k)"``, ``"random init"``.
        new: the modules whose weights are fresh although ``weights`` loaded (a new classifier, a new head).
    """

    model: nn.Module
    weights: str
    new: tuple[str, ...] = ()


def build_model(cfg: ModelConfig, num_classes: int, for_checkpoint: bool = False, img_size: int | None = None
                ) -> nn.Module:
    """Build ``cfg.name`` (a timm name, covpool's models included, or ``torchvision:<name>``) with
    ``num_classes`` outputs and apply the config's surgery: CIFAR stem, ZCA batch norm, second-order head
    (:func:`covpool.swap_pooling`), in that order.

    Args:
        cfg: the model section of a training config.
        num_classes: the classifier's size.
        for_checkpoint: the model will receive a checkpoint's weights, which hold every weight, so
            ``cfg.pretrained`` is not read (no download, no file needed).
        img_size: the input size (``data.img_size``): passed as the model's ``img_size`` when the model has a
            fixed input size (timm's ViTs, Swin, So-ViT, ...) and ``cfg.kwargs`` does not set one, so a ViT
            trains at 448 without ``model.kwargs.img_size`` (timm resamples pretrained position embeddings).

    ``cfg.pretrained``: ``True`` (the hub's weights, needs the network), ``False``, or a local file: a covpool
    training checkpoint (loaded after the surgery; another class count re-initialises the classifier) or any
    other weights file (timm's loader, before the surgery; its classifier kept when it has ``num_classes``
    rows). ``cfg.name`` is not checked here: :func:`covpool.train.check_config` checks it, with the other
    registry names, before anything is built.

    Raises:
        ConfigError: ``model.kwargs``, ``model.covpool``, ``model.zca_options`` or ``model.cifar_stem`` are
            refused by the model's or the layer's own checks (the message names the key), or a covpool
            checkpoint's weights do not fit the model (the message names the keys).
        FileNotFoundError: ``cfg.pretrained`` names no file.
        PretrainedWeightsError: the hub's weights could not be fetched.
    """
    return make_model(cfg, num_classes, for_checkpoint=for_checkpoint, img_size=img_size).model


def make_model(cfg: ModelConfig, num_classes: int, for_checkpoint: bool = False, img_size: int | None = None
               ) -> BuiltModel:
    """:func:`build_model`, with where the weights came from and which modules are new."""
    if for_checkpoint and cfg.pretrained is not False:
        cfg = replace(cfg, pretrained=False)
    source, own = cfg.pretrained, None
    if isinstance(source, str):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained={source!r} is not a file; give a local checkpoint "
                                    "path, true (download from the hub) or false (random init)")
        own = _covpool_checkpoint(path)
    tv_file = isinstance(source, str) and own is None and cfg.name.startswith(TORCHVISION_PREFIX)
    base_cfg = replace(cfg, pretrained=False) if own is not None or tv_file else cfg
    model = _create(base_cfg, num_classes, img_size)
    fresh: list[str] = []
    if tv_file:  # the weights of a plain torchvision model: loaded before the surgery, as timm's loader does
        fresh = load_fitting(model, _plain_weights(path), f"model.pretrained={source}")
    model = _surgery(model, cfg)
    if own is not None:
        weights, label = _checkpoint_weights(own, path)
        fresh = load_fitting(model, weights, f"model.pretrained={source}", stored_config=own.get("config"),
                             current=cfg)
        return BuiltModel(model, label, _modules_of(model, fresh))
    if source is False:
        return BuiltModel(model, "random init")
    head = tuple(head_modules(model)) if cfg.swap_pooling else ()
    if tv_file:
        classifier = () if cfg.swap_pooling else _modules_of(model, fresh)
    else:
        classifier = () if cfg.swap_pooling or _kept_classifier(model, num_classes) else tuple(classifier_names(model))
    stem = ("conv1 (CIFAR stem)",) if cfg.cifar_stem else ()
    where = f"file {source}" if isinstance(source, str) else f"hub ({_hub_name(model, cfg.name)})"
    return BuiltModel(model, where, (*stem, *classifier, *head))


# ---- creation ------------------------------------------------------------------------------------------------
def _create(cfg: ModelConfig, num_classes: int, img_size: int | None) -> nn.Module:
    if cfg.name.startswith(TORCHVISION_PREFIX):
        return _create_torchvision(cfg, num_classes)
    import timm

    kwargs = dict(cfg.kwargs)
    pretrained = cfg.pretrained
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": str(path)}
        kwargs = covpool.keep_fitting_classifier(cfg.name, {**kwargs, "num_classes": num_classes})
        kwargs.pop("num_classes")
        pretrained = True
    sized = img_size is not None and "img_size" not in kwargs and fixed_input_size(cfg.name)
    if sized:
        kwargs["img_size"] = img_size
    try:
        try:
            return timm.create_model(cfg.name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        except TypeError as err:
            if not (sized and "img_size" in str(err)):
                raise
            # a fixed-size model without an img_size argument: the dry run's forward reports a size it refuses
            kwargs.pop("img_size")
            return timm.create_model(cfg.name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError, TypeError, ValueError) as err:
        if isinstance(err, TypeError) or (isinstance(err, ValueError) and not pretrained):
            # the model's own checks of its keyword arguments
            raise ConfigError(f"model.kwargs={dict(cfg.kwargs)!r} for model.name={cfg.name!r}: {err}") from None
        if not pretrained or isinstance(cfg.pretrained, str):
            raise
        raise _fetch_failed(cfg.name, err) from err


def fixed_input_size(name: str) -> bool:
    """Whether timm's pretrained config of ``name`` says that the model is built for one input size (ViTs,
    Swin, So-ViT: their position embeddings or windows are sized at construction)."""
    from timm.models import get_pretrained_cfg_value

    try:
        return bool(get_pretrained_cfg_value(name, "fixed_input_size"))
    except Exception:  # hf-hub: / local-dir: names, names timm does not know: nothing to go by
        return False


def _create_torchvision(cfg: ModelConfig, num_classes: int) -> nn.Module:
    import torchvision.models as tvm

    arch = cfg.name[len(TORCHVISION_PREFIX):]
    kwargs = dict(cfg.kwargs)
    try:
        if cfg.pretrained is True:
            try:
                model = tvm.get_model(arch, weights="DEFAULT", **kwargs)
            except (OSError, RuntimeError) as err:
                raise _fetch_failed(cfg.name, err) from err
            _resize_classifier(model, num_classes)
            return model
        return tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.kwargs={dict(cfg.kwargs)!r} for model.name={cfg.name!r}: {err}") from None


def _resize_classifier(model: nn.Module, num_classes: int) -> None:
    """A fresh last linear layer with ``num_classes`` outputs in a torchvision model's classifier (its hub
    weights have ImageNet's 1000), as timm does for its models."""
    for attr in _CLASSIFIER_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            break
    else:
        raise ConfigError(f"{type(model).__name__} has no classifier named one of {_CLASSIFIER_ATTRS}")
    linears = [(name, m) for name, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__}.{attr} holds no nn.Linear to resize")
    name, old = linears[-1]
    if old.out_features == num_classes:
        return
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    if not name:
        setattr(model, attr, new)
    else:
        parent, _, child = name.rpartition(".")
        setattr(head.get_submodule(parent) if parent else head, child, new)


def _surgery(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    if cfg.cifar_stem:
        try:
            model = covpool.cifar_stem(model)
        except ValueError as err:
            raise ConfigError(f"model.cifar_stem: {err}") from None
    if cfg.zca != "none":
        try:
            model = covpool.convert_zca(model, cfg.zca, **cfg.zca_options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.zca={cfg.zca!r}, model.zca_options={dict(cfg.zca_options)!r} "
                              f"(model.zca: none, stem or all): {err}") from None
    if cfg.swap_pooling:
        try:  # timm non-ResNets come back wrapped
            model = covpool.swap_pooling(model, head=cfg.head, **cfg.covpool)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.head={cfg.head!r}, model.covpool={dict(cfg.covpool)!r} (covpool.swap_pooling's "
                              f"head and options): {err}") from None
    elif cfg.covpool or cfg.head != "isqrt_cov":
        raise ConfigError("model.head and model.covpool are only used with model.swap_pooling=true")
    return model


def _fetch_failed(name: str, err: Exception) -> PretrainedWeightsError:
    return PretrainedWeightsError(
        f"could not fetch pretrained weights for {name!r} ({type(err).__name__}: {first_line(err, 300)}). Without "
        "network access, download them elsewhere and pass model.pretrained=/path/to/file.safetensors (or .pth), or "
        "train from scratch with model.pretrained=false")


def _hub_name(model: nn.Module, name: str) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("hf_hub_id") or cfg.get("url") or name)


def _kept_classifier(model: nn.Module, num_classes: int) -> bool:
    """Whether the loaded weights included the classifier: timm keeps it when the class count is the
    pretrained config's (or, for a file, when :func:`covpool.keep_fitting_classifier` found it fitting)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("num_classes") == num_classes


# ---- covpool checkpoints as first weights ----------------------------------------------------------------------
def _covpool_checkpoint(path: Path) -> dict[str, Any] | None:
    """The contents of ``path`` when it is a covpool training checkpoint (verified), else None."""
    from .checkpoint import load_checkpoint

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip file torch can map (a legacy or a safetensors file): timm's loader reads it
        return None
    if not (isinstance(raw, Mapping) and "config" in raw and ("state_dict" in raw or "model" in raw)):
        return None
    del raw
    return load_checkpoint(path, map_location="cpu")


def _checkpoint_weights(ckpt: Mapping[str, Any], path: Path) -> tuple[Mapping[str, Any], str]:
    """The weights a run starts from, as timm's loader chooses them (the EMA's when the run kept one)."""
    ema = ckpt.get("state_dict_ema") is not None
    about = [f"epoch {ckpt['epoch']}"] if ckpt.get("epoch") is not None else []
    about += ["EMA weights"] if ema else []
    label = f"covpool checkpoint {path}" + (f" ({', '.join(about)})" if about else "")
    return ckpt["state_dict_ema" if ema else "state_dict"], label


def _plain_weights(path: Path) -> Mapping[str, Any]:
    """The weights of a file that is not a covpool checkpoint (a torchvision or timm state dict, or a training
    checkpoint that holds one), with the ``module.`` and ``_orig_mod.`` prefixes of wrappers dropped."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state: Mapping[str, Any] = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise ConfigError(f"model.pretrained={path}: holds a {type(state).__name__}, not a state dict")
    out = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _listed(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_fitting(model: nn.Module, weights: Mapping[str, Any], what: str, stored_config: Mapping | None = None,
                 current: ModelConfig | None = None) -> list[str]:
    """Load ``weights`` into ``model``, every key, except a classifier of another class count, which keeps its
    fresh initialisation; returns those keys.

    Raises:
        ConfigError: keys missing or unexpected, or a shape that differs outside the classifier; the message
            names them and, with ``stored_config`` (the checkpoint's config) and ``current``, the model keys of
            the two configs that differ.
    """
    own = model.state_dict()
    classifier = classifier_names(model)
    in_classifier = [k for k in own if any(k == n or k.startswith(n + ".") for n in classifier)]
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    fresh = [k for k in shapes if k in in_classifier]
    other = [k for k in shapes if k not in in_classifier]
    if missing or unexpected or other:
        problems = ([f"missing {_listed(missing)}"] if missing else []) + (
            [f"unexpected {_listed(unexpected)}"] if unexpected else []) + (
            [f"other shapes for {_listed([f'{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}' for k in other])}"]
            if other else [])
        differs = ""
        if stored_config is not None and current is not None:
            changes = [c for c in model_changes(stored_config, {"model": dataclasses.asdict(current)})
                       if c[0] != "model.num_classes"]
            if changes:
                differs = (f"; the checkpoint's model differs from this config's in {format_config_diff(changes)} "
                           "(checkpoint -> config)")
        raise ConfigError(f"{what}: the checkpoint's weights do not fit this model ({'; '.join(problems)})"
                          f"{differs}. Start from it with the model settings it was trained with")
    model.load_state_dict({k: v for k, v in weights.items() if k not in fresh}, strict=False)
    return fresh


def _modules_of(model: nn.Module, keys: list[str]) -> tuple[str, ...]:
    """The module names that hold ``keys``, in order, once each."""
    names: list[str] = []
    for key in keys:
        module = key.rpartition(".")[0]
        if module not in names:
            names.append(module)
    return tuple(names)


# ---- the head: classifier and second-order pooling ----------------------------------------------------------
def classifier_names(model: nn.Module) -> list[str]:
    """The module names of a model's classifier: timm's ``get_classifier()`` and its pretrained config's
    ``classifier`` entries (So-ViT has two), else torchvision's ``fc`` / ``classifier`` / ``head``."""
    modules = dict(model.named_modules())
    names: list[str] = []
    declared = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if declared:
        names += [declared] if isinstance(declared, str) else list(declared)
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        clf = get_classifier()
        names += [n for n, m in modules.items() if m is clf and n]
    else:
        names += [a for a in _CLASSIFIER_ATTRS if isinstance(getattr(model, a, None), nn.Module)][:1]
    out: list[str] = []
    for name in names:
        if name in modules and name not in out and not any(name.startswith(o + ".") for o in out):
            out = [o for o in out if not o.startswith(name + ".")] + [name]
    return out


def pooling_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The learned global pooling of a model, by module name: the module its pooling attribute holds
    (``global_pool`` in timm's models, covpool's and the :class:`covpool.models.SecondOrderNet` that
    :func:`covpool.swap_pooling` wraps around the others; ``avgpool`` in torchvision's) when it has parameters.
    That is a second-order head's pooling whatever built it (a head registered with :func:`covpool.register_head`
    included), while the average poolings of timm and torchvision, which have none, are left out."""
    out: dict[str, nn.Module] = {}
    for attr in _POOLING_ATTRS:
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module) and next(module.parameters(), None) is not None:
            out[attr] = module
    return out


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The new head of a fine-tuned model: its second-order pooling (:func:`pooling_modules`) and its
    classifier (:func:`classifier_names`; for So-ViT and SoT the whole :class:`covpool.SoViTHead`), by module
    name."""
    out = pooling_modules(model)
    for name in classifier_names(model):
        if not any(name == o or name.startswith(o + ".") for o in out):
            out[name] = model.get_submodule(name)
    return out


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of the new head (:func:`head_modules`): ``optim.head_lr_mult`` scales them."""
    ids = {id(p) for head in head_modules(model).values() for p in head.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def set_grad_checkpointing(model: nn.Module, cfg: ModelConfig) -> None:
    """``model.grad_checkpointing``: timm's ``set_grad_checkpointing(True)``; a model without it is a
    :class:`ConfigError`."""
    if not cfg.grad_checkpointing:
        return
    enable = getattr(model, "set_grad_checkpointing", None)
    if not callable(enable):
        raise ConfigError(f"model.grad_checkpointing=true: {cfg.name} ({type(model).__name__}) has no "
                          "set_grad_checkpointing (timm's models do); turn it off for this model")
    enable(True)


def param_groups(model: nn.Module, weight_decay: float, head_lr_mult: float,
                 layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Parameter groups with ``lr_scale``, which timm's schedulers multiply into the scheduled learning rate.

    Without ``layer_decay``: up to four groups, (backbone | head) x (decay | no decay); biases, norm weights
    and the model's ``no_weight_decay()`` names get no decay, as in timm, and the head's groups
    (:func:`head_parameter_names`) are scaled by ``head_lr_mult``. With ``layer_decay`` in (0, 1]: timm's
    layer-wise decay (:func:`timm.optim.param_groups_layer_decay`, layers from the model's ``group_matcher``)
    and, on top, ``head_lr_mult`` for the head's parameters, so both recipes combine rather than one
    overriding the other. Each group has ``name`` (``backbone`` or ``head``, with ``no decay``) for the log.
    """
    head = head_parameter_names(model)
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    if layer_decay is not None:
        from timm.optim import param_groups_layer_decay

        names = {id(p): name for name, p in model.named_parameters()}
        out = []
        for group in param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip,
                                              layer_decay=float(layer_decay)):
            for is_head in (False, True):
                params = [p for p in group["params"] if (names[id(p)] in head) == is_head]
                if params:
                    out.append({**group, "params": params, "name": _group_name(is_head, group["weight_decay"] > 0),
                                "lr_scale": group["lr_scale"] * (head_lr_mult if is_head else 1.0)})
        return out
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in skip and not name.endswith(".bias")
        groups.setdefault((name in head, decay), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "name": _group_name(is_head, decay),
             "lr_scale": head_lr_mult if is_head else 1.0}
            for (is_head, decay), params in sorted(groups.items())]


def _group_name(is_head: bool, decay: bool) -> str:
    return ("head" if is_head else "backbone") + ("" if decay else ", no decay")
