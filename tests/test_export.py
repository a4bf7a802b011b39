"""Export: every backend and head through ``torch.export`` and ONNX (dynamo exporter, run with onnxruntime),
against eager, and the table of the export guide (docs/guides/export.md) checked against what happens.

The poolings of every registered backend (square root on the d×d and the Gram side, inverse root) and every
registered head are exported together, as one module with one output each: one ``torch.export`` and one
ONNX export instead of one per name (an ONNX export costs seconds). Which names export to ONNX is decided by
running each pooling eagerly under the exporter's flag: the eigendecomposition-based ones raise there, by
design, with the advice to call ``covpool.set_backend``; the others go into the ONNX module.
"""
import importlib.util
import re
from pathlib import Path

import pytest
import torch

import covpool
from covpool.testing import ill_conditioned, rank_deficient, well_conditioned

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "export.md"
NAMES = [("backend", b) for b in covpool.list_backends()] + [("head", h) for h in covpool.list_heads()]
ONNX_ADVICE = 'covpool.set_backend(model, "ns")'


class Root(torch.nn.Module):
    """A backend's inverse root of a regularised covariance (whitening's use)."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, x):
        cov = covpool.covariance(x.flatten(2)) + 0.1 * torch.eye(x.shape[1])
        return covpool.inv_sqrtm(cov, self.backend)


def poolings(kind, name):
    """The modules that stand for ``name`` and the input each takes: maps (B, 12, 4, 4), 16 positions of 6
    reduced channels (the d×d side); small maps (B, 12, 2, 2), 4 positions (the Gram side); tokens (B, 9, 12)."""
    torch.manual_seed(0)
    if kind == "backend":
        pool = covpool.CovPool(12, reduced_dim=6, backend=name)
        return [(pool, "maps"), (pool, "small"), (Root(name), "maps")]
    head = covpool.get_head(name)
    options = {"sketch_dim": 64} if head.options.get("sketch") else {}
    pool = covpool.build_head(name, 12, reduced_dim=(2, 3) if head.tokens_only else 6, **options)
    return [(pool, "tokens" if head.tokens_only else "maps")]


class Everything(torch.nn.Module):
    """The poolings of ``names`` side by side: one output per (module, input) pair, keyed ``kind_name_i``."""

    def __init__(self, names):
        super().__init__()
        self.keys, self.mods = [], torch.nn.ModuleDict()
        for kind, name in names:
            for i, (mod, source) in enumerate(poolings(kind, name)):
                self.keys.append((f"{kind}_{name}_{i}", source))
                self.mods[f"{kind}_{name}_{i}"] = mod

    def forward(self, maps, small, tokens):
        inputs = {"maps": maps, "small": small, "tokens": tokens}
        return tuple(self.mods[key](inputs[source]) for key, source in self.keys)


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 12, 4, 4, generator=g), torch.randn(2, 12, 2, 2, generator=g),
            torch.randn(2, 9, 12, generator=g))


def raises_under_onnx(kind, name):
    """The eager forward with the exporter's flag up: None, or the RuntimeError's message."""
    model = Everything([(kind, name)]).eval()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        try:
            with torch.no_grad():
                model(*inputs())
        except RuntimeError as err:
            return str(err)
    return None


def onnx_available():
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None


def run_onnx(model, args):
    import onnxruntime as ort

    program = torch.onnx.export(model, args, dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def close(out, ref, rtol):
    """Each output within ``rtol`` (and 0.1·rtol of its largest entry). The heads with a signed square root are
    compared as x·|x|, which undoes it: √ turns an absolute rounding δ of an entry near 0 into √δ (measured
    7e-4 of the largest entry for cbp_ts, whose FFT onnxruntime computes differently)."""
    return all(torch.allclose(o, r, rtol=rtol, atol=0.1 * rtol * float(r.abs().max())) for o, r in zip(out, ref))


@pytest.fixture(scope="module")
def outcome():
    """``{(kind, name): (torch.export matches eager, ONNX matches eager or the error's message, or None without
    onnxruntime)}``."""
    args = inputs()
    model = Everything(NAMES).eval()
    with torch.no_grad():
        eager = dict(zip([k for k, _ in model.keys], model(*args)))
    program = torch.export.export(model, args)
    # No host synchronisation: no tensor is read back to Python in the exported graph.
    reads = (torch.ops.aten.item, torch.ops.aten._local_scalar_dense)
    syncs = [n for n in program.graph.nodes if getattr(n.target, "overloadpacket", None) in reads]
    assert not syncs, syncs
    exported = dict(zip(eager, program.module()(*args)))
    # Export traces with fake tensors: nothing cached during it may leak into later eager calls.
    with torch.no_grad():
        again = model(*args)
    assert all(type(t) is torch.Tensor and torch.equal(t, e) for t, e in zip(again, eager.values()))
    errors = {key: raises_under_onnx(*key) for key in NAMES}
    onnx_model = Everything([key for key in NAMES if errors[key] is None]).eval()
    # Without the onnx extra the torch.export half is still checked.
    onnx_out = dict(zip([k for k, _ in onnx_model.keys], run_onnx(onnx_model, args))) if onnx_available() else None
    result = {}
    for kind, name in NAMES:
        keys = [k for k, _ in Everything([(kind, name)]).keys]
        signed = kind == "head" and covpool.get_head(name).options.get("signed_sqrt", False)

        def value(t, signed=signed):
            return t * t.abs() if signed else t

        ref = [value(eager[k]) for k in keys]
        exports = close([value(exported[k]) for k in keys], ref, 1e-6)
        if errors[(kind, name)] or onnx_out is None:
            onnx = errors[(kind, name)]
        else:
            onnx = close([value(onnx_out[k]) for k in keys], ref, 1e-4)
        result[(kind, name)] = (exports, onnx)
    return result


def guide_table():
    """The rows of the export guide's table: ``{(kind, name): (torch.export cell, ONNX cell)}``."""
    rows = {}
    for line in GUIDE.read_text().splitlines():
        match = re.match(r"\| (backend|head) `([a-z0-9_]+)` \| ([^|]+) \| ([^|]+) \|$", line)
        if match:
            rows[(match[1], match[2])] = (match[3].strip(), match[4].strip())
    return rows


