"""What every command of the command line does alike: its parser, its usage errors, and how an error becomes one
``error:`` line and an exit status."""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

__all__ = ["UsageError", "Parser", "config_parser", "is_override", "parse_with_overrides", "make_folder", "run"]

_EPILOG = """overrides: key=value pairs anywhere among the options, dotted for nested keys, values read as YAML
(e.g. optim.lr=0.01 data.root=/data/cub model.covpool.reduced_dim=128). Every key, its default, help, range
and values (a value outside them is an error):

"""

# A token is a key=value override when an '=' comes before any path separator: `epochs=2` is one,
# `runs/a=b/last.pt` is not. An override is never taken for a checkpoint path.
_OVERRIDE = re.compile(r"^[^=/\\]+=")


class UsageError(Exception):
    """A mistake in the command line itself (unknown option, missing --config, ...)."""


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose mistakes raise :class:`UsageError` (one ``error:`` line and status 2, the same
    from :func:`covpool.cli.main` as from a shell) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def config_parser(prog: str, description: str) -> Parser:
    """The parser of a command that takes a training config and ``key=value`` overrides: its ``--help`` ends
    with every key of the config (:func:`covpool.train.config.describe_config`)."""
    from ..train.config import describe_config

    return Parser(prog=prog, description=description, epilog=_EPILOG + describe_config(),
                  formatter_class=argparse.RawDescriptionHelpFormatter)


def is_override(token: str) -> bool:
    """Whether a command-line token is a ``key=value`` override."""
    return bool(_OVERRIDE.match(token))


def parse_with_overrides(parser: Parser, argv: list[str], stray_hint: str = "") -> argparse.Namespace:
    """Options and ``key=value`` overrides in any order (``args.overrides``); a positional token that is not an
    override is a :class:`UsageError` (with ``stray_hint`` after the message)."""
    args = parser.parse_intermixed_args(argv)
    stray = [t for t in args.overrides if not is_override(t)]
    if stray:
        raise UsageError(f"unexpected argument {stray[0]!r}: overrides look like key=value (e.g. optim.lr=0.01)"
                         + stray_hint)
    return args


def make_folder(option: str, value: str | Path) -> Path:
    """The folder ``value`` of ``option``, created now, so that a folder that cannot be made (under a file,
    without permission) is a usage error before anything is measured or trained."""
    out = Path(value)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{option} {value}: cannot create that folder ({err.strerror or err})") from None
    return out


def _report(err: BaseException, input_errors: tuple[type[BaseException], ...]) -> int | None:
    """Print ``err`` as one ``error:`` line and return the exit status, or None for errors that are not
    covpool's nor the system's (they propagate with their traceback)."""
    from ..outputs import os_error_in

    if isinstance(err, input_errors):
        status = 2
    elif (os_error := os_error_in(err)) is not None:
        err, status = os_error, 1
    elif type(err).__module__.split(".")[0] == "covpool":
        status = 1
    else:
        return None
    print(f"error: {err}", file=sys.stderr)
    return status


def _interrupted(err: KeyboardInterrupt) -> int:
    print("error: interrupted", file=sys.stderr)
    return 130


def run(prog: str, command: Callable[[], int], input_errors: tuple[type[BaseException], ...] = (),
        interrupted: Callable[[KeyboardInterrupt], int] = _interrupted) -> int:
    """Run ``command()`` and return its exit status, or the status of what stopped it, each said in one
    ``error:`` line on stderr: a :class:`UsageError` or one of ``input_errors`` (a mistake in the input) 2, a
    failure of the system (a full disk) or any error type of covpool's own 1, Ctrl-C ``interrupted(err)`` (130
    by default). Errors of other libraries keep their traceback: they are bugs to report."""
    try:
        return command()
    except UsageError as err:
        print(f"error: {err} (see `{prog} --help`)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        return interrupted(err)
    except Exception as err:
        status = _report(err, input_errors)
        if status is None:
            raise
        return status
