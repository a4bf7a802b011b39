"""`covpool bench`: the figures it reports are consistent, and the quick mode writes its outputs."""
import csv

import pytest
import torch

import covpool.testing  # noqa: F401  (used in the compile test)
from covpool.bench import TABLE_COLUMNS, Variant, default_variants, product_count, run_bench
from covpool.cli import bench_main
from covpool.outputs import format_table


def test_product_counts_follow_the_algorithms():
    assert product_count(Variant("ns", "ns")) == (12, 36)
    assert product_count(Variant("ns 10", "ns", (("num_iters", 10),))) == (27, 81)
    # MTP degree 10 by Paterson–Stockmeyer: X², X³ and 3 Horner steps; Lyapunov 8 steps: 7·5 + 3.
    assert product_count(Variant("mtp_lya", "mtp_lya")) == (5, 43)
    # MPA [5/5]: X², X³, one Horner step per polynomial, one Cholesky solve.
    assert product_count(Variant("mpa_lya", "mpa_lya")) == (5, 43)
    assert product_count(Variant("mpa_lya", "mpa_lya"), inverse=True) == (5, 46)
    assert product_count(Variant("mpa_lya", "mpa_lya", (("refine", 2),))) == (11, 49)
    assert product_count(Variant("eig", "eig")) is None


def test_run_bench_rows_are_consistent():
    variants = [v for v in default_variants(quick=True) if v.label in ("eig", "ns", "matrix_sqrth")]
    rows = run_bench(variants, batch=4, dims=[16], min_run_time=0.01, progress=False)
    assert [r["variant"] for r in rows] == ["eig", "ns", "matrix_sqrth"]
    for r in rows:
        assert r["fwd+bwd prod-eq"] == pytest.approx(r["fwd+bwd ms"] / r["bmm ms"])
        assert r["fwd ms"] > 0 and r["fwd+bwd ms"] > 0
    eig, ns, native = rows
    assert eig["fwd err well-conditioned"] < 1e-5 and native["fwd err well-conditioned"] < 1e-5
    assert eig["grad err well-conditioned"] < 1e-4
    assert ns["fwd err well-conditioned"] > 1e-3  # 5 trace-normalised steps are visibly approximate
    assert "| eig | 16 |" in format_table(rows, TABLE_COLUMNS, markdown=True)


def test_gradient_error_compares_like_with_like():
    # Every gradient and the exact reference follow the symmetric convention, so a converged iteration
    # reports a small gradient error (it read ~1.0 when ns's gradient was not symmetric).
    (row,) = run_bench([Variant("ns 20", "ns", (("num_iters", 20),))], batch=2, dims=[16], min_run_time=0.01,
                       progress=False)
    assert row["grad err well-conditioned"] < 1e-4 and row["grad err repeated"] < 1e-4


def test_quick_cli_writes_table_csv_and_png(tmp_path, capsys):
    assert bench_main(["--quick", "--backends", "eig", "mpa_lya", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| mpa_lya | 64 |" in out
    with open(tmp_path / "bench.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == ["eig", "mpa_lya"]
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_unknown_variant_is_an_error(capsys):
    assert bench_main(["--quick", "--backends", "nope"]) == 2
    assert "unknown variant(s) ['nope']" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ns", "mtp_lya", "mpa_lya"])
def test_torch_compile_fullgraph_matches_eager(backend):
    import covpool

    a = covpool.testing.well_conditioned(3, 12, dtype=torch.float32, seed=0)
    for fn in (covpool.sqrtm, covpool.inv_sqrtm):
        covpool.testing.assert_compiles_like_eager(lambda m, fn=fn: fn(m, backend), a)


def test_models_mode_times_steps_and_each_models_head_and_writes_its_outputs(tmp_path, capsys):
    """The head test takes each model's own pooling at the shape it gets there and --batch (it was fixed at
    batch 32 and 2048 channels whatever the models: 31 of 43 s); memory is labelled as kept for backward; a
    Markdown page with the stamp line, the tables and the plot is written beside the CSV files."""
    argv = ["--models", "resnet18", "--batch", "2", "--img-size", "64", "--steps", "2", "--classes", "5",
            "--out", str(tmp_path)]
    assert bench_main(argv) == 0
    out = capsys.readouterr().out
    assert "| swap_pooling(resnet18) |" in out and "| resnet18_isqrt |" in out and "kept for backward" in out
    with open(tmp_path / "models.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["resnet18", "swap_pooling(resnet18)", "swap_pooling(resnet18, gram=False)",
                                          "resnet18_isqrt"]
    assert float(rows[0]["vs baseline"]) == 1.0 and all(float(r["step ms"]) > 0 for r in rows)
    with open(tmp_path / "head.csv") as f:
        head = list(csv.DictReader(f))
    # resnet18 at 64²: 512 channels, 2×2 maps at its stride and 4×4 at the published stride 1; 4 and 16 positions
    # of 256 channels: the Gram side where it is cheaper
    assert [(r["model"], r["head"], r["positions"], r["side"], r["batch"]) for r in head] == [
        ("swap_pooling(resnet18)", "CovPool(512 -> 256, ns)", "2x2", "Gram", "2"),
        ("swap_pooling(resnet18)", "CovPool(512 -> 256, ns)", "2x2", "d x d", "2"),
        ("resnet18_isqrt", "CovPool(512 -> 256, ns(num_iters=5))", "4x4", "Gram", "2"),
        ("resnet18_isqrt", "CovPool(512 -> 256, ns(num_iters=5))", "4x4", "d x d", "2")]
    assert float(head[0]["kept for backward MiB"]) < float(head[1]["kept for backward MiB"])
    assert (tmp_path / "models.png").stat().st_size > 1000
    page = (tmp_path / "models.md").read_text().splitlines()
    assert page[0] == "# What a second-order head costs in a training step"
    assert page[2].startswith("Measured ") and f"torch {torch.__version__}" in page[2] and "GPU: " in page[2]
    assert page[2].endswith(f"by `covpool bench {' '.join(argv)}`.")
    assert "| resnet18_isqrt | published recipe, stride 1 |" in "\n".join(page)
    assert page[-1] == "![models.png](models.png)"


def test_quick_cli_writes_a_markdown_page_with_its_stamp(tmp_path, capsys):
    """backends.md: title, stamp line, what the columns mean, the table, the plot; --quick takes --dims and
    --batch (it ignored them)."""
    argv = ["--quick", "--backends", "eig", "--dims", "8", "--batch", "2", "--out", str(tmp_path)]
    assert bench_main(argv) == 0
    page = (tmp_path / "backends.md").read_text()
    lines = page.splitlines()
    assert lines[0] == "# Square-root backends" and lines[2].startswith("Measured ")
    assert lines[2].endswith(f"by `covpool bench {' '.join(argv)}`.") and "Batch 2, square root" in page
    assert "grad err rank-deficient: 3/4 of the eigenvalues" in page and "| eig | 8 |" in page
    assert lines[-1] == "![bench.png](bench.png)"


def test_models_mode_refuses_an_unknown_model(capsys):
    assert bench_main(["--models", "resnet5O"]) == 2
    assert "unknown timm model(s) ['resnet5O']" in capsys.readouterr().err
