"""Helpers shared by covpool's models (internal): argument checks and changing a ResNet's last stride
in place (used by the iSQRT-COV ResNets and :func:`covpool.swap_pooling`)."""
from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..linalg._checks import check_int, is_int

__all__ = ["check_num_classes", "check_vector_output", "stage_stride",
           "set_stage_stride", "set_last_stride", "keep_fitting_classifier", "unwrap_checkpoint", "replace_prefix",
           "with_model_head", "require_weights"]


def check_num_classes(num_classes: Any) -> None:
    """ValueError unless ``num_classes`` is an integer >= 0 (0: no classifier)."""
    check_int("num_classes", num_classes, 0)


def _pair(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _strided_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    # The block itself is skipped: torchvision blocks keep an unused ``stride`` int for reference.
    return [
        (name, m)
        for name, m in block.named_modules()
        if name and getattr(m, "stride", None) is not None and any(s != 1 for s in _pair(m.stride))
    ]


def _first_block(stage: nn.Module) -> nn.Module:
    if not isinstance(stage, nn.Sequential) or len(stage) == 0:
        raise ValueError(f"expected a ResNet stage as a non-empty nn.Sequential of blocks, got {type(stage).__name__}")
    return stage[0]


def stage_stride(stage: nn.Module) -> int:
    """Spatial stride of a ResNet stage: 2 when its first block downsamples, else 1 (also for dilated stages)."""
    return 2 if _strided_modules(_first_block(stage)) else 1


def set_stage_stride(stage: nn.Module, stride: int) -> int:
    """Set a ResNet stage's stride to 1 or 2 in place and return the stride it had.

    Only the downsampling that ResNets use can be removed: strided ``nn.Conv2d`` (the 3×3 or first conv of
    the first block and its 1×1 projection) become stride 1 with the same padding, which keeps every weight
    shape, and a ResNet-D ``nn.AvgPool2d`` shortcut pool becomes ``nn.Identity`` as timm builds it at stride 1.
    Restoring a stride of 2 is refused because a stride-1 stage does not record where it was removed.

    Raises:
        ValueError: ``stride`` is not 1 or 2, the stage is not an ``nn.Sequential`` of blocks, it would need
            stride 2 restored, or it downsamples with a module other than a convolution or average pool
            (e.g. anti-aliased blur pooling).
    """
    if not is_int(stride) or stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    block = _first_block(stage)
    strided = _strided_modules(block)
    current = 2 if strided else 1
    if stride == current:
        return current
    if stride == 2:
        raise ValueError(
            "cannot restore stride 2 in a stage that has stride 1 (dilated or already modified); "
            "build the model with its default stride instead"
        )
    unsupported = [f"{name} ({type(m).__name__})" for name, m in strided
                   if not isinstance(m, (nn.Conv2d, nn.AvgPool2d))]
    if unsupported:
        raise ValueError(
            "cannot remove the downsampling of this stage: only nn.Conv2d and nn.AvgPool2d strides can be "
            f"changed, found {', '.join(unsupported)}"
        )
    for name, m in strided:
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name), child, nn.Identity())
    if isinstance(getattr(block, "stride", None), int):
        # torch types a module's attributes as tensors or modules; this one is a plain int, which it allows.
        block.stride = 1  # type: ignore[assignment]
    return current


def set_last_stride(model: nn.Module, stride: int) -> None:
    """Set the stride of a timm or torchvision ResNet's last stage (``layer4``) with :func:`set_stage_stride`,
    keeping a timm model's ``feature_info`` reduction (what timm's feature wrappers read) truthful."""
    before = set_stage_stride(model.get_submodule("layer4"), stride)
    info = getattr(model, "feature_info", None)
    if before != stride and isinstance(info, list) and info:
        info[-1] = dict(info[-1], reduction=info[-1]["reduction"] * stride // before)


# The entry of a training checkpoint that holds the weights, in timm's order (EMA first, as with use_ema=True).
_CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_WRAPPER_PREFIX = re.compile(r"^(?:module\.|_orig_mod\.)+")


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The weights of a raw state dict or a training checkpoint (timm's ``train.py``, the authors' ``main.py``:
    its ``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model`` entry), with the ``module.``
    (DataParallel/DDP) and ``_orig_mod.`` (``torch.compile``) prefixes dropped, as timm's loader does."""
    for key in _CHECKPOINT_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    return {_WRAPPER_PREFIX.sub("", k): v for k, v in checkpoint.items()}


def replace_prefix(key: str, pairs: tuple[tuple[str, str], ...]) -> str | None:
    """``key`` with the first ``(old, new)`` prefix of ``pairs`` it starts with replaced (a checkpoint's names
    in another layout mapped to covpool's), or None when it starts with none of them."""
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def with_model_head(state_dict: Mapping[str, Any], model: nn.Module, prefixes: tuple[str, ...]) -> dict[str, Any]:
    """``state_dict`` with its head (the keys under ``prefixes``) replaced by ``model``'s freshly initialised
    one: a plain backbone's checkpoint (timm's or torchvision's, whose classifier reads other features) then
    loads strictly."""
    out = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    out.update((k, v) for k, v in model.state_dict().items() if k.startswith(prefixes))
    return out


def require_weights(variant: str, kwargs: Mapping[str, Any], backbone_tag: str | None = ".tv_in1k") -> None:
    """Raise a clear error when ``pretrained=True`` resolves to a tag without weights timm can fetch (the
    authors' releases on Google Drive / Baidu Cloud, which serve no direct downloads): the tag's notes say
    where the file is, and the message how to load a downloaded copy, or ``backbone_tag`` (None: the model
    has no backbone-only tag to suggest)."""
    from timm.models import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
    if not (cfg.url or cfg.file or cfg.hf_hub_id or cfg.state_dict):
        notes = " ".join(cfg.notes or ())
        raise ValueError(
            f"{variant}.{cfg.tag} has no weights timm can download. {notes} Load a downloaded copy with "
            f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file=path))"
            + (f", or use a backbone-only tag such as '{backbone_tag}'." if backbone_tag else ".")
        )


