"""The model benchmark (``covpool bench --models``): what a second-order head costs in a whole training step.

A training step is forward, backward and an SGD step (momentum 0.9) on one random batch; the models are built
first and then stepped in turn, step by step, so that a drift of the machine's speed reaches them all alike;
each figure is the median over the steps, and each ratio is taken within the run. Each model's second-order
pooling is then timed alone, as that model builds it and at the shape it receives there, with the same batch,
on both sides of the Gram choice, with the bytes autograd keeps for its backward. :func:`write_outputs` writes
what ``covpool bench --models`` leaves in its ``--out`` folder.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import layers, linalg
from ..models import swap_pooling
from ..outputs import first_line, format_table, new_figure, save_figure, write_csv, write_markdown_page
from ..precision import amp_mode
from ._common import BenchError, machine_stamp, synchronize

__all__ = ["ModelCase", "default_cases", "run_models_bench", "HeadCase", "head_cases", "run_head_bench", "saved_bytes",
           "MODEL_COLUMNS", "HEAD_COLUMNS", "format_models_tables", "plot_models", "write_models_page",
           "write_outputs"]


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One row: a label, a builder ``(num_classes) -> model``, and the label of the row it is compared to."""

    label: str
    build: Callable[[int], nn.Module]
    baseline: str
    note: str = ""


def _timm(name: str, **kwargs: Any) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import timm

        return timm.create_model(name, num_classes=num_classes, **kwargs)

    return build


def _second_order_pool(model: nn.Module) -> layers.CovPool | None:
    """The model's covariance pooling (the first :class:`covpool.CovPool` in it), or None."""
    return next((m for m in model.modules() if isinstance(m, layers.CovPool)), None)


def _swapped(name: str, **options: Any) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        model = _timm(name)(num_classes)
        if _second_order_pool(model) is not None or any(isinstance(m, layers.SoViTHead) for m in model.modules()):
            base = name.removesuffix("_isqrt")
            hint = f" (--models {base} measures {name} beside it)" if base != name and _is_timm_model(base) else ""
            raise BenchError(f"{name} is one of covpool's own models, already with second-order pooling: --models "
                             f"takes timm backbones with average pooling, e.g. resnet50{hint}")
        return swap_pooling(model, **options)

    return build


def _is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def default_cases(names: Sequence[str] = ("resnet50",)) -> list[ModelCase]:
    """For each timm backbone name: the backbone as timm builds it (average pooling: the baseline), with
    :func:`covpool.swap_pooling` (its own stride; the Gram side where it is cheaper, and forced to the d×d
    side for comparison), and covpool's registered ``<name>_isqrt`` if there is one (the published recipe:
    last stage at stride 1)."""
    cases = []
    for name in names:
        cases += [
            ModelCase(name, _timm(name), name, "average pooling"),
            ModelCase(f"swap_pooling({name})", _swapped(name), name, "its stride, iSQRT-COV head, Gram side"),
            ModelCase(f"swap_pooling({name}, gram=False)", _swapped(name, gram=False), name,
                      "the same on the d×d side (covpool <= 0.1)"),
        ]
        if _is_timm_model(f"{name}_isqrt"):
            cases.append(ModelCase(f"{name}_isqrt", _timm(f"{name}_isqrt"), name, "published recipe, stride 1"))
    return cases


def _build(case: ModelCase, num_classes: int) -> nn.Module:
    try:
        return case.build(num_classes)
    except BenchError:
        raise
    except (ValueError, TypeError) as err:  # swap_pooling's and timm's refusals of a model or option
        raise BenchError(f"cannot build {case.label}: {err}") from err


