"""``make demo`` / ``covpool demo``: the backend comparison, then average vs covariance pooling over seeds.

1. Every square-root backend on random covariance matrices (batch 16, 64×64, float32): forward error
   against the exact root, gradient error against the exact float64 gradient, and time
   (:func:`compare_backends`), with a note on what the rank-deficient gradient column measures.
2. The same small backbone trained on covpool's embedded texture task, once with average pooling and once
   with covariance pooling, with the same budget, for each of several seeds; each variant's mean and spread
   over the seeds and a verdict that says whether the difference exceeds that spread (:func:`run_demo`).

``covpool demo --hybrid`` instead trains the covariance-pooling run three times: Newton–Schulz only,
SVD-Padé only and the hybrid protocol (NS, then SVD-Padé; :func:`run_hybrid_demo`). ``covpool demo --heads``
trains the average-pooling run and one run per second-order head (:func:`run_heads_demo`). The command line's
options are parsed in :mod:`covpool.cli`.

Overrides (``key=value``) apply to every run they concern: head options (``model.head``,
``model.covpool.*``, ``model.backend_schedule``) only to the second-order runs. Every run's config is built
and checked (:func:`covpool.train.check_config`) before anything is trained, so a mistake costs no training.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypedDict

from .train.config import ConfigError, TrainConfig, load_config, shipped_configs

if TYPE_CHECKING:
    from .train import TrainResult

__all__ = ["DEMO_VARIANTS", "HYBRID_VARIANTS", "DEMO_ABOUT", "HYBRID_ABOUT", "HEADS_ABOUT", "is_head_option",
           "demo_config", "hybrid_demo_config", "heads_demo_config", "demo_configs", "hybrid_demo_configs",
           "heads_demo_configs", "seed_summary", "verdict", "compare_backends", "run_demo", "run_hybrid_demo",
           "run_heads_demo"]

# The texts of `covpool demo --help` (plain text: argparse prints them as they are).
DEMO_ABOUT = """\
The backend table, then average vs covariance pooling on the embedded texture task, over several seeds.

1. Every square-root backend on 16 random 64x64 covariance matrices (float32): forward error against the
   exact root, gradient errors against the exact float64 gradient, and time on this machine.
2. ResNet-18 (random init, 56x56 input, 3 epochs) trained with the same data, schedule and number of steps,
   once with global average pooling and once with iSQRT-COV covariance pooling as the paper builds it
   (covpool.swap_pooling: 64-dim reduction, Newton-Schulz square root, last stage at stride 1 so that each
   covariance comes from 4x4 positions instead of 2x2; that stage then costs 4x the compute), for each of
   --seeds seeds. It prints each variant's mean validation accuracy and its spread over the seeds, and a
   verdict line that says whether the difference is larger than that spread. Outputs go to
   runs/demo/<variant>_seed<N>/ and the mean curves to runs/demo/comparison.png.
"""

HYBRID_ABOUT = """\
NS only, SVD-Pade only and the hybrid protocol side by side on the embedded texture task.

Song, Sebe and Wang, "Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance
Pooling?", ICCV 2021, train with Newton-Schulz first and switch to SVD-Pade later. This trains the demo's
covariance-pooling ResNet-18 (random init, 56x56 input, 64-dim reduction, last stage at stride 1) three
times with the same seed, data, schedule and number of steps, differing only in model.backend_schedule, and
prints the three results. It is a toy: one seed, a few epochs, eight classes; the paper's gains (0.1-0.2
points of ImageNet top-1) are far below this task's seed-to-seed noise, so read the table as what the three
runs did here, not as a verdict on the protocol. Outputs go to runs/hybrid_demo/<variant>/.
"""

HEADS_ABOUT = """\
Average pooling and the second-order heads on the embedded texture task, side by side.

The demo's ResNet-18 (random init, 56x56 input, 3 epochs) is trained once with average pooling and once per
head of covpool.list_heads() that pools feature maps (covpool.swap_pooling(model, head=...) with the demo's
64-channel reduction and the last stage at stride 1), with the same seed, data, schedule and steps, and a
table of validation accuracy, training throughput and feature width is printed. model.head=NAME (or a list,
model.head=[bcnn,mpn_cov]) trains only those heads; model.covpool.* options reach every head run. It is a toy:
one seed, a few epochs, eight classes; differences of a few points are seed noise, and DropCov's drop rate is
tuned for 256 channels (at 64 it rarely drops). Read it as what the heads cost and that they all train, not
as a ranking. Outputs go to runs/heads_demo/<head>/.
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

_HEAD_KEYS = ("model.head", "model.covpool", "model.backend_schedule")


