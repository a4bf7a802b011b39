"""ONNX export (dynamo exporter) of covariance pooling, checked with onnxruntime against eager."""
import pytest
import torch

import covpool
from covpool.testing import ill_conditioned, rank_deficient, well_conditioned

EXPORTABLE = ["ns", "mtp_lya", "mpa_lya"]


class PoolNet(torch.nn.Module):
    def __init__(self, backend, inverse=False, gram="auto"):
        super().__init__()
        self.pool = covpool.CovPool(12, reduced_dim=6, backend=backend, gram=gram)
        self.fc = torch.nn.Linear(21, 3)
        self.backend, self.inverse = backend, inverse

    def forward(self, x):
        if self.inverse:  # a whitening-style use: the inverse root of a regularised covariance
            cov = covpool.covariance(x.flatten(2)) + 0.1 * torch.eye(x.shape[1])
            return covpool.inv_sqrtm(cov, self.backend)
        return self.fc(self.pool(x))


def run_onnx(model, x):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install covpool[test])")
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (pip install covpool[test])")
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("inverse, gram", [pytest.param(False, False, id="sqrt"),
                                           pytest.param(False, True, id="sqrt-gram"),  # 4 positions, 6 channels
                                           pytest.param(True, False, id="inv", marks=pytest.mark.slow)])  # ~2.5 s
@pytest.mark.parametrize("backend", EXPORTABLE)
def test_onnx_export_matches_eager(backend, inverse, gram):
    torch.manual_seed(0)
    model = PoolNet(backend, inverse, gram).eval()
    x = torch.randn(2, 12, 2, 2) if gram else torch.randn(2, 12, 4, 4)
    with torch.no_grad():
        before = model(x)
    out = run_onnx(model, x)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(out, before, rtol=1e-4, atol=1e-5 * float(before.abs().max()))
    # Export traces with fake tensors: nothing cached during it may leak into later eager calls.
    assert type(after) is torch.Tensor
    torch.testing.assert_close(after, before, rtol=0, atol=0)


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
