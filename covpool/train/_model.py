"""Model construction for ``covpool train``: timm model + optional covariance pooling, CIFAR stem, ZCA."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import covpool

from .config import ConfigError, ModelConfig

__all__ = ["build_model", "set_grad_checkpointing", "head_parameter_names", "param_groups"]


def build_model(cfg: ModelConfig, num_classes: int, for_checkpoint: bool = False) -> nn.Module:
    """Build ``cfg.name`` with timm (covpool's models registered) and apply the config's surgery.

    ``cfg.pretrained`` may be ``True`` (timm's hub weights, needs the network), ``False``, or a path to a
    local checkpoint (loaded by timm; its classifier is kept when it has ``num_classes`` rows, dropped
    otherwise). ``for_checkpoint``: the model will receive a checkpoint's weights, which hold every weight, so
    ``cfg.pretrained`` is not read (no download, no file needed). Surgery happens after the weights load, in
    this order: CIFAR stem, ZCA batch norm, covariance pooling.

    ``cfg.name`` is not checked here: :func:`covpool.train.validate.check_config` checks it, with the other
    registry names, before anything is built (timm raises for an unknown name).

    Raises:
        ConfigError: ``model.kwargs``, ``model.covpool``, ``model.zca_options`` or ``model.cifar_stem`` are
            refused by the model's or the layer's own checks (the message names the key).
    """
    import timm

    if for_checkpoint and cfg.pretrained is not False:
        cfg = replace(cfg, pretrained=False)
    kwargs = dict(cfg.kwargs)
    pretrained = cfg.pretrained
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained={pretrained!r} is not a file; give a local checkpoint "
                                    "path, true (download from the hub) or false (random init)")
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": str(path)}
        pretrained = True
    if isinstance(cfg.pretrained, str):
        kwargs = covpool.keep_fitting_classifier(cfg.name, {**kwargs, "num_classes": num_classes})
        kwargs.pop("num_classes")
    try:
        model = timm.create_model(cfg.name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError, TypeError, ValueError) as err:
        if isinstance(err, TypeError) or (isinstance(err, ValueError) and not pretrained):
            # the model's own checks of its keyword arguments
            raise ConfigError(f"model.kwargs={dict(cfg.kwargs)!r} for model.name={cfg.name!r}: {err}") from None
        if not pretrained or isinstance(cfg.pretrained, str):
            raise
        raise _fetch_failed(cfg.name, err) from err
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


def _fetch_failed(name: str, err: Exception) -> RuntimeError:
    return RuntimeError(f"could not fetch pretrained weights for {name!r} ({type(err).__name__}: {err}). "
                        "Without network access, download them elsewhere and pass model.pretrained=/path/to/"
                        "file.safetensors (or .pth), or train from scratch with model.pretrained=false")


def set_grad_checkpointing(model: nn.Module, cfg: ModelConfig) -> None:
    """``model.grad_checkpointing``: timm's ``set_grad_checkpointing(True)``; a model without it is a
    :class:`ConfigError`."""
    if not cfg.grad_checkpointing:
        return
    if not callable(getattr(model, "set_grad_checkpointing", None)):
        raise ConfigError(f"model.grad_checkpointing=true: {cfg.name} ({type(model).__name__}) has no "
                          "set_grad_checkpointing (timm's models do); turn it off for this model")
    model.set_grad_checkpointing(True)


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of the new head: the classifier (timm's ``get_classifier()``, or ``fc``)
    plus every covariance-pooling module (:class:`covpool.CovPool`, :class:`covpool.SoViTHead`), whose
    reduction convolution is as new as the classifier when a pretrained backbone is fine-tuned."""

    heads: list[nn.Module] = []
    if hasattr(model, "get_classifier"):
        heads.append(model.get_classifier())
    elif isinstance(getattr(model, "fc", None), nn.Module):
        heads.append(model.fc)
    heads += [m for m in model.modules() if isinstance(m, (covpool.CovPool, covpool.SoViTHead))]
    ids = {id(p) for head in heads for p in head.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def param_groups(model: nn.Module, weight_decay: float, head_lr_mult: float,
                 layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Parameter groups with ``lr_scale``, which timm's schedulers multiply into the scheduled learning rate.

    Without ``layer_decay``: up to four groups, (backbone | head) x (decay | no decay); biases, norm weights
    and the model's ``no_weight_decay()`` names get no decay, as in timm, and the head's groups are scaled by
    ``head_lr_mult``. With ``layer_decay`` in (0, 1]: timm's layer-wise decay
    (:func:`timm.optim.param_groups_layer_decay`, layers from the model's ``group_matcher``) and, on top,
    ``head_lr_mult`` for the head's parameters, so both recipes combine rather than one overriding the other.
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
                    out.append({**group, "params": params,
                                "lr_scale": group["lr_scale"] * (head_lr_mult if is_head else 1.0)})
        return out
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in skip and not name.endswith(".bias")
        groups.setdefault((name in head, decay), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr_scale": head_lr_mult if is_head else 1.0}
            for (is_head, decay), params in sorted(groups.items())]
