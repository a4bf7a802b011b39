"""``covpool train`` and ``covpool eval``: argument parsing around :mod:`covpool.train.engine`.

Every mistake in the input (options, config files, overrides, data-set folders, checkpoints) ends in one
``error: ...`` line on stderr and exit status 2; a run that fails (non-finite loss, a full disk, any error
type of covpool's own) in one ``error: ...`` line and exit status 1; Ctrl-C/SIGTERM in exit status 130.
Errors of other libraries keep their traceback: they are bugs to report.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .checkpoint import _os_error_in
from .config import ConfigError, config_from_dict, describe_config, load_config

__all__ = ["train_main", "eval_main"]

_EPILOG = """overrides: key=value pairs anywhere among the options, dotted for nested keys, values read as YAML
(e.g. optim.lr=0.01 data.root=/data/cub model.covpool.reduced_dim=128). Every key, its default, help and range
(a value outside the range is an error):

"""

# A token is a key=value override when an '=' comes before any path separator: `epochs=2` is one,
# `runs/a=b/last.pt` is not. An override is never taken for a checkpoint path.
_OVERRIDE = re.compile(r"^[^=/\\]+=")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin")


class _UsageError(Exception):
    """A mistake in the command line itself (unknown option, missing --config, ...)."""


class _BadCheckpoint(Exception):
    """A checkpoint given on the command line that cannot be read or holds no covpool config."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line and status 2, the same from main() as from a shell
        raise _UsageError(message)


