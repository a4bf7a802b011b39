"""The options of the pooling layers, declared once (internal).

:class:`CovPoolOptions` declares every option of :class:`covpool.CovPool`: its default, its check and which
normalisation reads it (the field's metadata, :func:`option`). ``CovPool``'s signature, its keyword check and
"did you mean", :attr:`covpool.CovPool.options`, the defaults an old pickle lacks, the refusal of options the
chosen head never reads (:func:`check_used`) and ``extra_repr`` all come from it: adding an option is one field
(and one line among ``CovPool``'s attribute annotations, where the type checker reads the attribute's type).
The layout rule of every pooling layer (:func:`check_layout`, :func:`as_maps`) lives here too.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from einops import rearrange

from covpool.linalg import BackendSpec, resolve_backend
from covpool.linalg._checks import check_int, check_keywords, check_number
from covpool.linalg._registry import bool_option, check_gram

__all__ = ["CovPoolOptions", "option", "check_used", "check_option", "options_signature", "LAYOUTS", "check_layout",
           "as_maps", "VECTORIZE", "NORMALIZATIONS", "vectorize_mode", "normalization_mode"]


# ------------------------------------------------------------------------------------------- layouts
LAYOUTS = ("auto", "maps", "tokens")


def check_layout(layout: Any, allowed: tuple[str, ...] = LAYOUTS) -> str:
    """The ``layout`` option of the pooling layers: one of ``allowed``, else a ValueError listing them."""
    if layout not in allowed:
        raise ValueError(f"layout must be one of {', '.join(map(repr, allowed))}, got {layout!r}")
    return layout


def as_maps(x: torch.Tensor, channels: int, name: str, layout: str = "auto") -> torch.Tensor:
    """Feature maps ``(B, C, H, W)`` as they are, tokens ``(B, N, C)`` as ``(B, C, N, 1)`` maps (what the
    pooling layers accept). ``layout`` ``"auto"`` tells them apart by ``ndim``, and refuses a 3-D ``(B, C, C)``
    input, which could be tokens or channels-first features; ``"maps"`` / ``"tokens"`` accept only that layout.
    Anything else, and input without a position, is an error naming the layer ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a tensor, got {type(x).__name__}")
    maps = x.dim() == 4 and x.shape[1] == channels and layout in ("auto", "maps")
    tokens = x.dim() == 3 and x.shape[2] == channels and layout in ("auto", "tokens")
    if tokens and layout == "auto" and x.shape[1] == channels:
        raise ValueError(f"{name}: input of shape {tuple(x.shape)} is ambiguous: tokens (B, N, {channels}) or "
                         f"channels-first features (B, {channels}, N)? Build the layer with layout='tokens' "
                         f"for tokens, or pass channels-first features as maps x.unsqueeze(-1)")
    if not (maps or tokens):
        expected = {"auto": f"feature maps (B, {channels}, H, W) or tokens (B, N, {channels})",
                    "maps": f"feature maps (B, {channels}, H, W) (layout='maps')",
                    "tokens": f"tokens (B, N, {channels}) (layout='tokens')"}[layout]
        raise ValueError(f"{name} expects {expected}, got shape {tuple(x.shape)}")
    if x.shape[2:].numel() == 0 if maps else x.shape[1] == 0:
        raise ValueError(f"{name} needs at least one position to pool, got shape {tuple(x.shape)} (an empty "
                         f"{'feature map' if maps else 'token sequence'})")
    return x if maps else rearrange(x, "b n c -> b c n 1")


# --------------------------------------------------------------------------------- one option's rules
NORMALIZATIONS = ("sqrt", "power", "none")
VECTORIZE = ("triu", "full", "matrix")
_SKETCHES = ("tensor", "maclaurin")
_CHANNEL_DROPS = ("adaptive",)


def vectorize_mode(vectorize: Any, name: str = "vectorize") -> str:
    """``vectorize`` as one of :data:`VECTORIZE`: True is ``"triu"`` and False ``"matrix"`` (covpool ≤ 0.1)."""
    mode = {True: "triu", False: "matrix"}[vectorize] if isinstance(vectorize, bool) else vectorize
    if mode not in VECTORIZE:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, VECTORIZE))} (or True/False), got {vectorize!r}")
    return mode


def normalization_mode(normalization: Any, name: str = "normalization") -> str:
    """``normalization`` as one of :data:`NORMALIZATIONS` (None is ``"none"``)."""
    mode = "none" if normalization is None else normalization
    if mode not in NORMALIZATIONS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, NORMALIZATIONS))} (None is 'none'), "
                         f"got {normalization!r}")
    return mode


