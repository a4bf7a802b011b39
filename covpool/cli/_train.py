"""``covpool train``, ``covpool eval`` and ``covpool predict``: their options, handed to :mod:`covpool.train`."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ._common import Parser, UsageError, config_parser, is_override, make_folder, parse_with_overrides, run

__all__ = ["train_main", "eval_main", "predict_main"]

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin")
_SHOWN_PREDICTIONS = 20


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
    if token.startswith("-") or is_override(token):
        return False
    return Path(token).is_file() or token.lower().endswith(_CHECKPOINT_SUFFIXES)


def _config_summary(text: str) -> str:
    """A config file's first comment paragraph (its comment lines up to an indented command line, an empty
    comment line or the first key), joined into one line."""
    words = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if not body.strip() or body.startswith("  "):
            break
        words.append(body.strip())
    return " ".join(words)


def _list_configs() -> str:
    import shutil
    import textwrap

    from ..train.config import shipped_configs

    configs = shipped_configs()
    width = max(len(name) for name in configs) + 2
    total = max(shutil.get_terminal_size((100, 24)).columns, width + 40)
    lines = []
    for name, path in configs.items():
        about = _config_summary(path.read_text(encoding="utf-8")) or "(no description)"
        lines.append(textwrap.fill(about, total, initial_indent=f"{name:<{width}}", subsequent_indent=" " * width,
                                   break_on_hyphens=False))
    return "\n".join(lines + ["", "use one with: covpool train --config <name> [key=value ...]"])


def train_main(argv: Sequence[str]) -> int:
    """``covpool train --config <name or file> | --list-configs [--resume | --resume-from CKPT | --overwrite]
    [key=value ...]``."""
    from ..train.checkpoint import LAST

    prog = "covpool train"
    parser = config_parser(prog, "Train or fine-tune a model from a YAML config; outputs go to <output_dir>/<name>/ "
                           "(runs/<name>/ by default). Also runs under torchrun.")
    parser.add_argument("--config", metavar="NAME|FILE",
                        help="YAML config: a file, or the name of a shipped config (see --list-configs); "
                             "a local file wins over a shipped name")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help=f"continue the run's own <output_dir>/<name>/{LAST} (needs --config)")
    mode.add_argument("--resume-from", metavar="CKPT",
                      help="continue from this checkpoint; without --config, with the config stored in it "
                           "(`--resume CKPT` is still read this way)")
    mode.add_argument("--overwrite", action="store_true",
                      help="start afresh even if the run folder has a checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, see below")

    from ..train import (
        CheckpointError,
        ClassListError,
        ConfigError,
        DatasetNotFoundError,
        PretrainedWeightsError,
        RunExistsError,
    )
    from ..train.checkpoint import Checkpoint
    from ..train.config import config_from_dict, load_config
    from ..train.engine import train

    read = {}  # the config, once read: an interruption names the run folder's last checkpoint

    def command() -> int:
        args = parse_with_overrides(parser, _legacy_resume(list(argv)), "; a checkpoint goes after --resume-from")
        if args.list_configs:
            print(_list_configs())
            return 0
        resume = args.resume_from or args.resume or None
        if args.config is not None:
            read["cfg"] = load_config(args.config, args.overrides)
        elif args.resume_from is not None:
            # continue from the checkpoint's own config, with the command line's overrides on top; the
            # checkpoint read here is the one the run continues (read once)
            resume = Checkpoint.read(args.resume_from)
            read["cfg"] = config_from_dict(resume.config, where=f" (from {args.resume_from})",
                                           overrides=args.overrides)
        elif args.resume:
            raise UsageError(f"--resume continues the {LAST} of a config's run folder: give --config too, "
                             "or --resume-from CKPT")
        else:
            raise UsageError("--config is required (or --resume-from CKPT to continue from a checkpoint's config)")
        return train(read["cfg"], resume=resume, overwrite=args.overwrite).exit_code

    def interrupted(err: KeyboardInterrupt) -> int:
        if str(err):  # TrainingAborted says which checkpoint holds the work
            print(f"error: {err}", file=sys.stderr)
            return 130
        last = read["cfg"].run_dir / LAST if "cfg" in read else None
        where = f"{last} holds the last saved state" if last is not None and last.is_file() else \
            "no checkpoint was written"
        print(f"error: interrupted; {where}", file=sys.stderr)
        return 130

    return run(prog, command, (ConfigError, DatasetNotFoundError, RunExistsError, FileNotFoundError, CheckpointError,
                               ClassListError, PretrainedWeightsError), interrupted)


def eval_main(argv: Sequence[str]) -> int:
    """``covpool eval --checkpoint runs/<name>/best.pt [--split val|test|train] [--out DIR] [--config ...] [--ema]
    [key=value ...]``."""
    prog = "covpool eval"
    parser = config_parser(prog, "Evaluate a checkpoint on a split of its config's data set: loss, top-1/top-5, "
                           "mean per-class accuracy; writes per_class.csv, confusion.csv, confusion.png and "
                           "predictions.csv.")
    parser.add_argument("--config", metavar="NAME|FILE",
                        help="YAML config (a file or a shipped config's name); default: the one stored in the "
                             "checkpoint")
    parser.add_argument("--checkpoint", required=True, help="a last.pt / best.pt written by covpool train")
    parser.add_argument("--split", default="val",
                        help="val (default), test (an ImageFolder's test/ folder; for cub200 and the torchvision "
                             "data sets the same images as val, their official test split) or train")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for the CSV files and the confusion matrix (default: "
                             "<checkpoint's folder>/eval_<checkpoint name>_<split>)")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights (runs with ema=true)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, see below")

    from ..train import CheckpointError, ClassListError, ConfigError, DatasetNotFoundError
    from ..train.checkpoint import Checkpoint
    from ..train.config import config_from_dict, load_config
    from ..train.evaluation import evaluate

    def command() -> int:
        args = parse_with_overrides(parser, list(argv))
        checkpoint = Checkpoint.read(args.checkpoint)  # read once: its config and its weights
        if args.config is not None:
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = config_from_dict(checkpoint.config, where=f" (from {args.checkpoint})", overrides=args.overrides)
        out = make_folder("--out", args.out if args.out is not None else checkpoint.path.parent
                          / f"eval_{checkpoint.path.stem}_{args.split}{'_ema' if args.ema else ''}")
        result = evaluate(checkpoint, cfg, use_ema=args.ema, split=args.split, out_dir=out)
        m = result.metrics
        print(f"{args.checkpoint}: {args.split} loss {m['loss']:.4f}  top-1 {m['acc1']:.2f}%  top-5 "
              f"{m['acc5']:.2f}%  mean per-class {m['mean_class_acc']:.2f}%  ({m['count']} images, "
              f"{len(result.classes)} classes)")
        rows = sorted((r for r in result.per_class() if r["images"]), key=lambda r: (r["accuracy"], r["label"]))
        if len(rows) > 1:
            print("lowest per-class accuracy: " + ", ".join(
                f"{r['class']} {r['accuracy']:.1f}% ({r['correct']}/{r['images']})" for r in rows[:5]))
        print(f"wrote {out}/: per_class.csv, confusion.csv, confusion.png, predictions.csv")
        return 0

    return run(prog, command, (ConfigError, DatasetNotFoundError, FileNotFoundError, CheckpointError, ClassListError))


def predict_main(argv: Sequence[str]) -> int:
    """``covpool predict --checkpoint CKPT [--top-k K] [--batch-size N] [--device auto|cpu|cuda[:n]] [--out CSV]
    [--ema] [--workers N] [--no-progress] PATH ...``."""
    prog = "covpool predict"
    parser = Parser(prog=prog, description="The top-k classes, with their probabilities, of image files or of "
                    "every image in folders (recursively), by a model trained with covpool train; printed and "
                    "written to a CSV file. The checkpoint alone is enough: its config and class names are in it.")
    parser.add_argument("--checkpoint", required=True, help="a last.pt / best.pt written by covpool train")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:<n>")
    parser.add_argument("--out", default="predictions.csv", metavar="CSV",
                        help="the CSV file to write (default predictions.csv): image, class_1, probability_1, ...")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights (runs with ema=true)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    from ..train import CheckpointError, ConfigError
    from ..train.inference import ImageReadError, format_prediction, predict, write_predictions

    def command() -> int:
        args = parser.parse_args(list(argv))
        for name, value, low in (("--top-k", args.top_k, 1), ("--batch-size", args.batch_size, 1),
                                 ("--workers", args.workers, 0)):
            if value < low:
                raise UsageError(f"{name} must be at least {low}, got {value}")
        if Path(args.out).is_dir():
            raise UsageError(f"--out {args.out} is a folder; give the CSV file to write")
        make_folder("--out", Path(args.out).parent)
        predictions = predict(args.checkpoint, args.paths, top_k=args.top_k, batch_size=args.batch_size,
                              device=args.device, use_ema=args.ema, workers=args.workers,
                              progress=not args.no_progress)
        written = write_predictions(predictions, args.out)
        for prediction in predictions[:_SHOWN_PREDICTIONS]:
            print(format_prediction(prediction))
        more = len(predictions) - _SHOWN_PREDICTIONS
        print((f"... and {more} more; " if more > 0 else "") + f"wrote {len(predictions)} predictions to {written}")
        return 0

    return run(prog, command, (ConfigError, CheckpointError, FileNotFoundError, ImageReadError))
