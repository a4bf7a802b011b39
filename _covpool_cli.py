"""The ``covpool`` console script: ``covpool --help`` and ``covpool --version`` in a fraction of a second.

``import covpool`` loads torch, torchvision and timm and registers covpool's models with timm (seconds, and
the promise that ``timm.create_model("so_vit_7")`` works after it), and any module inside the package runs
that first. This module lives outside the package so that the two answers that need none of it (the list of
commands, the installed version) come without it; every other command line goes to :func:`covpool.cli.main`,
which gives the same two answers for ``python -m covpool`` and for callers in Python.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main", "COMMANDS", "usage", "version"]

#: command -> its one-line help, in the order ``covpool --help`` lists them (covpool.cli runs them)
COMMANDS = {
    "train": "fine-tune a model from a YAML config",
    "eval": "evaluate a checkpoint: accuracy, per-class accuracy, confusion matrix, predictions",
    "predict": "the top-k classes of image files by a trained checkpoint",
    "bench": "time and check the square-root backends, or (--models) a head's cost in a training step",
    "demo": "the backend table, then average vs covariance pooling over 3 seeds (`make demo`)",
}


def usage(commands: dict[str, str] = COMMANDS) -> str:
    """What ``covpool --help`` prints."""
    width = max(len(name) for name in commands)
    lines = ["usage: covpool <command> [options]   (covpool --version: the installed version)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, help_ in commands.items()]
    lines += ["", "`covpool <command> --help` shows a command's options."]
    return "\n".join(lines)


def version() -> str:
    """The installed covpool's version: the distribution's metadata, else (a source checkout that was never
    installed) the package's ``__version__``, which then costs the import."""
    from importlib import metadata

    try:
        return metadata.version("covpool")
    except metadata.PackageNotFoundError:
        from covpool import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """``covpool <command> [options]``: answer ``--help``/``--version`` here, run anything else with
    :func:`covpool.cli.main`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"covpool {version()}")
        return 0
    from covpool.cli import main as run

    return run(argv)
