"""``make demo`` / ``covpool demo``: the backend comparison, then average vs covariance pooling.

1. Every square-root backend on random covariance matrices (batch 16, 64×64, float32): forward error
   against the exact root, gradient error against the exact float64 gradient, and time.
2. The same small backbone trained twice on covpool's embedded texture task, once with average pooling
   and once with covariance pooling, with the same budget (see :mod:`covpool.train.demo`).

``covpool demo --hybrid`` instead trains the covariance-pooling run three times: Newton–Schulz only,
SVD-Padé only and the hybrid protocol (NS, then SVD-Padé; see :mod:`covpool.train.hybrid_demo`).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]

_COLUMNS = ("variant", "fwd err well-conditioned", "grad err well-conditioned", "grad err rank-deficient",
            "grad err repeated", "fwd ms", "fwd+bwd ms", "fwd+bwd prod-eq")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="covpool demo", description=__doc__.splitlines()[0])
    parser.add_argument("--skip-training", action="store_true", help="only the backend comparison")
    parser.add_argument("--hybrid", action="store_true",
                        help="instead: NS only, SVD-Padé only and the hybrid protocol side by side (same budget); "
                             "`covpool demo --hybrid --help` for its options")
    args, rest = parser.parse_known_args(argv)
    if args.hybrid:
        from .train.hybrid_demo import run_hybrid_demo

        return run_hybrid_demo(list(rest))

    from .bench import default_variants, format_table, run_bench

    print("== 1. Square-root backends: batch 16 of 64×64 covariance matrices, float32, this CPU ==")
    rows = run_bench(default_variants(quick=True), batch=16, dims=[64], min_run_time=0.05, progress=False)
    print(format_table(rows, _COLUMNS))
    print("errors are relative Frobenius errors against float64 eigendecomposition; prod-eq = time / one "
          "batched 64×64 product\n")
    if args.skip_training:
        return 0
    from .train.demo import run_demo

    print("== 2. Average pooling vs covariance pooling on the embedded texture task ==")
    return run_demo(list(rest))
