"""NS only, SVD-Padé only and the hybrid protocol side by side on the embedded texture task.

Song, Sebe and Wang, "Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance
Pooling?", ICCV 2021, train with Newton–Schulz first and switch to SVD-Padé later. This trains the demo's
covariance-pooling ResNet-18 (``covpool demo``'s "covpool" run: random init, 56x56 input, 64-dim reduction,
last stage at stride 1) three times with the same seed, data, schedule and number of steps, differing only in
``model.backend_schedule``, and prints the three results. It is a toy: one seed, a few epochs, eight classes;
the paper's gains (0.1-0.2 points of ImageNet top-1) are far below this task's seed-to-seed noise, so read the
table as "what the three runs did here", not as a verdict on the protocol. Outputs go to
``runs/hybrid_demo/<variant>/``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .config import TrainConfig
from .demo import demo_config

__all__ = ["HYBRID_VARIANTS", "hybrid_demo_config", "run_hybrid_demo"]

HYBRID_VARIANTS = ("ns", "svd_pade", "hybrid")


def _schedule(variant: str, switch: int) -> str:
    return {"ns": "[[0, ns]]", "svd_pade": "[[0, svd_pade]]", "hybrid": f"[[0, ns], [{switch}, svd_pade]]"}[variant]


def hybrid_demo_config(variant: str, switch: int = 2, output_dir: str = "runs/hybrid_demo",
                       extra: tuple[str, ...] = ()) -> TrainConfig:
    """The config of one run: the demo's covariance-pooling run with ``variant``'s backend schedule
    (``"hybrid"`` switches from ``ns`` to ``svd_pade`` after ``switch`` epochs) and ``key=value`` extras."""
    if variant not in HYBRID_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(HYBRID_VARIANTS)}")
    if isinstance(switch, bool) or not isinstance(switch, int) or switch < 1:
        raise ValueError(f"switch must be a positive number of epochs, got {switch!r}")
    return demo_config("covpool", output_dir, (f"model.backend_schedule={_schedule(variant, switch)}",
                                               f"name={variant}", "epochs=4", *extra))


def run_hybrid_demo(argv: list[str]) -> int:
    """Train the three variants with the same budget and print their accuracy, loss and time."""
    parser = argparse.ArgumentParser(prog="covpool demo --hybrid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/hybrid_demo", help="parent folder of the three runs")
    parser.add_argument("--switch", type=int, default=2, help="epochs of NS before the hybrid run switches (2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="applied to all runs, e.g. epochs=6 data.embedded_train_per_class=40")
    args = parser.parse_args(argv)

    import torch

    from .engine import NonFiniteLossError, format_table, train

    extra = (*args.overrides, *(("progress=false",) if args.no_progress else ()))
    configs = {v: hybrid_demo_config(v, args.switch, args.output_dir, tuple(extra)) for v in HYBRID_VARIANTS}
    epochs = configs["hybrid"].epochs
    print(f"covpool hybrid demo: ResNet-18 + covariance pooling from scratch on the embedded texture task, "
          f"{epochs} epochs each; the hybrid run uses ns for {args.switch} and svd_pade after", flush=True)
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} CPU threads; same seed, data and steps for the "
          "three runs", flush=True)
    results: dict[str, tuple[dict | None, float, str]] = {}
    for variant, cfg in configs.items():
        print(f"\n== {variant}: model.backend_schedule={cfg.model.backend_schedule} ==", flush=True)
        start = time.perf_counter()
        try:
            result = train(cfg, overwrite=True)
            summary = {"final": result.final, "best": result.best_acc1, "best_epoch": result.best_epoch,
                       "history": result.history}
            results[variant] = (summary, time.perf_counter() - start, "")
        except NonFiniteLossError as err:
            results[variant] = (None, time.perf_counter() - start, f"stopped: {err}".split(". ")[0])

    print(f"\n== result ({epochs} epochs each; one seed, so differences of a few points are noise) ==")
    for variant, (summary, seconds, note) in results.items():
        if summary is None:
            print(f"  {variant:<9} {note}  {seconds:6.1f} s")
            continue
        final = summary["final"]
        print(f"  {variant:<9} val acc {final['val_acc1']:6.2f}% (best {summary['best']:.2f}% at epoch "
              f"{summary['best_epoch']})  val loss {final['val_loss']:.3f}  train loss {final['train_loss']:.3f}  "
              f"{seconds:6.1f} s")
    for variant, (summary, _, _) in results.items():
        if summary is not None:
            print(f"\n{variant} (backend per epoch: {', '.join(r.get('backend', '') for r in summary['history'])})")
            print(format_table(summary["history"]))
    from ._plot import plot_comparison

    plot = plot_comparison({v: s["history"] for v, (s, _, _) in results.items() if s is not None},
                           Path(args.output_dir) / "comparison.png",
                           title="ResNet-18 + covariance pooling: NS, SVD-Pade and NS -> SVD-Pade")
    print(f"\n  curves: {plot}  (per run: {Path(args.output_dir)}/<variant>/metrics.csv with the backend of each "
          "epoch, curves.png)")
    return 0
