"""``covpool`` command line: ``covpool train | eval | bench | demo`` (also ``python -m covpool``)."""
from __future__ import annotations

import importlib
import sys

__all__ = ["main"]

# command -> (module, function, one-line help); modules are imported only when their command runs.
_COMMANDS = {
    "train": ("covpool.train.cli", "train_main", "fine-tune a model from a YAML config"),
    "eval": ("covpool.train.cli", "eval_main", "evaluate a checkpoint on a config's validation set"),
    "bench": ("covpool.bench", "main", "time and check every square-root backend"),
    "demo": ("covpool.demo", "main", "the main job of `make demo`"),
}


def _usage() -> str:
    lines = ["usage: covpool <command> [options]   (covpool --version: the installed version)", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, _, help_) in _COMMANDS.items()]
    lines += ["", "`covpool <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"covpool {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(f"error: unknown command {command!r}; the commands are {', '.join(_COMMANDS)} (see `covpool --help`)",
              file=sys.stderr)
        return 2
    module, func, _ = _COMMANDS[command]
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except SystemExit as exit_:  # argparse's --help and usage errors: main() returns what the shell would see
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
