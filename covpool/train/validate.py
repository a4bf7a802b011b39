"""Deprecated: this module is :mod:`covpool.train.config_checks` now (timm's ``validate`` evaluates a model, and
so does covpool's :mod:`covpool.train.evaluation`; this one checks configs). Its names still import from here,
with a :class:`FutureWarning`, for one release."""
from __future__ import annotations

from ..outputs import moved_names

__all__: list[str] = []

__getattr__ = moved_names(__name__, {
    "check_config": "covpool.train.config_checks:check_config",
    "check_same_model": "covpool.train.config_checks:check_same_model",
    "SCHEDULERS": "covpool.train.config:SCHEDULERS",
})
