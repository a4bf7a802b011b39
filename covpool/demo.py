"""``make demo`` / ``covpool demo``: the backend comparison, then average vs covariance pooling.

1. Every square-root backend on random covariance matrices (batch 16, 64×64, float32): forward error
   against the exact root, gradient error against the exact float64 gradient, and time
   (:func:`compare_backends`).
2. The same small backbone trained twice on covpool's embedded texture task, once with average pooling
   and once with covariance pooling, with the same budget (:func:`run_demo`).

``covpool demo --hybrid`` instead trains the covariance-pooling run three times: Newton–Schulz only,
SVD-Padé only and the hybrid protocol (NS, then SVD-Padé; :func:`run_hybrid_demo`). ``covpool demo --heads``
trains the average-pooling run and one run per second-order head (:func:`run_heads_demo`). The command line's
options are parsed in :mod:`covpool.cli`.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from .train.config import TrainConfig, load_config, shipped_configs

__all__ = ["DEMO_VARIANTS", "HYBRID_VARIANTS", "demo_config", "hybrid_demo_config", "heads_demo_config",
           "compare_backends", "run_demo", "run_hybrid_demo", "run_heads_demo"]

TRAINING_ABOUT = """Average vs covariance pooling on the embedded texture task.

ResNet-18 (random init, 56x56 input) is trained twice with the same seed, data, schedule and number of
steps: once as is, with global average pooling, and once with iSQRT-COV covariance pooling as the paper
builds it (``covpool.swap_pooling``: 64-dim reduction, Newton-Schulz square root, last stage at stride 1
so each covariance is estimated from 4x4 positions instead of 2x2; that stage then costs 4x the
compute). Outputs go to ``runs/demo/``.
"""

HYBRID_ABOUT = """NS only, SVD-Padé only and the hybrid protocol side by side on the embedded texture task.

Song, Sebe and Wang, "Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance
Pooling?", ICCV 2021, train with Newton–Schulz first and switch to SVD-Padé later. This trains the demo's
covariance-pooling ResNet-18 (``covpool demo``'s "covpool" run: random init, 56x56 input, 64-dim reduction,
last stage at stride 1) three times with the same seed, data, schedule and number of steps, differing only in
``model.backend_schedule``, and prints the three results. It is a toy: one seed, a few epochs, eight classes;
the paper's gains (0.1-0.2 points of ImageNet top-1) are far below this task's seed-to-seed noise, so read the
table as "what the three runs did here", not as a verdict on the protocol. Outputs go to
``runs/hybrid_demo/<variant>/``.
"""

HEADS_ABOUT = """Average pooling and every second-order head on the embedded texture task, side by side.