def _file_classifier_rows(path: str, names: tuple[str, ...],
                          rename: Callable[[str], str] | None = None) -> list[int | None]:
    """Rows of ``<name>.weight`` for each classifier name in a local weights file (``None`` where absent),
    reading tensors lazily (memory-mapped or safetensors slices), under timm's checkpoint keys; ``rename``
    maps the file's keys to the model's (an authors' layout), ``module.`` prefixes are dropped."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = unwrap_checkpoint({k: k for k in f.keys()})  # safetensors: a flat state dict
            keys = {rename(k): v for k, v in keys.items()} if rename is not None else keys
            return [f.get_slice(keys[f"{n}.weight"]).get_shape()[0] if f"{n}.weight" in keys else None
                    for n in names]
    # Training checkpoints (timm's train.py, the authors' main.py) also pickle the run's argparse Namespace.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, ValueError, OSError):  # legacy (non-zip) files cannot be memory-mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    weights = unwrap_checkpoint(ckpt) if isinstance(ckpt, Mapping) else {}
    weights = {rename(k): v for k, v in weights.items()} if rename is not None else weights
    rows = []
    for n in names:
        w = weights.get(f"{n}.weight")
        rows.append(int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() > 0 else None)
    return rows


def keep_fitting_classifier(model_name: str, kwargs: dict[str, Any],
                            rename: Callable[[str], str] | None = None) -> dict[str, Any]:
    """``kwargs`` for ``timm.create_model`` such that a local file given by ``pretrained_cfg_overlay=dict(file=...)``
    keeps its classifier when it has ``num_classes`` rows (timm drops it whenever ``num_classes`` differs from
    the pretrained config's, 1000, without a word).

    Only the shapes of the classifier's weights are read from the file (memory-mapped, or safetensors slices).
    Nothing changes without a file, without ``num_classes``, when the overlay already sets ``num_classes``, or
    when a classifier layer is missing from the file or has another row count.

    Args:
        model_name: the model's name in timm's registry, with or without a pretrained tag (``"so_vit_7"``,
            ``"resnet50_isqrt.mpncov_in1k"``); its pretrained config names the classifier layers (an overlay's
            ``classifier`` entry overrides them).
        kwargs: the keyword arguments meant for ``timm.create_model``; not modified.
        rename: maps a file's keys to the model's when the file is in another layout (the authors' releases:
            covpool's builders pass their key mapping); None: the file has the model's names.

    Returns:
        ``kwargs`` itself, or a copy whose ``pretrained_cfg_overlay`` also sets ``num_classes``, which makes
        timm keep the file's classifier.
    """
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    num_classes = kwargs.get("num_classes")
    if not overlay.get("file") or num_classes is None or "num_classes" in overlay:
        return kwargs
    import timm

    names = overlay.get("classifier") or timm.models.get_pretrained_cfg_value(model_name, "classifier")
    if not names:
        return kwargs
    names = (names,) if isinstance(names, str) else tuple(names)
    if all(rows == num_classes for rows in _file_classifier_rows(overlay["file"], names, rename)):
        overlay["num_classes"] = num_classes
        return {**kwargs, "pretrained_cfg_overlay": overlay}
    return kwargs


def check_vector_output(pool: nn.Module) -> None:
    """A classifier needs the pooled features as a vector: refuse a pooling that returns matrices."""
    if getattr(pool, "vectorize", "triu") == "matrix":
        raise ValueError("vectorize='matrix' returns (B, d, d) matrices: a classifier needs the features as a "
                         "vector, use vectorize='triu' (default) or 'full'")
