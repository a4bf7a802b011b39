"""``model.backend_schedule``: the square-root backend of the covariance pooling in each epoch.

The hybrid protocol of Song, Sebe and Wang, "Why Approximate Matrix Square Root Outperforms Accurate SVD in
Global Covariance Pooling?", ICCV 2021: Newton–Schulz first (smooth gradients while the features are still
changing fast), an SVD-based layer later (exact large eigenvalues). A schedule is a list of
``[start_epoch, backend]`` pairs: ``[[0, ns], [10, svd_pade]]`` trains epochs 0–9 (the first ten, printed
1–10) with ``ns`` and every epoch from 10 on with ``svd_pade``; a backend is a name or a dict with ``name``
and options, as everywhere in covpool. It applies to the covariance-pooling layers (:class:`covpool.CovPool`,
:class:`covpool.SoViTHead`) through :func:`covpool.set_backend`; ZCA whitening layers keep
``model.zca_options.backend``.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from ..linalg import BackendSpec
from .config import ConfigError, TrainConfig, did_you_mean

if TYPE_CHECKING:
    from covpool import CovPool

__all__ = ["BackendSchedule", "parse_backend_schedule", "check_backend_spec", "backend_for_epoch", "describe_backend",
           "checkpoint_epoch"]

_log = logging.getLogger(__name__)
_KEY = "model.backend_schedule"
_EXAMPLE = "e.g. [[0, ns], [10, svd_pade]] or [[0, ns], [10, {name: svd_pade, degree: 4}]]"


def _pooling_types() -> tuple[type[CovPool], ...]:
    import covpool

    return (covpool.CovPool,)  # also the square root of a So-ViT "mpa" head and of swap_pooling's heads


def check_backend_spec(spec: Any, where: str) -> None:
    """The check every covpool layer applies to its ``backend=`` (:func:`covpool.linalg.resolve_backend`),
    as a :class:`ConfigError` naming the config key ``where``, with the closest registered name for an
    unknown one."""
    import covpool.linalg

    try:
        covpool.linalg.resolve_backend(spec)
    except (TypeError, ValueError) as err:
        name = spec.get("name") if isinstance(spec, Mapping) else spec
        names = covpool.linalg.list_backends()
        hint = did_you_mean(name, names) if isinstance(name, str) and name not in names else ""
        raise ConfigError(f"{where}: {err}{hint}") from None


def parse_backend_schedule(raw: Any, epochs: int | None = None) -> tuple[tuple[int, BackendSpec], ...]:
    """Check a ``model.backend_schedule`` value and return it as ``((start_epoch, spec), ...)``.

    ``None`` or an empty list is no schedule. Start epochs count completed epochs (0 is the first epoch);
    they must begin at 0 and increase. A start at or past ``epochs`` never takes effect and warns.

    Raises:
        ConfigError: the value is not a list of ``[start_epoch, backend]`` pairs, the epochs do not start
            at 0 or increase, or a backend name or option is invalid (the message names the entry).
    """
    if raw is None or (isinstance(raw, (list, tuple)) and not raw):
        return ()
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"{_KEY} must be a list of [start_epoch, backend] pairs, {_EXAMPLE}; got {raw!r}")
    entries: list[tuple[int, BackendSpec]] = []
    for i, item in enumerate(raw):
        where = f"{_KEY}[{i}]"
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ConfigError(f"{where} must be a [start_epoch, backend] pair, {_EXAMPLE}; got {item!r}")
        start, spec = item
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ConfigError(f"{where}: the start epoch must be an integer >= 0, got {start!r}")
        if not entries and start != 0:
            raise ConfigError(f"{_KEY} must start at epoch 0 (say which backend the first epochs use), "
                              f"got {start} first; {_EXAMPLE}")
        if entries and start <= entries[-1][0]:
            raise ConfigError(f"{_KEY}: start epochs must increase, got {start} after {entries[-1][0]}")
        check_backend_spec(spec, where)
        entries.append((start, spec))
    late = [start for start, _ in entries if epochs is not None and start >= epochs]
    if late:
        warnings.warn(f"{_KEY}: the switch(es) at epoch {', '.join(map(str, late))} never happen in a run of "
                      f"{epochs} epochs (start epochs count completed epochs, from 0)", stacklevel=2)
    return tuple(entries)


def backend_for_epoch(schedule: Iterable[tuple[int, BackendSpec]], epoch: int) -> BackendSpec | None:
    """The spec the schedule gives for (0-based) ``epoch``, or None for an empty schedule."""
    spec = None
    for start, entry in schedule:
        if start > epoch:
            break
        spec = entry
    return spec


def describe_backend(spec: BackendSpec) -> str:
    """A short label: ``"ns"``, ``"svd_pade(degree=4)"``."""
    if isinstance(spec, str):
        return spec
    options = {k: v for k, v in spec.items() if k != "name"}
    args = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in options.items())
    return f"{spec['name']}({args})" if args else str(spec["name"])


def checkpoint_epoch(ckpt: Mapping[str, Any]) -> int:
    """The 0-based epoch whose backend a checkpoint's weights were last trained with: the epoch in
    progress when it was saved mid-epoch, else the last completed one."""
    epoch, step = int(ckpt.get("epoch", 0)), int(ckpt.get("step_in_epoch", 0))
    return epoch if step > 0 else max(epoch - 1, 0)


class BackendSchedule:
    """A parsed ``model.backend_schedule`` bound to a run: applies the epoch's backend and says so.

    Args:
        raw: the config value (None: no schedule; :meth:`apply` then does nothing).
        epochs: the run's epoch count, for the ``epoch k/N`` messages and the never-reached warning.
    """

    def __init__(self, raw: Any, epochs: int | None = None) -> None:
        self.entries = parse_backend_schedule(raw, epochs)
        self.epochs = epochs
        self._current: BackendSpec | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> BackendSchedule:
        return cls(cfg.model.backend_schedule, cfg.epochs)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def spec_for(self, epoch: int) -> BackendSpec | None:
        return backend_for_epoch(self.entries, epoch)

    def apply(self, epoch: int, models: Iterable[nn.Module | None], announce: bool = True) -> BackendSpec | None:
        """Give the pooling layers of every model (None entries are skipped: no EMA) the backend of
        ``epoch`` when it differs from the last one applied (so a compiled model recompiles only at a
        switch); print a line on the first call and at each switch when ``announce``. Returns the spec."""
        spec = self.spec_for(epoch)
        if spec is None or spec == self._current:
            return spec
        import covpool

        for model in models:
            if model is None:
                continue
            try:
                covpool.set_backend(model, spec, layers=_pooling_types())
            except ValueError as err:
                raise ConfigError(f"{_KEY} needs covariance pooling in the model (model.swap_pooling=true, a "
                                  f"*_isqrt or an so_vit_* model with head=mpa): {err}") from None
        if announce:
            total = f"/{self.epochs}" if self.epochs is not None else ""
            change = describe_backend(spec) if self._current is None else \
                f"{describe_backend(self._current)} -> {describe_backend(spec)}"
            _log.info(f"epoch {epoch + 1}{total}: square-root backend {change} ({_KEY})")
        self._current = spec
        return spec

    def describe(self, model: nn.Module) -> str:
        """The backend(s) of the model's pooling layers as one label (``""`` when it has none)."""
        types = _pooling_types()
        # a CovPool keeps each option as an attribute of its name, set from its options (not declared on the class)
        specs = [getattr(m, "backend", None) for m in model.modules() if isinstance(m, types)]
        labels = dict.fromkeys(describe_backend(spec) for spec in specs if spec is not None)
        return " + ".join(labels)
