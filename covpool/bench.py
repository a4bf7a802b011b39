"""``covpool bench``: time and accuracy of every backend, in units of one batched matrix product; and, with
``--models``, what a second-order head costs in a whole training step.

Backends: times are medians from :mod:`torch.utils.benchmark`; each is also divided by the time of one
batched product ``bmm`` of the same shape ("product equivalents"), which makes figures comparable across
machines. Accuracy is measured against float64 eigendecomposition on three matrix families.

Models (``--models``): a training step is forward, backward and an SGD step (momentum 0.9) on one random batch;
the models are built first and then stepped in turn, step by step, so that a drift of the machine's speed
reaches them all alike; each figure is the median over the steps, and each ratio is taken within the run. Each
model's second-order pooling is then timed alone, as that model builds it and at the shape it receives there,
with the same batch, on both sides of the Gram choice, with the bytes autograd keeps for its backward.

Both modes can write a Markdown page of their tables (``backends.md``, ``models.md``) headed by a
:func:`machine_stamp` line, which ``covpool bench`` does in its ``--out`` folder.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

from . import layers, linalg, models
from .outputs import cpu_description, first_line, new_figure, save_figure, write_markdown_page
from .outputs import format_table as _table
from .testing import exact_grad, exact_root, ill_conditioned, rank_deficient, repeated_eigenvalues, well_conditioned

__all__ = ["Variant", "default_variants", "product_count", "run_bench", "format_table", "plot", "RANK_DEFICIENT_NOTE",
           "BenchError", "ModelCase", "default_cases", "run_models_bench", "HeadCase", "head_cases", "run_head_bench",
           "saved_bytes", "format_models_tables", "plot_models", "machine_stamp", "write_backends_page",
           "write_models_page"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One column of the benchmark: a backend with options, or a baseline function."""

    label: str
    backend: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    baseline: Callable[[torch.Tensor, bool], torch.Tensor] | None = None

    def __call__(self, a: torch.Tensor, inverse: bool) -> torch.Tensor:
        if self.baseline is not None:
            return self.baseline(a, inverse)
        fn = linalg.inv_sqrtm if inverse else linalg.sqrtm
        return fn(a, self.backend, **dict(self.options))


def _matrix_sqrth(a: torch.Tensor, inverse: bool) -> torch.Tensor:
    s = torch.linalg.matrix_sqrth(a)
    return torch.cholesky_inverse(torch.linalg.cholesky(s)) if inverse else s


def _eigh_autograd(a: torch.Tensor, inverse: bool) -> torch.Tensor:
    lam, v = torch.linalg.eigh(a)
    lam = lam.clamp_min(torch.finfo(a.dtype).eps * lam[..., -1:])
    f = lam.rsqrt() if inverse else lam.sqrt()
    return (v * f.unsqueeze(-2)) @ v.mT


def default_variants(quick: bool = False) -> list[Variant]:
    """Every backend at its defaults, the accuracy options, and the two baselines."""
    variants = [Variant(name, name) for name in linalg.list_backends()]
    if not quick:
        variants += [
            Variant("ns fro", "ns", (("norm", "fro"),)),
            Variant("ns 10", "ns", (("num_iters", 10),)),
            Variant("mtp_lya 20", "mtp_lya", (("degree", 20),)),
            Variant("mpa_lya 8/8", "mpa_lya", (("degree", (8, 8)),)),
            Variant("mpa_lya refine 2", "mpa_lya", (("refine", 2),)),
            Variant("mtp_lya refine 2", "mtp_lya", (("refine", 2),)),
        ]
    variants += [Variant("matrix_sqrth", baseline=_matrix_sqrth), Variant("eigh autograd", baseline=_eigh_autograd)]
    return variants


def product_count(variant: Variant, inverse: bool = False) -> tuple[int, int] | None:
    """(forward, forward+backward) batched products the algorithm performs, as its backend declares them
    (:meth:`covpool.linalg.Backend.products`); None for baselines and backends that declare none."""
    if variant.backend is None:
        return None
    return linalg.get_backend(variant.backend).products(inverse, **dict(variant.options))