def is_head_option(override: str) -> bool:
    """Whether a ``key=value`` override configures the second-order head (``model.head``, ``model.covpool``
    and its keys, ``model.backend_schedule``), which an average-pooling run has not.

    >>> is_head_option("model.covpool.backend=eig"), is_head_option("epochs=2")
    (True, False)
    """
    key = override.split("=", 1)[0].strip()
    return any(key == k or key.startswith(k + ".") for k in _HEAD_KEYS)


def demo_config(variant: str, output_dir: str = "runs/demo", extra: Sequence[str] = ()) -> TrainConfig:
    """The config of one demo run (``variant`` in :data:`DEMO_VARIANTS`), with ``key=value`` extras; the
    average-pooling run leaves out the head options among them (:func:`is_head_option`)."""
    if variant not in DEMO_VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; valid: {', '.join(DEMO_VARIANTS)}")
    if not DEMO_VARIANTS[variant]:
        extra = [e for e in extra if not is_head_option(e)]
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
    """Print part 1 of the demo: every backend's errors and time on 16 random 64×64 covariances, and what
    the rank-deficient gradient column measures (:data:`covpool.bench.RANK_DEFICIENT_NOTE`)."""
    import textwrap

    from .bench import RANK_DEFICIENT_NOTE, default_variants, run_bench
    from .outputs import format_table

    print("== 1. Square-root backends: batch 16 of 64×64 covariance matrices, float32, this CPU ==")
    rows = run_bench(default_variants(quick=True), batch=16, dims=[64], min_run_time=0.05, progress=False)
    print(format_table(rows, _COLUMNS, markdown=True))
    print("errors are relative Frobenius errors against float64 eigendecomposition; prod-eq = time / one "
          "batched 64×64 product")
    print(textwrap.fill(RANK_DEFICIENT_NOTE, width=118) + "\n")


def _environment() -> str:
    import torch

    threads = torch.get_num_threads()
    return f"torch {torch.__version__}, {threads} CPU thread{'s' if threads != 1 else ''}"


def _checked(configs: Mapping[str, TrainConfig]) -> Mapping[str, TrainConfig]:
    """``configs``, each checked as ``covpool train`` checks it before building anything."""
    from .train import check_config

    for cfg in configs.values():
        check_config(cfg)
    return configs


def _stopped(result: TrainResult) -> bool:
    if result.interrupted:
        print(f"\nthe demo stops here: the run in {result.run_dir} was interrupted", flush=True)
    return result.interrupted


