"""Config checks that the config schema cannot make, made before anything is built.

:func:`check_config` runs at the start of :func:`covpool.train.train` and :func:`covpool.train.evaluate`
(so ``covpool train`` / ``eval`` report a mistake as one ``error:`` line, exit status 2, before a model or a
data set exists). A config file's keys, types and ranges are checked when it is read
(:mod:`covpool.train.config`); what needs torch or the machine is checked here.
"""
from __future__ import annotations

import torch

from .config import ConfigError, TrainConfig

__all__ = ["check_config"]

_AMP = ("none", "bf16", "fp16")
_CLIP_MODES = ("norm", "value", "agc")  # timm's dispatch_clip_grad


def check_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for an ``amp`` or ``clip_mode`` that does not exist, ``amp=fp16`` without
    CUDA, or a ``compile`` backend torch does not have."""
    if cfg.amp not in _AMP:
        raise ConfigError(f"amp must be one of {', '.join(_AMP)}, got {cfg.amp!r}")
    if cfg.amp == "fp16" and not (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())):
        raise ConfigError("amp=fp16 needs CUDA (float16 autocast on the CPU is slow and unscaled); use amp=bf16")
    if cfg.clip_mode not in _CLIP_MODES:
        raise ConfigError(f"clip_mode must be one of {', '.join(_CLIP_MODES)}, got {cfg.clip_mode!r}")
    if isinstance(cfg.compile, str):
        valid = torch.compiler.list_backends(exclude_tags=())
        if cfg.compile not in valid:
            raise ConfigError(f"compile={cfg.compile!r} is not a torch.compile backend; use true (inductor), false, "
                              f"or one of {', '.join(valid)}")
