"""Every parameter of a public callable is documented: the rule, shared by the site's build (a warning per
parameter, which ``make docs`` turns into a failure) and by ``tests/test_docs.py`` (which needs no Sphinx).

A parameter counts as documented when its callable's docstring has an ``Args:`` entry for it (Google style,
which napoleon renders as ``:param name:``) or names it as a literal in its prose (``name`` or
``name=value``). A dataclass field carrying ``help`` metadata (the training config's keys) is documented by
that help: the build lists those fields as the class's parameters, so the reference shows them.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

__all__ = ["documented", "field_parameters", "parameters", "undocumented_parameters"]


def _field_help(cls: Any) -> dict[str, str]:
    """A dataclass's fields that carry ``help`` metadata, with that help."""
    if not (inspect.isclass(cls) and dataclasses.is_dataclass(cls)):
        return {}
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if f.metadata.get("help")}


def parameters(obj: Any) -> list[str]:
    """The names of ``obj``'s parameters a reader passes: a function's or method's, a class's constructor's
    (not ``self``/``cls`` or a private ``_name``, not the ``*args, **kwargs`` of a constructor inherited from a
    builtin, not a dataclass field documented by its ``help``)."""
    if inspect.isclass(obj) and obj.__init__ in (object.__init__, BaseException.__init__):
        return []
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: nothing a docstring could name
        return []
    helped = _field_help(obj)
    return [p.name for p in signature.parameters.values()
            if p.name not in ("self", "cls") and not p.name.startswith("_") and p.name not in helped]


def documented(doc: str, name: str) -> bool:
    """Whether ``doc`` (a raw docstring, or the lines napoleon made of one) documents parameter ``name``."""
    star = r"(?:\\?\*){0,2}"  # ``*args``, ``**options``, and napoleon's escaped ``\*\*options``
    patterns = (
        rf":param\s+(?:[^:]*\s)?{star}{name}:",  # napoleon's rendering, with or without a type
        rf"^\s+{star}{name}(?:\s*\([^)]*\))?:",  # an entry of an ``Args:`` or ``Attributes:`` section
        rf"^\.\. attribute:: {name}$",  # napoleon's rendering of an ``Attributes:`` entry
        rf"``{star}{name}(?:``|\s*=|\[|\.)",  # the prose names it: ``name``, ``name=...``, ``name[0]``
    )
    return any(re.search(p, doc, re.M) for p in patterns)


def undocumented_parameters(obj: Any, doc: str | None = None) -> list[str]:
    """The parameters of ``obj`` that ``doc`` (default: ``obj``'s own docstring) does not document."""
    if doc is None:
        doc = inspect.getdoc(obj) or ""
    return [name for name in parameters(obj) if not documented(doc, name)]


def field_parameters(cls: Any) -> list[str]:
    """Field-list lines documenting a dataclass's fields by their ``help`` metadata."""
    return [f":param {name}: {text}" for name, text in _field_help(cls).items()]


_reported: set[str] = set()


def _check(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """After napoleon: a dataclass's helped fields become its parameters, and each parameter of a public
    callable that the rendered docstring does not document is a warning."""
    if not name.startswith("covpool.") or what not in ("class", "function", "method", "exception"):
        return
    if what == "class" and lines:
        lines.extend(["", *field_parameters(obj)])
    missing = undocumented_parameters(obj, "\n".join(lines))
    if missing and any(line.strip() for line in lines) and name not in _reported:
        _reported.add(name)  # autosummary's stub page and the module's page both document it
        from sphinx.util import logging

        logging.getLogger(__name__).warning(
            "%s: parameter%s %s not documented (an Args: entry, or ``name`` in the prose)",
            name, "s" if len(missing) > 1 else "", ", ".join(missing), type="covpool", subtype="params")


def setup(app: Any) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _check, priority=600)  # after napoleon (500)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