def _time(fn: Callable[[], Any], device: torch.device, min_run_time: float) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


FAMILIES: dict[str, Callable[..., torch.Tensor]] = {
    "well-conditioned": lambda b, n: well_conditioned(b, n, seed=1),
    "rank-deficient": lambda b, n: rank_deficient(b, n, max(2, n // 4), seed=2),
    "repeated": lambda b, n: repeated_eigenvalues(b, n, seed=3),
    "ill-conditioned": lambda b, n: ill_conditioned(b, n, kappa=100.0, seed=4),
}


def _errors(variant: Variant, n: int, inverse: bool, device: torch.device, batch: int = 4) -> dict[str, float]:
    """Relative forward and gradient errors (float32 computation vs float64 exact) per family.

    The upstream gradient is not symmetric on purpose: every backend (and both baselines) returns the
    symmetric gradient for it, torch's convention, and so does the Daleckii–Krein reference, so the
    comparison is like with like and a backend breaking the convention shows up as a large error.
    """
    out = {}
    g = torch.randn(batch, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for family, make in FAMILIES.items():
        a64 = make(batch, n)
        if family == "rank-deficient":
            # A ridge of 1e-3 × the mean eigenvalue keeps the exact gradient finite (it is infinite at 0).
            ridge = 1e-3 * a64.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
            a64 = a64 + ridge * torch.eye(n, dtype=torch.float64)
        x = a64.to(device=device, dtype=torch.float32).requires_grad_()
        y = variant(x, inverse)
        (grad,) = torch.autograd.grad(y, x, g.to(device=device, dtype=torch.float32))
        ref = exact_root(a64, inverse)
        out[f"fwd err {family}"] = float((y.detach().cpu().double() - ref).norm() / ref.norm())
        ref_g = exact_grad(a64, g, inverse)
        out[f"grad err {family}"] = float((grad.cpu().double() - ref_g).norm() / ref_g.norm())
    return out


def run_bench(
    variants: Sequence[Variant] | None = None,
    batch: int = 64,
    dims: Sequence[int] = (32, 64, 128, 256, 512),
    device: str | torch.device = "cpu",
    inverse: bool = False,
    compile: bool = False,
    min_run_time: float = 0.2,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measure ``variants`` (default: :func:`default_variants`) at ``batch`` × ``dims``; one row each."""
    from tqdm import tqdm

    device = torch.device(device)
    variants = list(variants or default_variants())
    if compile:
        variants += [
            Variant(f"{v.label} compiled", baseline=_compiled(v))
            for v in variants if v.backend in ("ns", "mtp_lya", "mpa_lya")
        ]
    rows = []
    jobs = [(n, v) for n in dims for v in variants]
    for n, variant in tqdm(jobs, desc="bench", disable=not progress):
        a = well_conditioned(batch, n, dtype=torch.float32, seed=0).to(device)
        x = a.clone().requires_grad_()
        g = torch.randn_like(a)
        t_mm = _time(lambda: torch.bmm(a, a), device, min_run_time)

        def fwd():
            with torch.no_grad():
                return variant(a, inverse)

        def fwd_bwd():
            return torch.autograd.grad(variant(x, inverse), x, g)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_f = _time(fwd, device, min_run_time)
        t_fb = _time(fwd_bwd, device, min_run_time)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        counts = product_count(variant, inverse)
        row = {
            "variant": variant.label, "batch": batch, "d": n, "device": device.type,
            "root": "inv" if inverse else "sqrt",
            "bmm ms": 1e3 * t_mm, "fwd ms": 1e3 * t_f, "fwd+bwd ms": 1e3 * t_fb,
            "fwd prod-eq": t_f / t_mm, "fwd+bwd prod-eq": t_fb / t_mm,
            "products fwd": counts[0] if counts else None, "products fwd+bwd": counts[1] if counts else None,
            "peak MiB": peak,
        }
        row.update(_errors(variant, min(n, 128), inverse, device))
        rows.append(row)
    return rows


def _compiled(variant: Variant) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    compiled = {inv: torch.compile(linalg.inv_sqrtm if inv else linalg.sqrtm, fullgraph=True) for inv in (False, True)}
    return lambda a, inverse: compiled[inverse](a, variant.backend, **dict(variant.options))


TABLE_COLUMNS = ("variant", "d", "fwd ms", "fwd+bwd ms", "fwd prod-eq", "fwd+bwd prod-eq", "products fwd+bwd",
                 "fwd err well-conditioned", "fwd err ill-conditioned", "grad err well-conditioned",
                 "grad err rank-deficient", "grad err repeated")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """Markdown table of ``rows`` (:func:`covpool.outputs.format_table`)."""
    return _table(rows, columns, markdown=True)


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Time against d per variant, and the accuracy/cost frontier at the largest d ≤ 256."""
    fig = new_figure((13, 5))
    ax_t, ax_f = fig.subplots(1, 2)
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    for i, label in enumerate(labels):
        rs = [r for r in rows if r["variant"] == label]
        # Ten colours cycle; the line style tells apart the variants that share one.
        ax_t.plot([r["d"] for r in rs], [r["fwd+bwd ms"] for r in rs], marker="o", label=label,
                  linestyle=("-", "--", ":")[i // 10 % 3])
    ax_t.set(xscale="log", yscale="log", xlabel="d", ylabel="forward+backward time (ms)",
             title=f"batch {rows[0]['batch']}, {rows[0]['device']}, {rows[0]['root']}")
    ax_t.legend(fontsize=7)
    d_front = max((r["d"] for r in rows if r["d"] <= 256), default=rows[0]["d"])
    front = [r for r in rows if r["d"] == d_front]
    for family, marker in (("well-conditioned", "o"), ("ill-conditioned", "x")):
        xs = [r["fwd+bwd prod-eq"] for r in front]
        ys = [max(r[f"fwd err {family}"], 1e-8) for r in front]
        ax_f.scatter(xs, ys, marker=marker, label=family)
        for r, x, y in zip(front, xs, ys):
            ax_f.annotate(r["variant"], (x, y), fontsize=6)
    ax_f.legend(fontsize=7)
    ax_f.set(xscale="log", yscale="log", xlabel="forward+backward cost (product equivalents)",
             ylabel="forward relative error", title=f"accuracy / cost, d = {d_front} (errors at d <= 128)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


#: what the rank-deficient gradient column measures (the demo and the benchmark page print it beside the table)
RANK_DEFICIENT_NOTE = (
    "grad err rank-deficient: 3/4 of the eigenvalues sit at a ridge of 1e-3 x the mean one, where the exact "
    "gradient's term 1/(sqrt(l_i) + sqrt(l_j)) is ~100x its size elsewhere, so >99.9% of the exact gradient's "
    "norm lies between those eigenvalues. The approximate backends bound that term by design (the SVD family's "
    "Taylor/Pade series, the iterations' fixed-degree polynomials): at d = 64 they reproduce 4-21% of it "
    "(svd_pi twice it), hence 0.92-0.98, while on the rest of the gradient they are 0.6-34% off, as on the "
    "other matrices.")


class BenchError(ValueError):
    """A benchmark that cannot run as asked: a model that cannot be measured, or one that cannot take a training
    step at the requested batch and image size. The message names the model and what to change."""


# ------------------------------------------------------------------------------------------ --models
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
        return models.swap_pooling(model, **options)

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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    amp: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Median training-step time of each case and its ratio to its baseline's, measured in one run.

    Raises:
        BenchError: a case cannot be built (e.g. a model that already pools with covariance), or cannot take
            a training step on ``batch`` images of ``img_size``² (the message quotes the model's own error,
            e.g. BatchNorm's on a 1×1 map of one image).
    """
    from tqdm import tqdm

    device = torch.device(device)
    cases = list(cases or default_cases())
    amp_dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(num_classes, (batch,), device=device)
    built = []
    for case in cases:
        model = _build(case, num_classes).to(device).train()
        built.append((model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        _synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _synchronize(device)
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
            "amp": amp or "none", "step ms": 1e3 * medians[case.label],
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
            _synchronize(device)
            start = time.perf_counter()
            pool(x).sum().backward()
            _synchronize(device)
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
                "kept for backward MiB": saved_bytes(lambda module=module: module(x)) / 2**20,
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
                     + _table(model_rows, MODEL_COLUMNS, markdown=True))
    if head_rows:
        h = head_rows[0]
        parts.append(f"Each model's second-order pooling alone, forward and backward, batch {h['batch']}, "
                     f"{h['device']}, on the Gram side where it is cheaper and on the d x d side; the memory is "
                     "what autograd keeps for the backward:\n\n" + _table(head_rows, HEAD_COLUMNS, markdown=True))
    return parts


def format_models_tables(model_rows: Sequence[dict[str, Any]], head_rows: Sequence[dict[str, Any]]) -> str:
    """The two Markdown tables: training steps, and each model's head alone."""
    return "\n\n".join(_models_sections(model_rows, head_rows))


def plot_models(model_rows: Sequence[dict[str, Any]], head_rows: Sequence[dict[str, Any]], path: str) -> None:
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


# ------------------------------------------------------------------------------------------ Markdown pages
def machine_stamp(command: Sequence[str], device: str | torch.device | None = None) -> str:
    """One line saying when, on what and by which command figures were measured: the date, the CPU
    (:func:`covpool.outputs.cpu_description`) and torch's CPU threads, the GPU (its name, ``none``, or ``not
    used`` when ``device`` is not a CUDA device), the torch version and ``command`` (the argument list,
    quoted as a shell needs it), so that re-measuring is re-running the command.

    >>> machine_stamp(["covpool", "bench", "--out", "my bench"]).endswith("by `covpool bench --out 'my bench'`.")
    True
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device if device.type == "cuda" else None)
        gpu += "" if device.type == "cuda" else " (not used)"
    else:
        gpu = "none"
    return (f"Measured {datetime.date.today().isoformat()} on {cpu_description()}, {torch.get_num_threads()} torch "
            f"threads, GPU: {gpu}, torch {torch.__version__}, by `{shlex.join(command)}`.")


def write_backends_page(rows: Sequence[dict[str, Any]], folder: str | os.PathLike, stamp: str) -> Path:
    """``backends.md`` in ``folder``: ``stamp`` (:func:`machine_stamp`), the table of every
    column :func:`run_bench` measured, what the columns mean, and the plot ``bench.png`` beside it."""
    first = rows[0]
    root = "inverse square root" if first["root"] == "inv" else "square root"
    about = (f"Batch {first['batch']}, {root}, float32, {first['device']}; times are medians of "
             "torch.utils.benchmark, prod-eq = time / one batched d x d product measured in the same run, products = "
             "the batched products the algorithm and its backward perform (- for the eigendecomposition backends). "
             "Errors are relative Frobenius errors against float64 eigendecomposition, at d = min(d, 128). "
             + RANK_DEFICIENT_NOTE)
    columns = [c for c in first if c not in ("batch", "device", "root")]
    return write_markdown_page(Path(folder) / "backends.md", "Square-root backends", stamp,
                               [about, _table(rows, columns, markdown=True)], [Path(folder) / "bench.png"])


def write_models_page(model_rows: Sequence[dict[str, Any]], head_rows: Sequence[dict[str, Any]],
                      folder: str | os.PathLike, stamp: str) -> Path:
    """``models.md`` in ``folder``: ``stamp``, the training-step and head tables, and the plot ``models.png``."""
    return write_markdown_page(Path(folder) / "models.md", "What a second-order head costs in a training step",
                               stamp, _models_sections(model_rows, head_rows), [Path(folder) / "models.png"])
