"""The ``covpool`` command line: ``covpool train | eval | bench | demo`` (also ``python -m covpool``).

Every command's options are parsed here; the work is done by :mod:`covpool.train` (train, eval),
:mod:`covpool.bench` and :mod:`covpool.demo`, imported only when their command runs. The ``covpool``
console script enters through ``_covpool_cli``, a module beside the package that answers ``--help`` and
``--version`` without importing torch and hands everything else to :func:`main`.

Every mistake in the input (options, config files, overrides, data-set folders, checkpoints) ends in one
``error: ...`` line on stderr and exit status 2; a run that fails (non-finite loss, a full disk, any error
type of covpool's own) in one ``error: ...`` line and exit status 1; Ctrl-C/SIGTERM in exit status 130.
Errors of other libraries keep their traceback: they are bugs to report.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import _covpool_cli as _launcher

__all__ = ["main", "train_main", "eval_main", "predict_main", "bench_main", "demo_main"]


# ---- covpool train / covpool eval ----------------------------------------------------------------------

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line and status 2, the same from main() as from a shell
        raise _UsageError(message)


def _parser(prog: str, description: str) -> _Parser:
    from .train.config import describe_config

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


def _report(err: BaseException, input_errors: tuple[type[BaseException], ...]) -> int | None:
    """Print ``err`` as one ``error:`` line and return the exit status, or None for errors that are not
    covpool's nor the system's (they propagate with their traceback)."""
    from .outputs import os_error_in

    if isinstance(err, input_errors):
        status = 2
    elif os_error_in(err) is not None:
        err, status = os_error_in(err), 1
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

    from .train.config import shipped_configs

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

    from .train import (
        CheckpointError,
        ClassListError,
        ConfigError,
        DatasetNotFoundError,
        PretrainedWeightsError,
        RunExistsError,
    )
    from .train.checkpoint import Checkpoint
    from .train.config import config_from_dict, load_config
    from .train.engine import train

    cfg = None
    try:
        args = _parse(parser, _legacy_resume(list(argv)))
        if args.list_configs:
            print(_list_configs())
            return 0
        resume = args.resume_from or args.resume or None
        if args.config is not None:
            cfg = load_config(args.config, args.overrides)
        elif args.resume_from is not None:
            # continue from the checkpoint's own config, with the command line's overrides on top; the
            # checkpoint read here is the one the run continues (read once)
            resume = Checkpoint.read(args.resume_from)
            cfg = config_from_dict(resume.config, where=f" (from {args.resume_from})", overrides=args.overrides)
        elif args.resume:
            raise _UsageError("--resume continues the last.pt of a config's run folder: give --config too, "
                              "or --resume-from CKPT")
        else:
            raise _UsageError("--config is required (or --resume-from CKPT to continue from a checkpoint's config)")
        result = train(cfg, resume=resume, overwrite=args.overwrite)
    except _UsageError as err:
        return _usage_error(prog, err)
    except KeyboardInterrupt as err:
        return _interrupted(cfg, err)
    except Exception as err:
        status = _report(err, (ConfigError, DatasetNotFoundError, RunExistsError, FileNotFoundError,
                               CheckpointError, ClassListError, PretrainedWeightsError))
        if status is None:
            raise
        return status
    return result.exit_code


def eval_main(argv: Sequence[str]) -> int:
    """``covpool eval --checkpoint runs/<name>/best.pt [--split val|test|train] [--out DIR] [--config ...] [--ema]
    [key=value ...]``."""
    prog = "covpool eval"
    parser = _parser(prog, "Evaluate a checkpoint on a split of its config's data set: loss, top-1/top-5, mean "
                     "per-class accuracy; writes per_class.csv, confusion.csv, confusion.png and predictions.csv.")
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

    from .train import CheckpointError, ClassListError, ConfigError, DatasetNotFoundError
    from .train.checkpoint import Checkpoint
    from .train.config import config_from_dict, load_config
    from .train.evaluation import evaluate

    try:
        args = _parse(parser, list(argv))
        checkpoint = Checkpoint.read(args.checkpoint)  # read once: its config and its weights
        if args.config is not None:
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = config_from_dict(checkpoint.config, where=f" (from {args.checkpoint})", overrides=args.overrides)
        out = Path(args.out) if args.out is not None else \
            checkpoint.path.parent / f"eval_{checkpoint.path.stem}_{args.split}{'_ema' if args.ema else ''}"
        _writable_folder(out, "--out")
        result = evaluate(checkpoint, cfg, use_ema=args.ema, split=args.split, out_dir=out)
    except _UsageError as err:
        return _usage_error(prog, err)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        status = _report(err, (ConfigError, DatasetNotFoundError, FileNotFoundError, CheckpointError, ClassListError))
        if status is None:
            raise
        return status
    m = result.metrics
    print(f"{args.checkpoint}: {args.split} loss {m['loss']:.4f}  top-1 {m['acc1']:.2f}%  top-5 {m['acc5']:.2f}%  "
          f"mean per-class {m['mean_class_acc']:.2f}%  ({m['count']} images, {len(result.classes)} classes)")
    rows = sorted((r for r in result.per_class() if r["images"]), key=lambda r: (r["accuracy"], r["label"]))
    if len(rows) > 1:
        print("lowest per-class accuracy: " + ", ".join(
            f"{r['class']} {r['accuracy']:.1f}% ({r['correct']}/{r['images']})" for r in rows[:5]))
    print(f"wrote {out}/: per_class.csv, confusion.csv, confusion.png, predictions.csv")
    return 0


def _writable_folder(folder: Path, option: str) -> None:
    """Create ``folder`` now, so an output path that cannot be one is a usage error before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _UsageError(f"{option}: cannot create the folder {folder} ({err.strerror or err})") from None


