"""Names that moved keep their old import path for one release (internal): :func:`moved_names` makes the
module-level ``__getattr__`` that warns with a :class:`FutureWarning` naming the new spelling. The library and
the application both use it (the application through :mod:`covpool.outputs`), so every such warning reads alike.
"""
from __future__ import annotations

import pkgutil
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["moved_names"]


def moved_names(module: str, moved: Mapping[str, str | tuple[str, str]]) -> Callable[[str], Any]:
    """The module-level ``__getattr__`` of ``module`` for its names that moved, kept for one release.

    ``moved`` maps an old name to where it lives now, ``"package.module:name"``, or to ``(that, advice)`` when
    the new spelling differs from a plain import (the advice is what the warning tells the reader to write).
    Reading an old name warns with a :class:`FutureWarning` and returns the object; any other unknown name is an
    :class:`AttributeError`, as without the hook.

    >>> __getattr__ = moved_names("old.place", {"dumps": "json:dumps"})
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     dumps = __getattr__("dumps")
    >>> dumps([1]), str(caught[0].message)
    ('[1]', 'old.place.dumps is deprecated and goes in the next release; use json.dumps')
    """
    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        entry = moved[name]
        target, advice = (entry, entry.replace(":", ".")) if isinstance(entry, str) else entry
        warnings.warn(f"{module}.{name} is deprecated and goes in the next release; use {advice}", FutureWarning,
                      stacklevel=2)
        return pkgutil.resolve_name(target)

    return __getattr__