def _parser(prog: str, description: str) -> _Parser:
    return _Parser(prog=prog, description=description, epilog=_EPILOG + describe_config(),
                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _is_override(token: str) -> bool:
    return bool(_OVERRIDE.match(token))


def _legacy_resume(argv: list[str]) -> list[str]:
    """``--resume CKPT`` (covpool 0.1.0's spelling) as ``--resume-from CKPT``: only when CKPT names a
    checkpoint (an existing file, or a name ending in .pt/.pth/...), never when it is a key=value override."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--resume="):
            out += ["--resume-from", token.split("=", 1)[1]]
        elif token == "--resume" and i + 1 < len(argv) and _looks_like_checkpoint(argv[i + 1]):
            out += ["--resume-from", argv[i + 1]]
            i += 1
        else:
            out.append(token)
        i += 1
    return out


def _looks_like_checkpoint(token: str) -> bool:
    if token.startswith("-") or _is_override(token):
        return False
    return Path(token).is_file() or token.lower().endswith(_CHECKPOINT_SUFFIXES)


def _parse(parser: _Parser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_intermixed_args(argv)
    stray = [t for t in args.overrides if not _is_override(t)]
    if stray:
        raise _UsageError(f"unexpected argument {stray[0]!r}: overrides look like key=value (e.g. optim.lr=0.01)"
                          + ("; a checkpoint goes after --resume-from" if "train" in parser.prog else ""))
    return args


def _stored_config(path: str, option: str) -> dict:
    """The config a ``covpool train`` checkpoint stores; :func:`load_checkpoint` explains a damaged or
    foreign file (:class:`CheckpointError`)."""
    from .checkpoint import load_checkpoint

    config = load_checkpoint(path).get("config")
    if not isinstance(config, dict):
        raise _BadCheckpoint(f"{option} {path}: holds no covpool config; give the run's config with --config")
    return config


def _report(err: BaseException, input_errors: tuple[type[BaseException], ...]) -> int | None:
    """Print ``err`` as one ``error:`` line and return the exit status, or None for errors that are not
    covpool's nor the system's (they propagate with their traceback)."""
    if isinstance(err, input_errors):
        status = 2
    elif _os_error_in(err) is not None:
        err, status = _os_error_in(err), 1
    elif type(err).__module__.split(".")[0] == "covpool":
        status = 1
    else:
        return None
    print(f"error: {err}", file=sys.stderr)
    return status


def _usage_error(prog: str, err: _UsageError) -> int:
    print(f"error: {err} (see `{prog} --help`)", file=sys.stderr)
    return 2


def _interrupted(cfg, err: KeyboardInterrupt) -> int:
    if str(err):  # TrainingAborted says which checkpoint holds the work
        print(f"error: {err}", file=sys.stderr)
        return 130
    last = Path(cfg.output_dir) / cfg.name / "last.pt" if cfg is not None else None
    where = f"{last} holds the last saved state" if last is not None and last.is_file() else \
        "no checkpoint was written"
    print(f"error: interrupted; {where}", file=sys.stderr)
    return 130


def _list_configs() -> str:
    from .config import shipped_configs

    lines = []
    for name, path in shipped_configs().items():
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        about = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        lines.append(f"{name:<28} {about}")
    return "\n".join(lines + ["", "use one with: covpool train --config <name> [key=value ...]"])


def train_main(argv: list[str]) -> int:
    """``covpool train --config <name or file> | --list-configs [--resume | --resume-from CKPT | --overwrite] [key=value ...]``."""
    prog = "covpool train"
    parser = _parser(prog, "Train or fine-tune a model from a YAML config; outputs go to <output_dir>/<name>/ "
                     "(runs/<name>/ by default). Also runs under torchrun.")
    parser.add_argument("--config", metavar="NAME|FILE",
                        help="YAML config: a file, or the name of a shipped config (see --list-configs); "
                             "a local file wins over a shipped name")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run's own <output_dir>/<name>/last.pt (needs --config)")
    mode.add_argument("--resume-from", metavar="CKPT",
                      help="continue from this checkpoint; without --config, with the config stored in it "
                           "(`--resume CKPT` is still read this way)")
    mode.add_argument("--overwrite", action="store_true",
                      help="start afresh even if the run folder has a checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, see below")

    from .checkpoint import CheckpointError
    from .data import DatasetNotFoundError
    from .engine import RunExistsError, train

    cfg = None
    try:
        args = _parse(parser, _legacy_resume(list(argv)))
        if args.list_configs:
            print(_list_configs())
            return 0
        if args.config is not None:
            cfg = load_config(args.config, args.overrides)
        elif args.resume_from is not None:
            # continue from the checkpoint's own config, with the command line's overrides on top
            stored = _stored_config(args.resume_from, "--resume-from")
            cfg = config_from_dict(stored, where=f" (from {args.resume_from})", overrides=args.overrides)
        elif args.resume:
            raise _UsageError("--resume continues the last.pt of a config's run folder: give --config too, "
                              "or --resume-from CKPT")
        else:
            raise _UsageError("--config is required (or --resume-from CKPT to continue from a checkpoint's config)")
        result = train(cfg, resume=args.resume_from or args.resume or None, overwrite=args.overwrite)
    except _UsageError as err:
        return _usage_error(prog, err)
    except KeyboardInterrupt as err:
        return _interrupted(cfg, err)
    except Exception as err:
        status = _report(err, (ConfigError, DatasetNotFoundError, RunExistsError, FileNotFoundError,
                                    CheckpointError, _BadCheckpoint))
        if status is None:
            raise
        return status
    return result.exit_code


def eval_main(argv: list[str]) -> int:
    """``covpool eval --checkpoint runs/<name>/best.pt [--config ...] [--ema] [key=value ...]``."""
    prog = "covpool eval"
    parser = _parser(prog, "Evaluate a checkpoint on its config's validation set.")
    parser.add_argument("--config", metavar="NAME|FILE",
                        help="YAML config (a file or a shipped config's name); default: the one stored in the "
                             "checkpoint")
    parser.add_argument("--checkpoint", required=True, help="a last.pt / best.pt written by covpool train")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights (runs with ema=true)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, see below")

    from .data import DatasetNotFoundError
    from .engine import evaluate

    try:
        args = _parse(parser, list(argv))
        if args.config is not None:
            cfg = load_config(args.config, args.overrides)
        else:
            stored = _stored_config(args.checkpoint, "--checkpoint")
            cfg = config_from_dict(stored, where=f" (from {args.checkpoint})", overrides=args.overrides)
        metrics = evaluate(args.checkpoint, cfg, use_ema=args.ema)
    except _UsageError as err:
        return _usage_error(prog, err)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        status = _report(err, (ConfigError, DatasetNotFoundError, FileNotFoundError, ValueError,
                                    _BadCheckpoint))
        if status is None:
            raise
        return status
    print(f"{args.checkpoint}: val loss {metrics['loss']:.4f}  top-1 {metrics['acc1']:.2f}%  "
          f"top-5 {metrics['acc5']:.2f}%  ({metrics['count']} images)")
    return 0