def _backend(name: str, value: Any) -> BackendSpec:
    resolve_backend(value)  # a known name and valid options; the spec is kept as given
    return value


def _choice(*choices: str) -> Callable[[str, Any], str | None]:
    what = f"one of {', '.join(map(repr, choices))}" if len(choices) > 1 else repr(choices[0])

    def check(name: str, value: Any) -> str | None:
        if value is not None and value not in choices:
            raise ValueError(f"{name} must be {what} or None, got {value!r}")
        return value

    return check


def option(default: Any, check: Callable[[str, Any], Any], *, positional: bool = False,
           read_when: Callable[[Any], bool] | None = None, needs: str = "", shown: str = "changed") -> Any:
    """One option of :class:`CovPoolOptions`, a dataclass field with its rules as metadata.

    Args:
        default: the value when not given.
        check: ``check(name, value)`` returns the value normalised, or raises naming ``name``.
        positional: may also be given by position (after the channel count), in field order.
        read_when: ``read_when(values)`` (a dict of every option's value) says whether the head that the other
            options choose reads it; None: always. A value other than the default where it is not read is
            refused (:func:`check_used`).
        needs: what it needs to be read, for that refusal's message.
        shown: ``"always"`` or ``"changed"`` (from the default): when ``extra_repr`` shows it, if it is read.
    """
    return dataclasses.field(default=default, metadata={
        "check": check, "positional": positional, "read_when": read_when, "needs": needs, "shown": shown})


def _sqrt(o: Mapping[str, Any]) -> bool:
    return o["normalization"] == "sqrt" and o["sketch"] is None


@dataclasses.dataclass(frozen=True)
class CovPoolOptions:
    """The options of :class:`covpool.CovPool`, each with its default, check and reader (see its docstring for
    what they do). Built from keyword arguments, it checks each option, then the rules between them; a subclass
    that adds a field adds an option to a subclass of ``CovPool`` that names it as its ``options_class``."""

    reduced_dim: int | None = option(256, lambda k, v: check_int(k, v, allow_none=True), positional=True,
                                     shown="always")
    backend: BackendSpec = option("ns", _backend, positional=True, read_when=_sqrt,
                                  needs="normalization='sqrt' (and no sketch)", shown="always")
    vectorize: bool | str = option("triu", lambda k, v: vectorize_mode(v, k), positional=True,
                                   read_when=lambda o: o["sketch"] is None,
                                   needs="no sketch (a sketch is a vector already)", shown="always")
    centered: bool = option(True, bool_option)
    normalization: str | None = option("sqrt", lambda k, v: normalization_mode(v, k))
    alpha: float = option(0.5, lambda k, v: check_number(k, v, 0.0, open_low=True,
                                                         note="the power of normalization='power'"),
                          read_when=lambda o: o["normalization"] == "power" and o["sketch"] is None,
                          needs="normalization='power'", shown="always")
    signed_sqrt: bool = option(False, bool_option)
    l2: bool = option(False, bool_option)
    sqrt_smoothing: float = option(0.0, lambda k, v: check_number(
        k, v, 0.0, note="added to √|z| in the signed square root's backward, z summed over the positions"),
        read_when=lambda o: o["signed_sqrt"], needs="signed_sqrt")
    sketch: str | None = option(None, _choice(*_SKETCHES))
    sketch_dim: int = option(8192, lambda k, v: check_int(k, v, 2), read_when=lambda o: o["sketch"] is not None,
                             needs="a sketch", shown="always")
    sketch_seed: int = option(0, lambda k, v: check_int(k, v, 0), read_when=lambda o: o["sketch"] is not None,
                              needs="a sketch", shown="always")
    channel_drop: str | None = option(None, _choice(*_CHANNEL_DROPS))
    gram: bool | str = option("auto", check_gram)
    layout: str = option("auto", lambda k, v: check_layout(v))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        self._check_combination()

    def _check_combination(self) -> None:
        """The rules between options: a forced Gram side the backend has, a sketch with nothing to normalise,
        no option the head never reads (:func:`check_used`), vector-only options with a vector."""
        resolve_backend(self.backend)[0].uses_gram(1, 1, self.gram)  # a forced Gram side needs one
        if self.sketch is not None and self.normalization != "none":
            raise ValueError(f"sketch={self.sketch!r} projects the second moment to a vector: no matrix to "
                             f"normalise, pass normalization='none' (got {self.normalization!r})")
        if self.vectorize == "matrix" and (self.signed_sqrt or self.l2 or self.sketch):
            raise ValueError("signed_sqrt, l2 and sketch produce a vector: use vectorize='triu' or 'full'")
        check_used(self)

    @classmethod
    def bind(cls, where: str, args: Sequence[Any], kwargs: Mapping[str, Any],
             extra: Sequence[str] = ("device", "dtype")) -> CovPoolOptions:
        """The options of a call ``where(in_channels, *args, **kwargs)``: an unknown keyword is a TypeError naming
        ``where`` and the closest option (``extra``: the other keywords ``where`` takes), then Python's rules for
        the positional ones, then the checks."""
        fields = dataclasses.fields(cls)
        check_keywords(where, kwargs, [*(f.name for f in fields), *extra])
        positional = [f.name for f in fields if f.metadata["positional"]]
        if len(args) > len(positional):
            raise TypeError(f"{where} takes at most {len(positional) + 1} positional arguments (in_channels, "
                            f"{', '.join(positional)}), got {len(args) + 1}")
        given = dict(zip(positional, args))
        twice = sorted(given.keys() & kwargs.keys())
        if twice:
            raise TypeError(f"{where} got multiple values for argument {twice[0]!r}")
        return cls(**given, **kwargs)

    @classmethod
    def reads(cls, name: str, options: Mapping[str, Any]) -> bool:
        """Whether a pooling built with ``options`` (the rest at their defaults) reads option ``name``."""
        return _reads(cls.__dataclass_fields__[name], vars(cls(**options)))

    def read(self) -> dict[str, Any]:
        """The options the chosen head reads, or that differ from their default: the keyword arguments that build
        the same pooling again."""
        values = vars(self)
        return {f.name: values[f.name] for f in dataclasses.fields(self)
                if _reads(f, values) or values[f.name] != f.default}

    def shown(self) -> list[str]:
        """``name=value`` of the options ``extra_repr`` shows: those read, always or when changed (:func:`option`)."""
        values = vars(self)
        return [f"{f.name}={values[f.name]!r}" for f in dataclasses.fields(self)
                if _reads(f, values) and (f.metadata["shown"] == "always" or values[f.name] != f.default)]


