"""The training half of ``make demo``: average vs covariance pooling on the embedded texture task.

ResNet-18 (random init, 56x56 input) is trained twice with the same seed, data, schedule and number of
steps: once as is, with global average pooling, and once with iSQRT-COV covariance pooling as the paper
builds it (``covpool.swap_pooling``: 64-dim reduction, Newton-Schulz square root, last stage at stride 1
so each covariance is estimated from 4x4 positions instead of 2x2; that stage then costs 4x the
compute). Outputs go to ``runs/demo/``.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from .config import TrainConfig, load_config

__all__ = ["run_demo", "demo_config", "DEMO_VARIANTS"]

# variant -> overrides on top of the shared settings (configs/demo.yaml holds the "avgpool" one)
DEMO_VARIANTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "avgpool": (),
    "covpool": ("model.swap_pooling=true", "model.covpool.reduced_dim=64", "model.covpool.backend=ns",
                "model.covpool.last_stride=1"),
})

_SHARED = (
    "model.name=resnet18",
    "data.dataset=embedded", "data.img_size=56", "data.batch_size=32", "data.workers=0",
    "data.embedded_train_per_class=100", "data.embedded_val_per_class=40",
    "optim.opt=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=5e-4", "optim.sched=cosine",
    "optim.warmup_epochs=0", "epochs=3", "seed=0", "amp=none",
)


def demo_config(variant: str, output_dir: str = "runs/demo", extra: tuple[str, ...] = ()) -> TrainConfig:
    """The config of one demo run (``variant`` in :data:`DEMO_VARIANTS`), with ``key=value`` extras."""
    if variant not in DEMO_VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; valid: {', '.join(DEMO_VARIANTS)}")
    return load_config(None, [*_SHARED, *DEMO_VARIANTS[variant], f"name={variant}", f"output_dir={output_dir}",
                              *extra])


def run_demo(argv: list[str]) -> int:
    """Train the two demo variants and print their validation accuracy, time and plot location."""
    parser = argparse.ArgumentParser(prog="covpool demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/demo", help="parent folder of the two runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="applied to both runs, e.g. epochs=2 data.embedded_train_per_class=40")
    args = parser.parse_args(argv)

    import torch

    from ._plot import plot_comparison
    from .engine import train

    extra = (*args.overrides, *(("progress=false",) if args.no_progress else ()))
    print("covpool demo: ResNet-18 from scratch on the embedded texture task (8 classes, patches of scikit-image's "
          "sample photos; validation patches come from unseen regions)", flush=True)
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} CPU threads; the same seed, data and steps "
          "for both runs", flush=True)
    results = {}
    for variant in DEMO_VARIANTS:
        cfg = demo_config(variant, args.output_dir, extra)
        print(f"\n== {variant}: {'covariance pooling (iSQRT-COV, 64x64 covariance)' if cfg.model.swap_pooling else 'global average pooling'} ==",
              flush=True)
        start = time.perf_counter()
        result = train(cfg, overwrite=True)
        results[variant] = (result, time.perf_counter() - start)

    plot = plot_comparison({name: res.history for name, (res, _) in results.items()},
                           Path(args.output_dir) / "comparison.png",
                           title="ResNet-18 on the embedded texture task: average vs covariance pooling")
    print("\n== result ==")
    for name, (res, seconds) in results.items():
        final = res.final
        print(f"  {name:<8}  val acc {final['val_acc1']:6.2f}% (best {res.best_acc1:.2f}% at epoch {res.best_epoch})"
              f"  val loss {final['val_loss']:.3f}  {seconds:6.1f} s")
    print(f"  curves: {plot}  (per run: {Path(args.output_dir)}/<variant>/metrics.csv, curves.png)")
    return 0
