"""``covpool bench``: its options, handed to :mod:`covpool.bench` (the backend benchmark, or with ``--models`` the
model benchmark), which measures and writes the outputs."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._common import Parser, UsageError, make_folder, run

__all__ = ["bench_main"]

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


def _bench_parser() -> Parser:
    from ..precision import AMP_MODES

    parser = Parser(prog="covpool bench", description=_BENCH_ABOUT,
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
    parser.add_argument("--amp", choices=list(AMP_MODES), help="--models: mixed precision (default none; "
                        + "; ".join(f"{mode.name}: {mode.about}" for mode in AMP_MODES.values()) + ")")
    parser.add_argument("--out", default="bench_out", help="folder for the CSV files, plots and the .md page "
                                                           "(default bench_out)")
    return parser


def _bench_device(value: str | None) -> str:
    """``--device`` checked: a device torch knows and this machine has (default: cuda when available)."""
    import torch

    from ..outputs import first_line

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {value!r} is not a device torch knows; e.g. cpu, cuda, cuda:1, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {value}: torch sees no CUDA device on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, ValueError, AssertionError) as err:  # a backend torch knows but this build or machine lacks
        raise UsageError(f"--device {value} cannot be used here: {first_line(err)}") from None
    return value


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``covpool bench [--quick] [--dims ...] [--inverse] [--compile] [--backends ...] [--out DIR]``, or
    ``covpool bench --models [NAME ...] [--img-size ...] [--steps ...] [--amp ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _bench_parser()

    from .. import bench
    from ..bench import backends
    from ..outputs import format_table

    def command() -> int:
        args = parser.parse_args(argv)
        models_mode = args.models is not None
        wrong = [name for name in (_BACKEND_ONLY if models_mode else _MODELS_ONLY) if getattr(args, name)]
        if wrong:
            option = "--" + wrong[0].replace("_", "-")
            raise UsageError(f"{option} belongs to the backend benchmark, not to --models (which times the heads "
                             "as the models build them): drop one of the two" if models_mode else
                             f"{option} applies to --models only: add --models [NAME ...] or drop {option}")
        for name, value, low in (("--batch", args.batch, 1), ("--img-size", args.img_size, 16),
                                 ("--steps", args.steps, 1), ("--classes", args.classes, 1),
                                 *(("--dims", d, 1) for d in args.dims or ())):
            if value is not None and value < low:
                raise UsageError(f"{name} must be at least {low}, got {value}")
        device = _bench_device(args.device)
        stamp = ["covpool", "bench", *argv]  # the command line a page is stamped with
        if models_mode:
            return _bench_models(args, device, stamp)
        variants = backends.default_variants(quick=args.quick)
        if args.backends:
            unknown = sorted(set(args.backends) - {v.label for v in variants})
            if unknown:
                raise UsageError(f"unknown variant(s) {unknown}; choose from {[v.label for v in variants]}")
            variants = [v for v in variants if v.label in args.backends]
        out = make_folder("--out", args.out)
        batch, dims, min_time = (args.batch or 16, args.dims or [64], 0.05) if args.quick else \
            (args.batch or 64, args.dims or [32, 64, 128, 256, 512], 0.2)
        rows = backends.run_bench(variants, batch, dims, device, args.inverse, args.compile, min_time)
        print(format_table(rows, backends.TABLE_COLUMNS, markdown=True))
        *files, page = backends.write_outputs(rows, out, stamp, device)
        print(f"\nwrote {', '.join(map(str, files))} and {page}")
        return 0

    return run("covpool bench", command, (bench.BenchError,))


def _bench_models(args: argparse.Namespace, device: str, command: list[str]) -> int:
    import timm

    from ..bench import models
    from ..precision import amp_mode

    names = args.models or ["resnet50"]
    unknown = [n for n in names if not timm.is_model(n)]
    if unknown:
        raise UsageError(f"unknown timm model(s) {unknown}; see timm.list_models()")
    amp = amp_mode(args.amp or "none")
    refusal = amp.refusal(device.split(":")[0], option="--amp ")
    if refusal:
        raise UsageError(refusal)
    out = make_folder("--out", args.out)
    batch, img_size, classes = args.batch or 8, args.img_size or 224, args.classes or 1000
    cases = models.default_cases(names)
    model_rows = models.run_models_bench(cases, batch=batch, img_size=img_size, num_classes=classes,
                                         steps=args.steps or 5, device=device, amp=amp.name)
    head_rows = models.run_head_bench(models.head_cases(cases, img_size, classes), batch=batch, device=device)
    print(models.format_models_tables(model_rows, head_rows))
    *files, page = models.write_outputs(model_rows, head_rows, out, command, device)
    print(f"\nwrote {', '.join(map(str, files))} and {page}")
    return 0