def _reads(f: dataclasses.Field, values: Mapping[str, Any]) -> bool:
    rule = f.metadata.get("read_when")
    return rule is None or bool(rule(values))


def check_used(options: CovPoolOptions | Mapping[str, Any], fields_of: type[CovPoolOptions] | None = None) -> None:
    """The one rule of :class:`covpool.CovPool` and :func:`covpool.cov_pool`: an option given a value other than
    its default that the chosen head never reads (``backend`` without ``normalization="sqrt"``, ``alpha``
    without ``"power"``, ``sketch_dim`` / ``sketch_seed`` without a sketch, ``sqrt_smoothing`` without
    ``signed_sqrt``, ``vectorize`` with a sketch) is a mistake to report, not to ignore. ``options``: a
    :class:`CovPoolOptions` (or subclass), or a mapping of some values, the rest at the defaults of ``fields_of``
    (:class:`CovPoolOptions` unless given)."""
    # The class's field table rather than dataclasses.fields(): cov_pool runs this in its forward, which
    # torch.compile traces, and dynamo follows a dict of fields but not dataclasses.fields().
    if fields_of is None:
        fields_of = CovPoolOptions if isinstance(options, Mapping) else type(options)
    fields = fields_of.__dataclass_fields__.values()
    values = {f.name: f.default for f in fields} | (dict(options) if isinstance(options, Mapping) else vars(options))
    unused = [f for f in fields if values[f.name] != f.default and not _reads(f, values)]
    if unused:
        given = ", ".join(f"{f.name}={values[f.name]!r}" for f in unused)
        needs = "; ".join(f"{f.name} needs {f.metadata['needs']}" for f in unused)
        head = ", ".join(f"{k}={values[k]!r}" for k in ("normalization", "sketch", "signed_sqrt"))
        raise ValueError(f"{given} would have no effect: {needs} (this head: {head})")


def check_option(name: str, value: Any, options_class: type[CovPoolOptions] = CovPoolOptions) -> Any:
    """``value`` checked (and normalised) by the rule of option ``name``, where a function takes it too."""
    return options_class.__dataclass_fields__[name].metadata["check"](name, value)


def options_signature(options_class: type[CovPoolOptions], first: str = "in_channels",
                      extra: Sequence[str] = ("device", "dtype")) -> inspect.Signature:
    """The signature of a layer built from ``options_class``: ``first``, the positional options, the others
    keyword-only, then ``extra`` (keyword-only, default None)."""
    params = [inspect.Parameter(first, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="int")]
    for f in dataclasses.fields(options_class):
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if f.metadata["positional"] else inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(f.name, kind, default=f.default, annotation=f.type))
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in extra]
    return inspect.Signature(params)
