"""Where configs come from: YAML files, read strictly, and the configs shipped inside the package, found by name.

Reading is the only job here; :mod:`covpool.train.config` turns what is read into a checked config.
"""
from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from ._schema import ConfigError

__all__ = ["ConfigNotFoundError", "yaml_problem", "read_config_file", "shipped_configs", "resolve_config"]


class ConfigNotFoundError(ConfigError, FileNotFoundError):
    """The config file given does not exist (a :class:`ConfigError` and a :class:`FileNotFoundError`)."""


def yaml_problem(err: yaml.YAMLError) -> str:
    """Where and why PyYAML could not read a text, in one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not "the last wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                        f"found the key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path) -> dict:
    """The plain dict a YAML config file holds; every way it can be unusable is a :class:`ConfigError`
    that names the file (missing: :class:`ConfigNotFoundError`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigNotFoundError(f"config file {str(path)!r} not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror or err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values (key: value lines), "
                          f"but its top level is a {type(data).__name__}")
    return data


def _shipped_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> dict[str, Path]:
    """The configs shipped inside the package, name (file name without ``.yaml``) -> file, sorted by name.
    ``covpool train --config <name>`` and :func:`load_config` accept these names."""
    return {p.stem: p for p in sorted(_shipped_dir().glob("*.yaml"))}


def resolve_config(name_or_path: str | Path) -> Path:
    """The config file meant by ``name_or_path``: an existing file first (a local path always wins), else
    the shipped config of that name, with or without ``.yaml`` (``configs/<name>.yaml`` too, so the documented
    commands work from any folder once covpool is installed). Raises :class:`ConfigNotFoundError` listing
    the shipped names otherwise."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        yamls = sorted(p.name for p in path.glob("*.y*ml"))
        inside = f" (it holds {', '.join(yamls)})" if yamls else " (it holds no .yaml file)"
        raise ConfigError(f"config {str(name_or_path)!r} is a folder, not a config file{inside}; give a YAML file "
                          "or the name of a shipped config")
    shipped = shipped_configs()
    bare = len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == "configs")
    if bare and path.suffix in ("", ".yaml", ".yml"):
        stem = path.stem if path.suffix else path.name
        if stem in shipped:
            return shipped[stem]
    raise ConfigNotFoundError(f"config {str(name_or_path)!r} not found: no such file, and no shipped config of "
                              f"that name; shipped configs: {', '.join(shipped) or '(none)'}")