# ---- covpool predict -----------------------------------------------------------------------------------

_SHOWN_PREDICTIONS = 20


def predict_main(argv: Sequence[str]) -> int:
    """``covpool predict --checkpoint CKPT [--top-k K] [--batch-size N] [--device auto|cpu|cuda[:n]] [--out CSV]
    [--ema] [--workers N] [--no-progress] PATH ...``."""
    prog = "covpool predict"
    parser = _Parser(prog=prog, description="The top-k classes, with their probabilities, of image files or of "
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

    from .train import CheckpointError, ConfigError
    from .train.inference import ImageReadError, format_prediction, predict, write_predictions

    try:
        args = parser.parse_args(list(argv))
        for name, value, low in (("--top-k", args.top_k, 1), ("--batch-size", args.batch_size, 1),
                                 ("--workers", args.workers, 0)):
            if value < low:
                raise _UsageError(f"{name} must be at least {low}, got {value}")
        if Path(args.out).is_dir():
            raise _UsageError(f"--out {args.out} is a folder; give the CSV file to write")
        _writable_folder(Path(args.out).parent, "--out")
        predictions = predict(args.checkpoint, args.paths, top_k=args.top_k, batch_size=args.batch_size,
                              device=args.device, use_ema=args.ema, workers=args.workers,
                              progress=not args.no_progress)
        written = write_predictions(predictions, args.out)
    except _UsageError as err:
        return _usage_error(prog, err)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        status = _report(err, (ConfigError, CheckpointError, FileNotFoundError, ImageReadError))
        if status is None:
            raise
        return status
    for prediction in predictions[:_SHOWN_PREDICTIONS]:
        print(format_prediction(prediction))
    more = len(predictions) - _SHOWN_PREDICTIONS
    print((f"... and {more} more; " if more > 0 else "") + f"wrote {len(predictions)} predictions to {written}")
    return 0


# ---- covpool bench -------------------------------------------------------------------------------------

_BENCH_ABOUT = """\
Time and check the square-root backends, or (--models) what a second-order head costs in a training step.

Backends (the default): every backend at its defaults and with its accuracy options, and two baselines
(torch.linalg.matrix_sqrth, eigh through autograd), forward and forward+backward at each --dims size. Times
are medians of torch.utils.benchmark, also in units of one batched matrix product of the same size, so that
machines compare; errors are against float64 eigendecomposition on well-conditioned, ill-conditioned,
rank-deficient and repeated-eigenvalue matrices.

Models (--models): training steps (forward, backward, SGD) of each timm backbone with its average pooling,
with covpool.swap_pooling (Gram side, and forced to the d x d side), and with covpool's <name>_isqrt where it
exists, as ratios to the average-pooling step of the same run; then each model's second-order pooling alone,
at the shape and --batch it gets in that model, with the memory it keeps for backward.

Writes into --out: bench.csv, bench.png and backends.md (backends), or models.csv, head.csv, models.png and
models.md (--models). Each .md page starts with the date, the machine, the torch version and the command.
"""

# the options (argparse dests) of one mode only: given in the other mode, they are refused rather than ignored
_BACKEND_ONLY = ("quick", "dims", "inverse", "compile", "backends")
_MODELS_ONLY = ("img_size", "steps", "classes", "amp")


def _bench_parser() -> _Parser:
    parser = _Parser(prog="covpool bench", description=_BENCH_ABOUT,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="backends: each backend at its defaults, at d = 64 and batch 16 unless --dims or "
                             "--batch say otherwise; under a minute")
    parser.add_argument("--batch", type=int, help="batch size (backends: 64; --models: 8)")
    parser.add_argument("--dims", type=int, nargs="+", metavar="D",
                        help="backends: matrix sizes d (default: 32 64 128 256 512)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    parser.add_argument("--inverse", action="store_true", help="backends: measure the inverse square root")
    parser.add_argument("--compile", action="store_true", help="backends: also torch.compile ns, mtp_lya and mpa_lya")
    parser.add_argument("--backends", nargs="+", metavar="LABEL", help="backends: only these rows (default: all)")
    parser.add_argument("--models", nargs="*", metavar="NAME",
                        help="instead of the backends: training steps of these timm backbones (default resnet50)")
    parser.add_argument("--img-size", type=int, help="--models: input size (default 224)")
    parser.add_argument("--steps", type=int, help="--models: timed steps per model, medians (default 5)")
    parser.add_argument("--classes", type=int, help="--models: classifier size (default 1000)")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], help="--models: autocast (default none)")
    parser.add_argument("--out", default="bench_out", help="folder for the CSV files, plots and the .md page "
                                                           "(default bench_out)")
    return parser


