"""``covpool demo`` (and ``--hybrid``, ``--heads``): its options, handed to :mod:`covpool.demo`."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._common import Parser, UsageError, make_folder, parse_with_overrides, run

__all__ = ["demo_main"]


def _demo_parser(mode: str) -> Parser:
    """The parser of ``covpool demo`` in ``mode`` (``"main"``, ``"hybrid"`` or ``"heads"``): each mode's
    --help describes that demo and its options."""
    from .. import demo

    about, output_dir, example = {"hybrid": (demo.HYBRID_ABOUT, "runs/hybrid_demo", "epochs=6"),
                                  "heads": (demo.HEADS_ABOUT, "runs/heads_demo", "epochs=2"),
                                  "main": (demo.DEMO_ABOUT, "runs/demo", "epochs=2")}[mode]
    parser = Parser(prog="covpool demo", description=about, formatter_class=argparse.RawDescriptionHelpFormatter,
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
    argv = list(sys.argv[1:] if argv is None else argv)

    from .. import demo
    from ..train import ConfigError

    def command() -> int:
        mode = "hybrid" if "--hybrid" in argv else "heads" if "--heads" in argv else "main"
        args = parse_with_overrides(_demo_parser(mode), argv)
        if args.hybrid and args.heads:
            raise UsageError("--hybrid and --heads are two demos: choose one")
        if args.skip_training and (mode != "main" or args.overrides):
            raise UsageError("--skip-training prints only the backend table: it takes no "
                             + ("--hybrid or --heads" if mode != "main" else "key=value overrides"))
        if mode == "main" and args.seeds < 1:
            raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
        if mode == "main" and args.skip_training:
            demo.compare_backends()
            return 0
        make_folder("--output-dir", args.output_dir)
        extra = (*args.overrides, *(("progress=false",) if args.no_progress else ()))
        if mode == "hybrid":
            if args.switch < 1:
                raise UsageError(f"--switch must be at least 1 epoch, got {args.switch}")
            return demo.run_hybrid_demo(args.output_dir, args.switch, extra)
        if mode == "heads":
            return demo.run_heads_demo(args.output_dir, extra)
        return demo.run_demo(args.output_dir, extra, seeds=args.seeds)

    return run("covpool demo", command, (ConfigError,))
