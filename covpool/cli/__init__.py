"""The ``covpool`` command line: ``covpool train | eval | predict | bench | demo`` (also ``python -m covpool``).

Each command's options are parsed in a module of this package (``_train``: train, eval and predict; ``_bench``;
``_demo``) and the work is done by :mod:`covpool.train`, :mod:`covpool.bench` and :mod:`covpool.demo`,
imported only when their command runs. The ``covpool`` console script enters through ``_covpool_cli``, a
module beside the package that answers ``--help`` and ``--version`` without importing torch, holds the
commands' one-line helps (``_covpool_cli.COMMANDS``) and hands everything else to :func:`main`.

Every mistake in the input (options, config files, overrides, data-set folders, checkpoints) ends in one
``error: ...`` line on stderr and exit status 2; a run that fails (non-finite loss, a full disk, any error
type of covpool's own) in one ``error: ...`` line and exit status 1; Ctrl-C/SIGTERM in exit status 130.
Errors of other libraries keep their traceback: they are bugs to report.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import _covpool_cli as _launcher

from ._bench import bench_main
from ._demo import demo_main
from ._train import eval_main, predict_main, train_main

__all__ = ["main", "train_main", "eval_main", "predict_main", "bench_main", "demo_main", "RUNNERS"]

#: command -> the function that runs it (its arguments -> exit status), in the order of
#: ``_covpool_cli.COMMANDS``, which holds each command's one-line help
RUNNERS: dict[str, Callable[[list[str]], int]] = {
    "train": train_main, "eval": eval_main, "predict": predict_main, "bench": bench_main, "demo": demo_main,
}

# Modules of the `train` extra (pyproject.toml): the library works without them, the commands do not.
_TRAIN_EXTRA = frozenset({"yaml", "tqdm", "matplotlib", "skimage"})


def main(argv: Sequence[str] | None = None) -> int:
    """``covpool <command> [options]``: run one command and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_launcher.usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"covpool {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in RUNNERS:
        print(f"error: unknown command {command!r}; the commands are {', '.join(RUNNERS)} (see `covpool --help`)",
              file=sys.stderr)
        return 2
    try:
        return int(RUNNERS[command](rest) or 0)
    except ModuleNotFoundError as err:
        if err.name not in _TRAIN_EXTRA:
            raise
        print(f"error: `covpool {command}` needs the training extra ({err.name} is not installed): "
              "pip install 'covpool[train]'", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # argparse's --help and usage errors: main() returns what the shell would see
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
