"""How a config key is declared, read and checked: the machinery under :mod:`covpool.train.config`.

A key is a dataclass field made by :func:`key`, which records on the field everything said about it: its help,
the interval a number must lie in, the values it takes (:class:`Choices`, a fixed list or a registry's names),
the backend specs a free-form section holds, and any other rule. Reading a file or an override
(:func:`coerce`, :func:`check_field`), ``covpool train --help``, the config reference of the documentation and
:func:`covpool.train.check_config` all read the field, so a rule is written once, where the key is.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import covpool

__all__ = ["ConfigError", "did_you_mean", "Choices", "key", "range_text", "choices_text", "check_field", "coerce",
           "is_section", "type_hints", "unknown_key"]


class ConfigError(ValueError):
    """A config file or override is unreadable, names an unknown key or holds a value of the wrong type."""


def did_you_mean(value: Any, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` with the name of ``valid`` closest to ``value``, or ``""`` when none is close.

    >>> did_you_mean("cosinee", ["cosine", "step"])
    " (did you mean 'cosine'?)"
    """
    close = difflib.get_close_matches(str(value), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class Choices:
    """The values a config key takes: a fixed list, or the names a registry holds when the config is checked
    (so a model, head or backend registered by your own code counts).

    Attributes:
        what: what a valid value is, for the error (``model.name='resnet5O' is not a timm model``).
        names: the valid names (for the suggestion, the error and ``--help``).
        accepts: whether a value is valid, where more than the listed names are (other spellings, hub names);
            None: being listed.
        where: where the names are listed, said instead of listing them when they are too many.
    """

    what: str
    names: Callable[[], Iterable[str]]
    accepts: Callable[[str], bool] | None = None
    where: str = ""

    @classmethod
    def of(cls, what: str, *names: str) -> Choices:
        """A fixed list of ``names``, which ``what`` describes in an error (``"a clipping mode of timm's
        dispatch_clip_grad"``)."""
        return cls(what, lambda: names)

    def text(self) -> str:
        """The values in words: ``a | b | c``, or :attr:`where` for a list too long to print."""
        return self.where or " | ".join(map(str, self.names()))

    def check(self, key: str, value: str) -> None:
        """Raise :class:`ConfigError` when ``value`` is not one of the values, naming the config ``key``
        (``"model.head"``), the closest value and, for a fixed list, the valid ones."""
        names = list(self.names())
        if self.accepts(value) if self.accepts is not None else value in names:
            return
        listed = "" if self.where else f"; valid: {', '.join(names)}"
        where = f"; {self.where}" if self.where else ""
        raise ConfigError(f"{key}={value!r} is not {self.what}{did_you_mean(value, names)}{listed}{where}")


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


def key(default: Any, help_: str, interval: str | None = None, *, choices: Choices | None = None,
        backends: tuple[str, ...] = (), length: int | None = None, ascending: bool = False,
        check: Callable[[str, Any, str], None] | None = None) -> Any:
    """A config key: its default and help, and what a value must be.

    Args:
        interval: for a number (or each number of a list), the interval it must lie in, e.g. ``"[0, 1)"``.
        choices: the values a string takes (:class:`Choices`).
        backends: for a free-form section, its entries that are backend specs (a name or ``{name: ...}``).
        length, ascending: further rules for a list of numbers.
        check: ``check(key, value, where)`` raises :class:`ConfigError` for any other rule of the key.
    """
    meta: dict[str, Any] = {"help": help_}
    for name, value in (("check", check), ("choices", choices), ("length", length)):
        if value is not None:
            meta[name] = value
    if interval is not None:
        meta["interval"] = _Interval.parse(interval)
    if backends:
        meta["backends"] = backends
    if ascending:
        meta["ascending"] = True
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def range_text(f: dataclasses.Field) -> str:
    """The interval of key ``f`` in words, for ``--help`` and errors (``''`` when it has none)."""
    meta = f.metadata
    if "interval" not in meta:
        return ""
    words = str(meta["interval"])
    if "length" in meta or "ascending" in meta:
        shape = " ".join(x for x in (f"{meta['length']}" if "length" in meta else "",
                                     "ascending" if meta.get("ascending") else "") if x)
        words = f"{shape} numbers, each {words}"
    return words + (" or null" if f.default is None else "")


def choices_text(f: dataclasses.Field) -> str:
    """The values key ``f`` takes in words (its :class:`Choices`, or the backends of a free-form section's
    entries), for ``--help`` and the config reference (``''`` when it declares none)."""
    if "choices" in f.metadata:
        return f.metadata["choices"].text()
    if "backends" in f.metadata:
        entries = " and ".join(f.metadata["backends"])
        return f"{entries}: {' | '.join(covpool.list_backends())}, or {{name: <backend>, <option>: <value>}}"
    return ""


def check_field(f: dataclasses.Field, value: Any, key: str, where: str = "") -> None:
    """Raise :class:`ConfigError` when ``value`` lies outside the interval key ``f`` declares, or breaks its
    other rule (its :class:`Choices` are checked with the registries, by :func:`covpool.train.check_config`)."""
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
        raise ConfigError(f"config key {key!r} must be {range_text(f)}, got {value!r}{where}")


def is_section(hint: Any) -> bool:
    """Whether a key's type is a section of keys (a dataclass) rather than a value."""
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The types of a section's keys (its annotations, evaluated once)."""
    return typing.get_type_hints(cls)


def unknown_key(key: str, cls: type, prefix: str, where: str) -> ConfigError:
    """The error for a key that section ``cls`` (at ``prefix``) does not have: the closest key and all of them."""
    valid = [f"{prefix}{f.name}" for f in dataclasses.fields(cls)]
    return ConfigError(f"unknown config key {prefix + key!r}{where}{did_you_mean(prefix + key, valid)}; valid keys: "
                       f"{', '.join(valid)}")


def coerce(value: Any, hint: Any, key: str, where: str = "") -> Any:
    """Check ``value`` against a key's type; ints become floats and numeric strings (PyYAML reads
    ``1e-4`` as a string) become numbers where the key is a float."""
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


class _Section:
    """A section of keys; checks every key's interval and rule when built directly in Python, as files and
    overrides are."""

    if typing.TYPE_CHECKING:  # every section is a dataclass (config.py decorates each), so fields() takes it
        __dataclass_fields__: typing.ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_field(f, getattr(self, f.name), f.name)