The demo's ResNet-18 (random init, 56x56 input, 3 epochs) is trained once with average pooling and once per
head of ``covpool.list_heads()`` that pools feature maps (``covpool.swap_pooling(model, head=...)`` with the
demo's 64-channel reduction and the last stage at stride 1), with the same seed, data, schedule and steps, and a
table of validation accuracy, training throughput and feature width is printed. It is a toy: one seed, a few
epochs, eight classes; differences of a few points are seed noise, and DropCov's drop rate is tuned for 256
channels (at 64 it rarely drops). Read it as what the heads cost and that they all train, not as a ranking.
Outputs go to ``runs/heads_demo/<head>/``.
"""

_COLUMNS = ("variant", "fwd err well-conditioned", "grad err well-conditioned", "grad err rank-deficient",
            "grad err repeated", "fwd ms", "fwd+bwd ms", "fwd+bwd prod-eq")

# variant -> overrides on top of the shipped config `demo` (configs/demo.yaml: the "avgpool" run, and every
# setting the runs share)
DEMO_VARIANTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "avgpool": (),
    "covpool": ("model.swap_pooling=true", "model.covpool.reduced_dim=64", "model.covpool.backend=ns",
                "model.covpool.last_stride=1"),
})

HYBRID_VARIANTS = ("ns", "svd_pade", "hybrid")


def demo_config(variant: str, output_dir: str = "runs/demo", extra: Sequence[str] = ()) -> TrainConfig:
    """The config of one demo run (``variant`` in :data:`DEMO_VARIANTS`), with ``key=value`` extras."""
    if variant not in DEMO_VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; valid: {', '.join(DEMO_VARIANTS)}")
    return load_config(shipped_configs()["demo"], [*DEMO_VARIANTS[variant], f"name={variant}",
                                                   f"output_dir={output_dir}", *extra])


def _schedule(variant: str, switch: int) -> str:
    return {"ns": "[[0, ns]]", "svd_pade": "[[0, svd_pade]]", "hybrid": f"[[0, ns], [{switch}, svd_pade]]"}[variant]


def hybrid_demo_config(variant: str, switch: int = 2, output_dir: str = "runs/hybrid_demo",
                       extra: Sequence[str] = ()) -> TrainConfig:
    """The config of one hybrid-demo run: the demo's covariance-pooling run with ``variant``'s backend
    schedule (``"hybrid"`` switches from ``ns`` to ``svd_pade`` after ``switch`` epochs) and ``key=value``
    extras."""
    if variant not in HYBRID_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(HYBRID_VARIANTS)}")
    if isinstance(switch, bool) or not isinstance(switch, int) or switch < 1:
        raise ValueError(f"switch must be a positive number of epochs, got {switch!r}")
    return demo_config("covpool", output_dir, (f"model.backend_schedule={_schedule(variant, switch)}",
                                               f"name={variant}", "epochs=4", *extra))


def heads_demo_config(head: str | None, output_dir: str = "runs/heads_demo", extra: Sequence[str] = ()
                      ) -> TrainConfig:
    """The config of one heads-demo run: the demo's average-pooling run (``head=None``) or its
    covariance-pooling run with ``head`` (a name of :func:`covpool.list_heads`), and ``key=value`` extras."""
    if head is None:
        return demo_config("avgpool", output_dir, (*extra, "name=avgpool"))
    return demo_config("covpool", output_dir, (f"model.head={head}", f"name={head}", *extra))


def compare_backends() -> None:
    """Print part 1 of the demo: every backend's errors and time on 16 random 64×64 covariances."""
    from .bench import default_variants, format_table, run_bench

    print("== 1. Square-root backends: batch 16 of 64×64 covariance matrices, float32, this CPU ==")
    rows = run_bench(default_variants(quick=True), batch=16, dims=[64], min_run_time=0.05, progress=False)
    print(format_table(rows, _COLUMNS))
    print("errors are relative Frobenius errors against float64 eigendecomposition; prod-eq = time / one "
          "batched 64×64 product\n")


def _environment() -> str:
    import torch

    return f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"


def run_demo(output_dir: str = "runs/demo", extra: Sequence[str] = ()) -> int:
    """Part 2: train the two :data:`DEMO_VARIANTS` (``extra`` overrides applied to both) and print their
    validation accuracy, time and plot location."""
    from .train import train
    from .train.summary import plot_curves

    print("== 2. Average pooling vs covariance pooling on the embedded texture task ==")
    print("covpool demo: ResNet-18 from scratch on the embedded texture task (8 classes, patches of scikit-image's "
          "sample photos; validation patches come from unseen regions)", flush=True)
    print(f"  {_environment()}; the same seed, data and steps for both runs", flush=True)
    results = {}
    for variant in DEMO_VARIANTS:
        cfg = demo_config(variant, output_dir, extra)
        pooling = "covariance pooling (iSQRT-COV, 64x64 covariance)" if cfg.model.swap_pooling else \
            "global average pooling"
        print(f"\n== {variant}: {pooling} ==", flush=True)
        start = time.perf_counter()
        result = train(cfg, overwrite=True)
        results[variant] = (result, time.perf_counter() - start)

    plot = plot_curves({name: res.history for name, (res, _) in results.items()},
                           Path(output_dir) / "comparison.png",
                           title="ResNet-18 on the embedded texture task: average vs covariance pooling")
    print("\n== result ==")
    for name, (res, seconds) in results.items():
        final = res.final
        print(f"  {name:<8}  val acc {final['val_acc1']:6.2f}% (best {res.best_acc1:.2f}% at epoch {res.best_epoch})"
              f"  val loss {final['val_loss']:.3f}  {seconds:6.1f} s")
    print(f"  curves: {plot}  (per run: {Path(output_dir)}/<variant>/metrics.csv, curves.png)")
    return 0


def run_hybrid_demo(output_dir: str = "runs/hybrid_demo", switch: int = 2, extra: Sequence[str] = ()) -> int:
    """Train the three :data:`HYBRID_VARIANTS` with the same budget and print their accuracy, loss and time."""
    from .train import NonFiniteLossError, train
    from .train.summary import format_history, plot_curves

    configs = {v: hybrid_demo_config(v, switch, output_dir, tuple(extra)) for v in HYBRID_VARIANTS}
    epochs = configs["hybrid"].epochs
    print(f"covpool hybrid demo: ResNet-18 + covariance pooling from scratch on the embedded texture task, "
          f"{epochs} epochs each; the hybrid run uses ns for {switch} and svd_pade after", flush=True)
    print(f"  {_environment()}; same seed, data and steps for the three runs", flush=True)
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
            print(format_history(summary["history"]))
    plot = plot_curves({v: s["history"] for v, (s, _, _) in results.items() if s is not None},
                           Path(output_dir) / "comparison.png",
                           title="ResNet-18 + covariance pooling: NS, SVD-Pade and NS -> SVD-Pade")
    print(f"\n  curves: {plot}  (per run: {Path(output_dir)}/<variant>/metrics.csv with the backend of each "
          "epoch, curves.png)")
    return 0


def run_heads_demo(output_dir: str = "runs/heads_demo", extra: Sequence[str] = ()) -> int:
    """Train average pooling and every map head of :func:`covpool.list_heads` with the same budget and print
    their accuracy, throughput and feature width."""
    import covpool

    from .outputs import format_table
    from .train import NonFiniteLossError, train
    from .train.summary import plot_curves

    heads = [h for h in covpool.list_heads() if not covpool.get_head(h).tokens_only]
    configs = {"avgpool": heads_demo_config(None, output_dir, extra),
               **{h: heads_demo_config(h, output_dir, extra) for h in heads}}
    print(f"covpool heads demo: ResNet-18 from scratch on the embedded texture task, average pooling and "
          f"{len(heads)} second-order heads, {configs['avgpool'].epochs} epochs each", flush=True)
    print(f"  {_environment()}; same seed, data and steps for every run", flush=True)
    rows, histories = [], {}
    for name, cfg in configs.items():
        print(f"\n== {name}: {covpool.get_head(name).paper if name != 'avgpool' else 'global average pooling'} ==",
              flush=True)
        start = time.perf_counter()
        try:
            result = train(cfg, overwrite=True)
        except NonFiniteLossError as err:
            rows.append({"head": name, "note": f"stopped: {err}".split(". ")[0]})
            continue
        histories[name] = result.history
        rates = sorted(r["train_img_per_s"] for r in result.history)
        rows.append({"head": name, "val acc %": result.final["val_acc1"], "best %": result.best_acc1,
                     "train img/s": rates[len(rates) // 2], "features": result.model.head_hidden_size
                     if hasattr(result.model, "head_hidden_size") else result.model.num_features,
                     "time s": time.perf_counter() - start})
    base = next((r["train img/s"] for r in rows if r["head"] == "avgpool" and "train img/s" in r), None)
    for r in rows:
        if base and "train img/s" in r:
            r["step time vs avgpool"] = base / r["train img/s"]
    print("\n== result (one seed on a small task: differences of a few points are noise) ==")
    print(format_table(rows, ("head", "val acc %", "best %", "train img/s", "step time vs avgpool", "features",
                              "time s", "note"), markdown=True))
    plot = plot_curves(histories, Path(output_dir) / "comparison.png",
                       title="ResNet-18 on the embedded texture task: average pooling and second-order heads")
    print(f"\n  curves: {plot}  (per run: {Path(output_dir)}/<head>/metrics.csv, curves.png)")
    return 0
