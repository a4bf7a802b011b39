"""``covpool train`` and ``covpool eval``: argument parsing around :mod:`covpool.train.engine`."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, config_from_dict, describe_config, load_config

__all__ = ["train_main", "eval_main"]

_EPILOG = """overrides: key=value pairs after the options, dotted for nested keys, values read as YAML
(e.g. optim.lr=0.01 data.root=/data/cub model.covpool.reduced_dim=128). Every key, its default and help:

"""


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, epilog=_EPILOG + describe_config(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _fail(err: BaseException) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def train_main(argv: list[str]) -> int:
    """``covpool train --config configs/<name>.yaml [--resume [CKPT]] [--overwrite] [key=value ...]``."""
    parser = _parser("covpool train", "Train or fine-tune a model from a YAML config; outputs go to "
                     "<output_dir>/<name>/ (runs/<name>/ by default). Also runs under torchrun.")
    parser.add_argument("--config", help="YAML config (configs/*.yaml); optional with --resume")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                        help="continue a run: its last.pt, or the checkpoint given")
    parser.add_argument("--overwrite", action="store_true", help="start afresh even if the run folder has a checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from .checkpoint import load_checkpoint
    from .data import DatasetNotFoundError
    from .engine import NonFiniteLossError, RunExistsError, train

    try:
        if args.config is None and isinstance(args.resume, str):
            # resume from the checkpoint's own config, with the command line's overrides on top
            from .config import apply_overrides

            stored = load_checkpoint(args.resume)["config"]
            cfg = config_from_dict(apply_overrides(stored, args.overrides), where=f" (from {args.resume})")
        elif args.config is None:
            parser.error("--config is required (or --resume CKPT to continue from a checkpoint's config)")
        else:
            cfg = load_config(args.config, args.overrides)
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, DatasetNotFoundError, RunExistsError, FileNotFoundError) as err:
        return _fail(err)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aborted (second Ctrl-C); last.pt holds the last completed epoch", file=sys.stderr)
        return 130
    return 130 if result.interrupted else 0


def eval_main(argv: list[str]) -> int:
    """``covpool eval --checkpoint runs/<name>/best.pt [--config ...] [--ema] [key=value ...]``."""
    parser = _parser("covpool eval", "Evaluate a checkpoint on its config's validation set.")
    parser.add_argument("--config", help="YAML config; default: the config stored in the checkpoint")
    parser.add_argument("--checkpoint", required=True, help="a last.pt / best.pt written by covpool train")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights (runs with ema=true)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from .checkpoint import load_checkpoint
    from .config import apply_overrides
    from .data import DatasetNotFoundError
    from .engine import evaluate

    try:
        if args.config is not None:
            cfg = load_config(args.config, args.overrides)
        else:
            stored = load_checkpoint(args.checkpoint)["config"]
            cfg = config_from_dict(apply_overrides(stored, args.overrides), where=f" (from {args.checkpoint})")
        metrics = evaluate(args.checkpoint, cfg, use_ema=args.ema)
    except (ConfigError, DatasetNotFoundError, FileNotFoundError, ValueError) as err:
        return _fail(err)
    print(f"{args.checkpoint}: val loss {metrics['loss']:.4f}  top-1 {metrics['acc1']:.2f}%  "
          f"top-5 {metrics['acc5']:.2f}%  ({metrics['count']} images)")
    return 0