def test_the_export_guide_table_has_a_row_per_backend_and_head():
    assert sorted(guide_table()) == sorted(NAMES)


@pytest.mark.parametrize("kind, name", NAMES, ids=[f"{k}-{n}" for k, n in NAMES])
def test_export_as_the_guide_says(outcome, kind, name):
    exports, onnx = outcome[(kind, name)]
    export_cell, onnx_cell = guide_table()[(kind, name)]
    assert exports is True, f"{kind} {name}: torch.export differs from eager"
    assert export_cell == "yes"
    if onnx is None:
        pytest.skip("onnxruntime or onnxscript is not installed (pip install 'covpool[onnx]')")
    if onnx is True:
        assert onnx_cell.startswith("yes"), onnx_cell
    else:
        assert onnx is not False, f"{kind} {name}: onnxruntime differs from eager"
        # It raises at export time, and says what to do.
        assert "ONNX has no" in onnx and ONNX_ADVICE in onnx, onnx
        assert onnx_cell.startswith("no: raises"), onnx_cell


def test_onnx_export_of_an_eigendecomposition_backend_says_what_to_do():
    """End to end through torch.onnx.export: its two capture strategies (non-strict, then strict under dynamo,
    which folds ``torch.onnx.is_in_onnx_export()`` to False) both meet covpool's error, which the exporter's
    summary shows, instead of a conversion error about ``linalg_eigh`` after the capture."""
    if not onnx_available():
        pytest.skip("onnxruntime or onnxscript is not installed (pip install 'covpool[onnx]')")
    model = covpool.CovPool(12, reduced_dim=6, backend="eig").eval()
    with pytest.raises(Exception, match=re.escape(ONNX_ADVICE)):
        torch.onnx.export(model, (torch.randn(2, 12, 4, 4),), dynamo=True, verbose=False)
    covpool.set_backend(model, "ns")
    assert raises_under_onnx("backend", "ns") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
def test_products_only_pade_solve_matches_the_cholesky_solve(monkeypatch, inverse, dtype):
    # Under ONNX export mpa_lya replaces its Cholesky solve (no ONNX op) by a fixed number of Newton–Schulz
    # inverse steps; its step count comes from the Padé polynomials' range on [0, 1], so it must hold for
    # any PSD input, rank-deficient included.
    mats = torch.cat([well_conditioned(2, 16, seed=1), ill_conditioned(2, 16, kappa=1e4, seed=2),
                      rank_deficient(2, 16, 5, seed=3)]).to(dtype)
    fn = covpool.inv_sqrtm if inverse else covpool.sqrtm
    if inverse:
        mats = mats[:4]  # the inverse root of a singular matrix is infinite
    eager = fn(mats, "mpa_lya")
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    products = fn(mats, "mpa_lya")
    tol = {torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(products, eager, rtol=tol, atol=tol * float(eager.abs().max()))
