"""The backend benchmark: time and accuracy of every square-root backend, in units of one batched matrix product.

Times are medians from :mod:`torch.utils.benchmark`; each is also divided by the time of one batched product
``bmm`` of the same shape ("product equivalents"), which makes figures comparable across machines. Accuracy is
measured against float64 eigendecomposition on four matrix families. :func:`write_outputs` writes what
``covpool bench`` leaves in its ``--out`` folder: the CSV file, the plot and a Markdown page.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark

from .. import linalg
from ..outputs import format_table, new_figure, save_figure, write_csv, write_markdown_page
from ..testing import exact_grad, exact_root, ill_conditioned, rank_deficient, repeated_eigenvalues, well_conditioned
from ._common import machine_stamp, synchronize

__all__ = ["Variant", "default_variants", "product_count", "FAMILIES", "run_bench", "TABLE_COLUMNS", "plot",
           "RANK_DEFICIENT_NOTE", "write_backends_page", "write_outputs"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One column of the benchmark: a backend with options, or a baseline function.

    Attributes:
        label: the column's name in the table and the plot.
        backend: a registered backend's name (:func:`covpool.list_backends`), None for a baseline.
        options: the backend's options, as ``(name, value)`` pairs (hashable, so a variant is too).
        baseline: ``baseline(a, inverse)``, a function timed instead of a backend (e.g. torch's
            ``matrix_sqrth``); None for a backend.
    """

    label: str
    backend: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    baseline: Callable[[torch.Tensor, bool], torch.Tensor] | None = None

    def __call__(self, a: torch.Tensor, inverse: bool) -> torch.Tensor:
        if self.baseline is not None:
            return self.baseline(a, inverse)
        fn = linalg.inv_sqrtm if inverse else linalg.sqrtm
        return fn(a, self._backend(), **dict(self.options))

    def _backend(self) -> str:
        if self.backend is None:
            raise TypeError(f"variant {self.label!r} has neither a backend nor a baseline")
        return self.backend


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
    synchronize(device)
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

        def fwd() -> torch.Tensor:
            with torch.no_grad():
                return variant(a, inverse)

        def fwd_bwd() -> tuple[torch.Tensor, ...]:
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
    backend = variant._backend()
    return lambda a, inverse: compiled[inverse](a, backend, **dict(variant.options))


TABLE_COLUMNS = ("variant", "d", "fwd ms", "fwd+bwd ms", "fwd prod-eq", "fwd+bwd prod-eq", "products fwd+bwd",
                 "fwd err well-conditioned", "fwd err ill-conditioned", "grad err well-conditioned",
                 "grad err rank-deficient", "grad err repeated")


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
    save_figure(fig, Path(path), dpi=110)


#: what the rank-deficient gradient column measures (the demo and the benchmark page print it beside the table)
RANK_DEFICIENT_NOTE = (
    "grad err rank-deficient: 3/4 of the eigenvalues sit at a ridge of 1e-3 x the mean one, where the exact "
    "gradient's term 1/(sqrt(l_i) + sqrt(l_j)) is ~100x its size elsewhere, so >99.9% of the exact gradient's "
    "norm lies between those eigenvalues. The approximate backends bound that term by design (the SVD family's "
    "Taylor/Pade series, the iterations' fixed-degree polynomials): at d = 64 they reproduce 4-21% of it "
    "(svd_pi twice it), hence 0.92-0.98, while on the rest of the gradient they are 0.6-34% off, as on the "
    "other matrices.")



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
                               [about, format_table(rows, columns, markdown=True)], [Path(folder) / "bench.png"])


def write_outputs(rows: Sequence[dict[str, Any]], folder: str | os.PathLike, command: Sequence[str],
                  device: str | torch.device) -> list[Path]:
    """What ``covpool bench`` writes into its ``--out`` folder: ``bench.csv`` (every column of every row),
    the plot ``bench.png`` and the page ``backends.md`` stamped with ``command`` (:func:`machine_stamp`)."""
    folder = Path(folder)
    csv_path = write_csv(rows, folder / "bench.csv")
    plot(rows, folder / "bench.png")
    page = write_backends_page(rows, folder, machine_stamp(command, device))
    return [csv_path, folder / "bench.png", page]


def _markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """What ``covpool.bench.format_table`` was: :func:`covpool.outputs.format_table` in Markdown, with the
    benchmark's columns by default."""
    return format_table(rows, columns, markdown=True)