def run_models_bench(
    cases: Sequence[ModelCase] | None = None,
    batch: int = 8,
    img_size: int = 224,
    num_classes: int = 1000,
    steps: int = 5,
    device: str | torch.device = "cpu",
    amp: str | None = "none",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Median training-step time of each case and its ratio to its baseline's, measured in one run, under the
    mixed-precision mode ``amp`` (:data:`covpool.precision.AMP_MODES`; None is ``"none"``).

    Raises:
        BenchError: a case cannot be built (e.g. a model that already pools with covariance), or cannot take
            a training step on ``batch`` images of ``img_size``² (the message quotes the model's own error,
            e.g. BatchNorm's on a 1×1 map of one image).
    """
    from tqdm import tqdm

    device = torch.device(device)
    cases = list(cases or default_cases())
    mode = amp_mode(amp or "none")
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(num_classes, (batch,), device=device)
    built = []
    for case in cases:
        model = _build(case, num_classes).to(device).train()
        built.append((model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)))
    scaler = torch.amp.GradScaler(device.type, enabled=mode.scaled)

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with mode.autocast(device):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        synchronize(device)
        return time.perf_counter() - start

    for case, (model, optimizer) in zip(cases, built):  # warm-up: allocations, kernel choices, lazy initialisation
        try:
            step(model, optimizer)
        except (ValueError, RuntimeError) as err:
            raise BenchError(f"{case.label} cannot take a training step on a batch of {batch} at {img_size}x"
                             f"{img_size}: {first_line(err)} (change --batch or --img-size)") from err
    times: list[list[float]] = [[] for _ in built]
    for _ in tqdm(range(steps), desc="bench --models", disable=not progress):
        for i, (model, optimizer) in enumerate(built):
            times[i].append(step(model, optimizer))
    medians = {case.label: statistics.median(t) for case, t in zip(cases, times)}
    rows = []
    for case, (model, _) in zip(cases, built):
        rows.append({
            "model": case.label, "note": case.note, "batch": batch, "img_size": img_size, "device": device.type,
            "amp": mode.name, "step ms": 1e3 * medians[case.label],
            "vs baseline": medians[case.label] / medians[case.baseline], "baseline": case.baseline,
            "params M": sum(p.numel() for p in model.parameters()) / 1e6,
        })
    return rows


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``fn()`` (its saved tensors), each storage
    counted once."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@dataclasses.dataclass(frozen=True)
class HeadCase:
    """A model's second-order pooling alone: the model's label, the pooling module (a
    :class:`covpool.CovPool`) and the shape of one image's input to it (``(C, H, W)`` or ``(N, C)``)."""

    model: str
    pool: nn.Module
    shape: tuple[int, ...]


def head_cases(cases: Sequence[ModelCase], img_size: int = 224, num_classes: int = 1000) -> list[HeadCase]:
    """The covariance pooling of each case that has one, with the shape it receives at ``img_size``
    (one forward pass of one image, on the CPU); a pooling that differs from an earlier one only in its Gram
    side is left out, as :func:`run_head_bench` times both sides."""
    found: dict[tuple[str, tuple[int, ...]], HeadCase] = {}
    x = torch.randn(1, 3, img_size, img_size)
    for case in cases:
        model = _build(case, num_classes).eval()
        pool = _second_order_pool(model)
        if pool is None:
            continue
        shapes = []
        handle = pool.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape[1:])))
        try:
            with torch.no_grad():
                model(x)
        except (ValueError, RuntimeError) as err:
            raise BenchError(f"{case.label} cannot take an image of {img_size}x{img_size}: {first_line(err)} "
                             "(change --img-size)") from err
        finally:
            handle.remove()
        options = sorted((k, repr(v)) for k, v in vars(pool).items() if not k.startswith("_") and k != "gram")
        key = (repr(options), shapes[0])
        found.setdefault(key, HeadCase(case.label, pool, shapes[0]))
    return list(found.values())


def _backend_label(spec: Any) -> str:
    """``"ns"`` or ``{"name": "ns", "num_iters": 5}`` as ``ns`` / ``ns(num_iters=5)``."""
    if isinstance(spec, str):
        return spec
    options = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({options})" if options else str(spec["name"])


def _positions(shape: tuple[int, ...]) -> tuple[str, int]:
    if len(shape) == 3:
        return f"{shape[1]}x{shape[2]}", shape[1] * shape[2]
    return f"{shape[0]} tokens", shape[0]