def seed_summary(accuracies: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (nan for one value), minimum and maximum of one variant's accuracies
    over the seeds.

    >>> seed_summary([80.0, 82.0, 84.0])
    {'mean': 82.0, 'sd': 2.0, 'min': 80.0, 'max': 84.0}
    """
    values = [float(a) for a in accuracies]
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return {"mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values)}


def verdict(avgpool: Sequence[float], covpool: Sequence[float]) -> str:
    """The demo's verdict line on the two variants' accuracies per seed (same seeds, same order).

    The difference of the means counts as within the spread when it is no larger than the sum of the two
    standard deviations over seeds (about 2.4 standard errors of the difference for 3 seeds): a conservative
    rule, since a newcomer reads this line as "which pooling is better".

    >>> print(verdict([84.0, 86.0, 85.0], [85.0, 85.5, 86.0]))  # doctest: +NORMALIZE_WHITESPACE
    verdict: covpool - avgpool = +0.50 points (means of 3 seeds), within the seed-to-seed spread (sd 1.00 and
    0.50): no difference can be claimed at this budget; covpool was ahead in 2 of 3 seeds
    """
    a, c = seed_summary(avgpool), seed_summary(covpool)
    diff = c["mean"] - a["mean"]
    n = len(avgpool)
    head = f"verdict: covpool - avgpool = {diff:+.2f} points (means of {n} seed{'s' if n > 1 else ''})"
    if n < 2:
        return head + ": one seed has no spread to compare the difference with; run with --seeds 3 or more"
    ahead = sum(cv > av for av, cv in zip(avgpool, covpool))
    spread = f"the seed-to-seed spread (sd {a['sd']:.2f} and {c['sd']:.2f})"
    if abs(diff) <= a["sd"] + c["sd"]:
        return (f"{head}, within {spread}: no difference can be claimed at this budget; covpool was ahead in "
                f"{ahead} of {n} seeds")
    winner = "covpool" if diff > 0 else "avgpool"
    return (f"{head}, larger than {spread}: {winner} is ahead at this budget on this toy task; covpool was ahead in "
            f"{ahead} of {n} seeds")


def _mean_history(histories: Sequence[Sequence[Mapping]]) -> list[dict[str, float]]:
    """Per epoch, the mean over seeds of the curves' metrics (runs of one variant have the same epochs)."""
    keys = ("train_loss", "val_loss", "train_acc", "val_acc1")
    return [{"epoch": rows[0]["epoch"], **{k: statistics.fmean(r[k] for r in rows) for k in keys}}
            for rows in zip(*histories)]


def demo_configs(output_dir: str = "runs/demo", extra: Sequence[str] = (), seeds: int = 3
                 ) -> dict[tuple[str, int], TrainConfig]:
    """Every run of the main demo, ``(variant, seed) -> config``, checked: seeds ``s, s+1, ...`` from the
    config's ``seed`` (0, or an override), runs in ``<output_dir>/<variant>_seed<N>/``.

    Raises:
        ConfigError: an override is wrong (unknown key, value out of range, an option the model refuses).
        ValueError: ``seeds`` is not a positive integer.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive number of runs per variant, got {seeds!r}")
    first = demo_config("avgpool", output_dir, extra).seed
    configs = {(variant, seed): demo_config(variant, output_dir, (*extra, f"name={variant}_seed{seed}", f"seed={seed}"))
               for seed in range(first, first + seeds) for variant in DEMO_VARIANTS}
    _checked({f"{v} seed {s}": cfg for (v, s), cfg in configs.items()})
    return configs


def run_demo(output_dir: str = "runs/demo", extra: Sequence[str] = (), seeds: int = 3, backends: bool = True) -> int:
    """The demo: the backend table (``backends``), then the two :data:`DEMO_VARIANTS` trained with each of
    ``seeds`` seeds (``extra`` overrides applied to the runs they concern), each variant's mean and spread of
    the final validation accuracy, and :func:`verdict`. Every config is checked before anything runs.

    Returns:
        0, or the exit status of an interrupted run (the demo stops there).
    """
    from .train import train
    from .train.summary import plot_curves

    configs = demo_configs(output_dir, extra, seeds)
    seed_list = sorted({seed for _, seed in configs})
    if backends:
        compare_backends()
    epochs = next(iter(configs.values())).epochs
    print("== 2. Average pooling vs covariance pooling on the embedded texture task ==")
    print(f"covpool demo: ResNet-18 from scratch on the embedded texture task (8 classes, patches of scikit-image's "
          f"sample photos; validation patches come from unseen regions), {epochs} epochs per run", flush=True)
    print(f"  {_environment()}; each seed gives both variants the same data, order and steps; seeds "
          f"{', '.join(map(str, seed_list))}", flush=True)
    results: dict[str, list] = {variant: [] for variant in DEMO_VARIANTS}
    for (variant, seed), cfg in configs.items():
        pooling = "covariance pooling (iSQRT-COV, 64x64 covariance)" if cfg.model.swap_pooling else \
            "global average pooling"
        print(f"\n== {variant}, seed {seed}: {pooling} ==", flush=True)
        start = time.perf_counter()
        result = train(cfg, overwrite=True)
        if _stopped(result):
            return result.exit_code
        results[variant].append((result, time.perf_counter() - start))

    plot = plot_curves({(f"{v} (mean of {len(runs)} seeds)" if len(runs) > 1 else v):
                        _mean_history([r.history for r, _ in runs]) for v, runs in results.items()},
                       Path(output_dir) / "comparison.png",
                       title="ResNet-18 on the embedded texture task: average vs covariance pooling")
    accuracies = {v: [r.final["val_acc1"] for r, _ in runs] for v, runs in results.items()}
    print(f"\n== result: final validation accuracy over {len(seed_list)} seed{'s' if len(seed_list) > 1 else ''}, "
          f"{epochs} epochs each ==")
    for variant, runs in results.items():
        s = seed_summary(accuracies[variant])
        per_seed = " ".join(f"{a:.2f}" for a in accuracies[variant])
        print(f"  {variant:<8}  mean {s['mean']:6.2f}%  sd {s['sd']:5.2f}  range {s['min']:.2f}-{s['max']:.2f}  "
              f"(per seed: {per_seed})  {statistics.fmean(t for _, t in runs):5.1f} s per run", flush=True)
    print(verdict(accuracies["avgpool"], accuracies["covpool"]))
    print(f"  mean curves: {plot}  (per run: {Path(output_dir)}/<variant>_seed<N>/metrics.csv, curves.png)")
    return 0


def hybrid_demo_configs(output_dir: str = "runs/hybrid_demo", switch: int = 2, extra: Sequence[str] = ()
                        ) -> dict[str, TrainConfig]:
    """The three runs of the hybrid demo, ``variant -> config``, checked before anything runs."""
    return dict(_checked({v: hybrid_demo_config(v, switch, output_dir, tuple(extra)) for v in HYBRID_VARIANTS}))


class _RunSummary(TypedDict):
    """What the hybrid demo keeps of a finished run (not the model)."""

    final: dict[str, Any]
    best: float
    best_epoch: int
    history: list[dict[str, Any]]


def run_hybrid_demo(output_dir: str = "runs/hybrid_demo", switch: int = 2, extra: Sequence[str] = ()) -> int:
    """Train the three :data:`HYBRID_VARIANTS` with the same budget and print their accuracy, loss and time."""
    from .train import NonFiniteLossError, train
    from .train.summary import format_history, plot_curves

    configs = hybrid_demo_configs(output_dir, switch, extra)
    epochs = configs["hybrid"].epochs
    print(f"covpool hybrid demo: ResNet-18 + covariance pooling from scratch on the embedded texture task, "
          f"{epochs} epochs each; the hybrid run uses ns for {switch} and svd_pade after", flush=True)
    print(f"  {_environment()}; same seed, data and steps for the three runs", flush=True)
    results: dict[str, tuple[_RunSummary | None, float, str]] = {}
    for variant, cfg in configs.items():
        print(f"\n== {variant}: model.backend_schedule={cfg.model.backend_schedule} ==", flush=True)
        start = time.perf_counter()
        try:
            result = train(cfg, overwrite=True)
        except NonFiniteLossError as err:
            results[variant] = (None, time.perf_counter() - start, f"stopped: {err}".split(". ")[0])
            continue
        if _stopped(result):
            return result.exit_code
        done: _RunSummary = {"final": result.final, "best": result.best_acc1, "best_epoch": result.best_epoch,
                             "history": result.history}
        results[variant] = (done, time.perf_counter() - start, "")

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


def heads_demo_configs(output_dir: str = "runs/heads_demo", extra: Sequence[str] = ()) -> dict[str, TrainConfig]:
    """The runs of the heads demo, ``name -> config`` (``"avgpool"`` first), checked before anything runs:
    every map head of :func:`covpool.list_heads`, or those a ``model.head=NAME`` / ``model.head=[A, B]`` override
    names; the other head options (``model.covpool.*``) reach every head run.

    Raises:
        ConfigError: an unknown or token-only head, or any other mistake in the overrides.
    """
    import yaml

    import covpool

    maps = [h for h in covpool.list_heads() if not covpool.get_head(h).tokens_only]
    chosen = [e.split("=", 1)[1] for e in extra if e.split("=", 1)[0].strip() == "model.head"]
    extra = [e for e in extra if e.split("=", 1)[0].strip() != "model.head"]
    heads = maps
    if chosen:
        value = yaml.safe_load(chosen[-1])
        heads = [str(h) for h in (value if isinstance(value, list) else [value])]
        for head in heads:
            if head not in maps:  # an unknown name: the config check names the closest one
                if head in covpool.list_heads():
                    raise ConfigError(f"model.head={head} pools transformer tokens; the heads demo trains a ResNet: "
                                      f"choose among {', '.join(maps)}")
                _checked({head: heads_demo_config(head, output_dir, extra)})
    return dict(_checked({"avgpool": heads_demo_config(None, output_dir, extra),
                          **{h: heads_demo_config(h, output_dir, extra) for h in heads}}))


def run_heads_demo(output_dir: str = "runs/heads_demo", extra: Sequence[str] = ()) -> int:
    """Train average pooling and every map head of :func:`covpool.list_heads` (or the ``model.head`` override's)
    with the same budget and print their accuracy, throughput and feature width."""
    import covpool

    from .outputs import format_table
    from .train import NonFiniteLossError, train
    from .train.summary import plot_curves

    configs = heads_demo_configs(output_dir, extra)
    heads = [name for name in configs if name != "avgpool"]
    print(f"covpool heads demo: ResNet-18 from scratch on the embedded texture task, average pooling and "
          f"{len(heads)} second-order heads, {configs['avgpool'].epochs} epochs each", flush=True)
    print(f"  {_environment()}; same seed, data and steps for every run", flush=True)
    rows: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, Any]]] = {}
    for name, cfg in configs.items():
        print(f"\n== {name}: {covpool.get_head(name).paper if name != 'avgpool' else 'global average pooling'} ==",
              flush=True)
        start = time.perf_counter()
        try:
            result = train(cfg, overwrite=True)
        except NonFiniteLossError as err:
            rows.append({"head": name, "note": f"stopped: {err}".split(". ")[0]})
            continue
        if _stopped(result):
            return result.exit_code
        histories[name] = result.history
        rates = sorted(r["train_img_per_s"] for r in result.history)
        model = result.model
        assert model is not None  # train() returns the model it trained
        rows.append({"head": name, "val acc %": result.final["val_acc1"], "best %": result.best_acc1,
                     "train img/s": rates[len(rates) // 2], "features": model.head_hidden_size
                     if hasattr(model, "head_hidden_size") else model.num_features,
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