def _bench_device(value: str | None) -> str:
    """``--device`` checked: a device torch knows and this machine has (default: cuda when available)."""
    import torch

    from .outputs import first_line

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise _UsageError(f"--device {value!r} is not a device torch knows; e.g. cpu, cuda, cuda:1, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError(f"--device {value}: torch sees no CUDA device on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise _UsageError(f"--device {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, ValueError, AssertionError) as err:  # a backend torch knows but this build or machine lacks
        raise _UsageError(f"--device {value} cannot be used here: {first_line(err)}") from None
    return value


def _make_folder(option: str, value: str) -> Path:
    """The folder ``value`` of ``option``, created now, so that a folder that cannot be made (under a file,
    without permission) is a usage error before anything is measured or trained."""
    out = Path(value)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _UsageError(f"{option} {value}: cannot create that folder ({err.strerror or err})") from None
    return out


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``covpool bench [--quick] [--dims ...] [--inverse] [--compile] [--backends ...] [--out DIR]``, or
    ``covpool bench --models [NAME ...] [--img-size ...] [--steps ...] [--amp ...]``."""
    prog = "covpool bench"
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _bench_parser()

    from . import bench

    try:
        args = parser.parse_args(argv)
        models_mode = args.models is not None
        wrong = [name for name in (_BACKEND_ONLY if models_mode else _MODELS_ONLY) if getattr(args, name)]
        if wrong:
            option = "--" + wrong[0].replace("_", "-")
            raise _UsageError(f"{option} belongs to the backend benchmark, not to --models (which times the heads "
                              "as the models build them): drop one of the two" if models_mode else
                              f"{option} applies to --models only: add --models [NAME ...] or drop {option}")
        for name, value, low in (("--batch", args.batch, 1), ("--img-size", args.img_size, 16),
                                 ("--steps", args.steps, 1), ("--classes", args.classes, 1),
                                 *(("--dims", d, 1) for d in args.dims or ())):
            if value is not None and value < low:
                raise _UsageError(f"{name} must be at least {low}, got {value}")
        device = _bench_device(args.device)
        command = ["covpool", "bench", *argv]
        if models_mode:
            return _bench_models(args, device, command)
        variants = bench.default_variants(quick=args.quick)
        if args.backends:
            unknown = sorted(set(args.backends) - {v.label for v in variants})
            if unknown:
                raise _UsageError(f"unknown variant(s) {unknown}; choose from {[v.label for v in variants]}")
            variants = [v for v in variants if v.label in args.backends]
        out = _make_folder("--out", args.out)
        batch, dims, min_time = (args.batch or 16, args.dims or [64], 0.05) if args.quick else \
            (args.batch or 64, args.dims or [32, 64, 128, 256, 512], 0.2)
        rows = bench.run_bench(variants, batch, dims, device, args.inverse, args.compile, min_time)
        print(bench.format_table(rows))
        _write_bench(rows, out, command, device)
    except _UsageError as err:
        return _usage_error(prog, err)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        status = _report(err, (bench.BenchError,))
        if status is None:
            raise
        return status
    return 0


def _write_bench(rows: list[dict], out: Path, command: list[str], device: str) -> None:
    from . import bench
    from .outputs import write_csv

    write_csv(rows, out / "bench.csv")
    bench.plot(rows, out / "bench.png")
    page = bench.write_backends_page(rows, out, bench.machine_stamp(command, device))
    print(f"\nwrote {out / 'bench.csv'}, {out / 'bench.png'} and {page}")


def _bench_models(args: argparse.Namespace, device: str, command: list[str]) -> int:
    import timm

    from . import bench
    from .outputs import write_csv

    names = args.models or ["resnet50"]
    unknown = [n for n in names if not timm.is_model(n)]
    if unknown:
        raise _UsageError(f"unknown timm model(s) {unknown}; see timm.list_models()")
    amp = None if args.amp in (None, "none") else args.amp
    if amp == "fp16" and not device.startswith("cuda"):
        raise _UsageError("--amp fp16 needs CUDA; use --amp bf16 on the CPU")
    out = _make_folder("--out", args.out)
    batch, img_size, classes = args.batch or 8, args.img_size or 224, args.classes or 1000
    cases = bench.default_cases(names)
    model_rows = bench.run_models_bench(cases, batch=batch, img_size=img_size, num_classes=classes,
                                        steps=args.steps or 5, device=device, amp=amp)
    head_rows = bench.run_head_bench(bench.head_cases(cases, img_size, classes), batch=batch, device=device)
    print(bench.format_models_tables(model_rows, head_rows))
    written = [write_csv(model_rows, out / "models.csv")]
    if head_rows:
        written.append(write_csv(head_rows, out / "head.csv"))
    bench.plot_models(model_rows, head_rows, out / "models.png")
    written += [out / "models.png", bench.write_models_page(model_rows, head_rows, out,
                                                            bench.machine_stamp(command, device))]
    print(f"\nwrote {', '.join(map(str, written[:-1]))} and {written[-1]}")
    return 0


# ---- covpool demo --------------------------------------------------------------------------------------


def _demo_parser(mode: str) -> _Parser:
    """The parser of ``covpool demo`` in ``mode`` (``"main"``, ``"hybrid"`` or ``"heads"``): each mode's
    --help describes that demo and its options."""
    from . import demo

    about, output_dir, example = {"hybrid": (demo.HYBRID_ABOUT, "runs/hybrid_demo", "epochs=6"),
                                  "heads": (demo.HEADS_ABOUT, "runs/heads_demo", "epochs=2"),
                                  "main": (demo.DEMO_ABOUT, "runs/demo", "epochs=2")}[mode]
    parser = _Parser(prog="covpool demo", description=about, formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Head options (model.head, model.covpool.*, model.backend_schedule) reach only the "
                            "second-order runs.\nEvery run's config is checked before anything is trained.")
    parser.add_argument("--skip-training", action="store_true", help="only the backend table")
    parser.add_argument("--hybrid", action="store_true",
                        help="instead: NS only, SVD-Pade only and the hybrid protocol side by side (same budget); "
                             "`covpool demo --hybrid --help` for its options")
    parser.add_argument("--heads", action="store_true",
                        help="instead: average pooling and the second-order heads side by side (same budget); "
                             "`covpool demo --heads --help` for its options")
    parser.add_argument("--output-dir", default=output_dir, help=f"parent folder of the runs (default {output_dir})")
    if mode == "main":
        parser.add_argument("--seeds", type=int, default=3,
                            help="seeds per variant, from the config's seed (default 3; 0, 1, 2)")
    if mode == "hybrid":
        parser.add_argument("--switch", type=int, default=2, help="epochs of NS before the hybrid run switches (2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"config overrides for the runs, e.g. {example} data.embedded_train_per_class=40")
    return parser


def demo_main(argv: Sequence[str] | None = None) -> int:
    """``covpool demo [--skip-training] [--seeds N] [--output-dir DIR] [--no-progress] [key=value ...]``,
    ``covpool demo --hybrid [--switch N] [--output-dir DIR] [--no-progress] [key=value ...]`` and
    ``covpool demo --heads [--output-dir DIR] [--no-progress] [key=value ...]``."""
    prog = "covpool demo"
    argv = list(sys.argv[1:] if argv is None else argv)

    from . import demo
    from .train import ConfigError

    try:
        mode = "hybrid" if "--hybrid" in argv else "heads" if "--heads" in argv else "main"
        args = _parse(_demo_parser(mode), argv)
        if args.hybrid and args.heads:
            raise _UsageError("--hybrid and --heads are two demos: choose one")
        if args.skip_training and (mode != "main" or args.overrides):
            raise _UsageError("--skip-training prints only the backend table: it takes no "
                              + ("--hybrid or --heads" if mode != "main" else "key=value overrides"))
        if mode == "main" and args.seeds < 1:
            raise _UsageError(f"--seeds must be at least 1, got {args.seeds}")
        if mode == "main" and args.skip_training:
            demo.compare_backends()
            return 0
        _make_folder("--output-dir", args.output_dir)
        extra = (*args.overrides, *(("progress=false",) if args.no_progress else ()))
        if mode == "hybrid":
            if args.switch < 1:
                raise _UsageError(f"--switch must be at least 1 epoch, got {args.switch}")
            return demo.run_hybrid_demo(args.output_dir, args.switch, extra)
        if mode == "heads":
            return demo.run_heads_demo(args.output_dir, extra)
        return demo.run_demo(args.output_dir, extra, seeds=args.seeds)
    except _UsageError as err:
        return _usage_error(prog, err)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        status = _report(err, (ConfigError,))
        if status is None:
            raise
        return status


# ---- dispatch ------------------------------------------------------------------------------------------

# command -> (function, one-line help); each imports its modules only when its command runs.
# Modules of the `train` extra (pyproject.toml): the library works without them, the commands do not.
_TRAIN_EXTRA = frozenset({"yaml", "tqdm", "matplotlib", "skimage"})

# The one-line helps live in _covpool_cli.COMMANDS, which answers `covpool --help` without importing the package.
_RUNNERS: dict[str, Callable[[list[str]], int]] = {
    "train": train_main, "eval": eval_main, "predict": predict_main, "bench": bench_main, "demo": demo_main,
}
_COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    name: (_RUNNERS[name], help_) for name, help_ in _launcher.COMMANDS.items()
}


def _usage() -> str:
    return _launcher.usage()


def main(argv: Sequence[str] | None = None) -> int:
    """``covpool <command> [options]``: run one command and return its exit status."""
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
    try:
        return int(_COMMANDS[command][0](rest) or 0)
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