def run_head_bench(
    heads: Sequence[HeadCase],
    batch: int = 8,
    reps: int = 10,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Each head of ``heads`` alone (as its model builds it: reduction, covariance, backend, vectorisation),
    forward and backward on ``batch`` random inputs of its shape, on the Gram side where it is cheaper and on
    the d×d side, interleaved; with the bytes each keeps for its backward. One row per head and side."""
    import copy

    from tqdm import tqdm

    device = torch.device(device)
    rows = []
    for case in tqdm(heads, desc="bench --models (head)", disable=not progress):
        x = torch.randn(batch, *case.shape, device=device, requires_grad=True)
        pools = {}
        for side in ("auto", False):
            pools[side] = copy.deepcopy(case.pool).to(device).train()
            pools[side].gram = side

        def run(pool: nn.Module) -> float:
            synchronize(device)
            start = time.perf_counter()
            pool(x).sum().backward()
            synchronize(device)
            return time.perf_counter() - start

        for pool in pools.values():
            run(pool)
        times: dict[Any, list[float]] = {side: [] for side in pools}
        for _ in range(reps):
            for side, pool in pools.items():
                times[side].append(run(pool))
        base = statistics.median(times[False])
        positions, samples = _positions(case.shape)
        pool = case.pool
        head = f"CovPool({pool.in_channels} -> {pool.dim}, {_backend_label(pool.backend)})"
        for side, module in pools.items():
            gram = linalg.resolve_backend(pool.backend)[0].uses_gram(pool.dim, samples, side)
            rows.append({
                "model": case.model, "head": head,
                "positions": positions, "side": "Gram" if gram else "d x d", "batch": batch, "device": device.type,
                "fwd+bwd ms": 1e3 * statistics.median(times[side]),
                "speed-up vs d x d": base / statistics.median(times[side]),
                "kept for backward MiB": saved_bytes(functools.partial(module, x)) / 2**20,
            })
    return rows


MODEL_COLUMNS = ("model", "note", "step ms", "vs baseline", "params M")
HEAD_COLUMNS = ("model", "head", "positions", "side", "fwd+bwd ms", "speed-up vs d x d", "kept for backward MiB")


def _models_sections(model_rows: Sequence[dict[str, Any]], head_rows: Sequence[dict[str, Any]]) -> list[str]:
    parts = []
    if model_rows:
        r = model_rows[0]
        parts.append(f"Training step (forward, backward, SGD), batch {r['batch']} at {r['img_size']}x{r['img_size']}, "
                     f"{r['device']}, amp {r['amp']}; median of the steps, ratio to the baseline in this run:\n\n"
                     + format_table(model_rows, MODEL_COLUMNS, markdown=True))
    if head_rows:
        h = head_rows[0]
        parts.append(f"Each model's second-order pooling alone, forward and backward, batch {h['batch']}, "
                     f"{h['device']}, on the Gram side where it is cheaper and on the d x d side; the memory is "
                     "what autograd keeps for the backward:\n\n" + format_table(head_rows, HEAD_COLUMNS, markdown=True))
    return parts


def format_models_tables(model_rows: Sequence[dict[str, Any]], head_rows: Sequence[dict[str, Any]]) -> str:
    """The two Markdown tables: training steps, and each model's head alone."""
    return "\n\n".join(_models_sections(model_rows, head_rows))


def plot_models(model_rows: Sequence[dict[str, Any]], head_rows: Sequence[dict[str, Any]], path: str | Path
                ) -> None:
    """Step-time ratios of the models, and each head's time and the memory it keeps for backward per side."""
    fig = new_figure((12, 4.5))
    ax_m, ax_h = fig.subplots(1, 2)
    labels = [r["model"] for r in model_rows]
    ax_m.barh(range(len(labels)), [r["vs baseline"] for r in model_rows], color="tab:blue")
    ax_m.axvline(1.0, color="black", linewidth=0.8)
    ax_m.set_yticks(range(len(labels)), labels, fontsize=8)
    ax_m.invert_yaxis()
    if model_rows:
        r = model_rows[0]
        ax_m.set(xlabel="training step time / baseline's", title=f"batch {r['batch']} at {r['img_size']}², "
                 f"{r['device']}, amp {r['amp']}")
    names = [f"{r['head']}\n{r['positions']} {r['side']}" for r in head_rows]
    ax_h.bar(range(len(names)), [r["fwd+bwd ms"] for r in head_rows], color="tab:orange")
    ax_h.set_xticks(range(len(names)), names, fontsize=7)
    ax_h.set(ylabel="head forward+backward (ms)",
             title=f"the head alone, batch {head_rows[0]['batch']}" if head_rows else "")
    for i, r in enumerate(head_rows):
        ax_h.annotate(f"{r['kept for backward MiB']:.3g} MiB kept\nfor backward", (i, r["fwd+bwd ms"]), ha="center",
                      va="bottom", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)



def write_models_page(model_rows: Sequence[dict[str, Any]], head_rows: Sequence[dict[str, Any]],
                      folder: str | os.PathLike, stamp: str) -> Path:
    """``models.md`` in ``folder``: ``stamp``, the training-step and head tables, and the plot ``models.png``."""
    return write_markdown_page(Path(folder) / "models.md", "What a second-order head costs in a training step",
                               stamp, _models_sections(model_rows, head_rows), [Path(folder) / "models.png"])


def write_outputs(model_rows: Sequence[dict[str, Any]], head_rows: Sequence[dict[str, Any]], folder: str | os.PathLike,
                  command: Sequence[str], device: str | torch.device) -> list[Path]:
    """What ``covpool bench --models`` writes into its ``--out`` folder: ``models.csv``, ``head.csv`` (when a
    model has a covariance pooling), the plot ``models.png`` and the page ``models.md`` stamped with
    ``command`` (:func:`machine_stamp`)."""
    folder = Path(folder)
    written = [write_csv(model_rows, folder / "models.csv")]
    if head_rows:
        written.append(write_csv(head_rows, folder / "head.csv"))
    plot_models(model_rows, head_rows, folder / "models.png")
    return [*written, folder / "models.png", write_models_page(model_rows, head_rows, folder,
                                                              machine_stamp(command, device))]
