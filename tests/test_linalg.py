"""Backends against float64 references: forward, backward, hard matrix families, dtypes and errors."""
import math
from fractions import Fraction

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import covpool
from covpool.linalg import _registry as registry
from covpool.linalg import covariance, get_backend, lyapunov_sign, triu_vectorize
from covpool.testing import (
    exact_grad,
    exact_root,
    ill_conditioned,
    rank_deficient,
    rel,
    repeated_eigenvalues,
    well_conditioned,
    well_separated,
)

BACKENDS = covpool.list_backends()
EXACT_FORWARD = ["eig", "svd_pi", "svd_taylor", "svd_pade"]
ROOTS = [pytest.param(False, id="sqrt"), pytest.param(True, id="inv")]
# Relative errors below this are float64 rounding: two of them are equal, whatever their order.
MACHINE_FLOOR = 1e-12


def root(a, backend, inverse, **options):
    return (covpool.inv_sqrtm if inverse else covpool.sqrtm)(a, backend, **options)


def test_registry_lists_the_seven_backends_in_order():
    assert BACKENDS[:7] == ["eig", "svd_pi", "svd_taylor", "svd_pade", "ns", "mtp_lya", "mpa_lya"]


# ------------------------------------------------------------------ float64 references of the algorithms
def ns_reference(a, num_iters):
    """iSQRT-COV as published: trace normalisation, coupled NS, compensation; one matrix at a time."""
    out_s, out_i = [], []
    for m in a.double():
        n = m.shape[0]
        eye = torch.eye(n, dtype=torch.float64)
        tr = torch.trace(m)
        y, z = m / tr, eye.clone()
        for _ in range(num_iters):
            t = 0.5 * (3 * eye - z @ y)
            y, z = y @ t, t @ z
        out_s.append(y * tr.sqrt())
        out_i.append(z / tr.sqrt())
    return torch.stack(out_s), torch.stack(out_i)


def sqrt_series(degree, exponent):
    """(1 - x)**exponent = sum c_k x^k, coefficients by the generalised binomial theorem."""
    return [math.prod(exponent - j for j in range(k)) / math.factorial(k) * (-1) ** k for k in range(degree + 1)]


def pade_reference(m, n):
    """[m/n] Padé of sqrt(1 - x) by a float64 Toeplitz solve (independent of covpool's exact arithmetic)."""
    c = torch.tensor(sqrt_series(m + n, 0.5), dtype=torch.float64)
    rows = torch.tensor([[c[k - j] if k >= j else 0.0 for j in range(1, n + 1)] for k in range(m + 1, m + n + 1)],
                        dtype=torch.float64)
    q = torch.cat([torch.ones(1, dtype=torch.float64), torch.linalg.solve(rows, -c[m + 1:m + n + 1])])
    p = torch.stack([sum(q[j] * c[k - j] for j in range(min(k, n) + 1)) for k in range(m + 1)])
    return p, q


def matrix_poly(coeffs, x):
    out = torch.zeros_like(x)
    power = torch.eye(x.shape[-1], dtype=x.dtype).expand_as(x)
    for c in coeffs:
        out = out + float(c) * power
        power = power @ x
    return out


def normalised(a):
    a = a.double()
    norm = torch.linalg.matrix_norm(a)[:, None, None]
    return torch.eye(a.shape[-1], dtype=torch.float64) - a / norm, norm


def mtp_reference(a, degree, inverse):
    x, norm = normalised(a)
    poly = matrix_poly(sqrt_series(degree, -0.5 if inverse else 0.5), x)
    return poly / norm.sqrt() if inverse else poly * norm.sqrt()


def sym_inv(m):
    # Batched LU in torch 2.14 on the CPU intermittently rejects its own pivots at this size
    # ("Pivots given to lu_solve must all be greater or equal to 1"); eigh is safe for symmetric m.
    lam, v = torch.linalg.eigh(m)
    return (v / lam.unsqueeze(-2)) @ v.mT


def mpa_reference(a, degree, inverse):
    x, norm = normalised(a)
    p, q = pade_reference(*degree)
    pm, qm = matrix_poly(p, x), matrix_poly(q, x)
    if inverse:
        return sym_inv(pm) @ qm / norm.sqrt()
    return sym_inv(qm) @ pm * norm.sqrt()


REFERENCES = {
    "ns": lambda a, inverse: ns_reference(a, 5)[inverse],
    "mtp_lya": lambda a, inverse: mtp_reference(a, 10, inverse),
    "mpa_lya": lambda a, inverse: mpa_reference(a, (5, 5), inverse),
}


@pytest.mark.parametrize("inverse", ROOTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_float64_reference(backend, inverse, device):
    a64 = well_conditioned(4, 12, seed=1)
    ref = REFERENCES[backend](a64, inverse) if backend in REFERENCES else exact_root(a64, inverse)
    assert rel(root(a64.to(device), backend, inverse), ref) < 1e-10
    out32 = root(a64.float().to(device), backend, inverse)
    assert out32.dtype == torch.float32 and out32.device == device
    assert rel(out32, ref) < 2e-5


@pytest.mark.parametrize("inverse", ROOTS)
def test_forward_on_covariance_of_features(inverse):
    a = rank_deficient(3, 16, 64, seed=2) + 0.05 * torch.eye(16, dtype=torch.float64)
    for backend, ref in REFERENCES.items():
        assert rel(root(a, backend, inverse), ref(a, inverse)) < 1e-10, backend


@pytest.mark.parametrize(
    "backend, key, values",
    [("ns", "num_iters", [3, 5, 10, 20]), ("mtp_lya", "degree", [4, 10, 80]),
     ("mpa_lya", "degree", [(2, 2), (5, 5), (8, 8)])],
)
@pytest.mark.parametrize("inverse", ROOTS)
def test_more_iterations_or_degree_approach_the_exact_root(backend, key, values, inverse):
    a = well_conditioned(3, 16, seed=3)
    ref = exact_root(a, inverse)
    errors = [rel(root(a, backend, inverse, **{key: v}), ref) for v in values]
    # Once both are at float64 rounding (~1e-15) their order is decided by the BLAS: a floor, not `<`.
    assert all(e2 < e1 or e2 < MACHINE_FLOOR for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3, errors


def test_frobenius_prenormalisation_of_ns_is_more_accurate_for_the_same_cost():
    a = well_conditioned(8, 32, seed=4)
    ref = exact_root(a)
    assert rel(covpool.sqrtm(a, "ns", norm="fro"), ref) < max(0.5 * rel(covpool.sqrtm(a, "ns"), ref), MACHINE_FLOOR)


@pytest.mark.parametrize("backend", ["mtp_lya", "mpa_lya"])
@pytest.mark.parametrize("inverse", ROOTS)
def test_newton_schulz_refinement_of_the_approximants(backend, inverse):
    # Measured on 16×16, condition number 100: the [5/5] Padé inverse root is 19% off, 0.9% after 2 steps.
    a = ill_conditioned(8, 16, kappa=100.0, dtype=torch.float32, seed=18)
    ref = exact_root(a, inverse)
    errors = [rel(root(a, backend, inverse, refine=k), ref) for k in (0, 1, 2)]
    floor = 1e-6  # float32 rounding at this size
    assert errors[2] < max(errors[1], floor) and errors[1] < max(errors[0], floor), errors
    assert errors[2] < {"mpa_lya": 0.02, "mtp_lya": 0.4}[backend], errors
    x = a.clone().requires_grad_()
    root(x, backend, inverse, refine=2).sum().backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------- backward
def symmetrised(fn):
    return lambda m: fn(0.5 * (m + m.mT))


@pytest.mark.parametrize("inverse", ROOTS)
@pytest.mark.parametrize("backend", ["eig", "ns"])
def test_gradcheck_where_the_backward_is_exact(backend, inverse, device):
    a = well_conditioned(2, 5, seed=5).to(device).requires_grad_()
    assert torch.autograd.gradcheck(symmetrised(lambda m: root(m, backend, inverse)), (a,))


@pytest.mark.parametrize("norm", ["trace", "fro"])
@pytest.mark.parametrize("num_iters", [1, 2, 3, 6])
@pytest.mark.parametrize("inverse", ROOTS)
def test_ns_hand_written_backward_passes_gradcheck(num_iters, norm, inverse, device):
    a = well_conditioned(2, 5, seed=num_iters).to(device).requires_grad_()
    fn = symmetrised(lambda m: root(m, "ns", inverse, num_iters=num_iters, norm=norm))
    assert torch.autograd.gradcheck(fn, (a,))


@pytest.mark.parametrize("inverse", ROOTS)
def test_ns_gradient_is_the_symmetric_part_of_autograd_through_the_published_iteration(inverse):
    a = well_conditioned(3, 8, seed=6)
    g = torch.randn(3, 8, 8, dtype=torch.float64)
    x = a.clone().requires_grad_()
    (root(x, "ns", inverse) * g).sum().backward()
    y = a.clone().requires_grad_()
    (ns_reference(y, 5)[inverse] * g).sum().backward()
    assert rel(y.grad, y.grad.mT) > 0.1, "the loop's own gradient is not symmetric: the test would be empty"
    assert rel(x.grad, 0.5 * (y.grad + y.grad.mT)) < 1e-10


# Options under which each backend's gradient is the exact Daleckii–Krein one to < 2e-3 (the SVD family
# on well-separated spectra, see test_approximate_gradients_converge_to_the_exact_one).
CONVERGED = {"eig": {}, "svd_pi": {"num_iters": 400}, "svd_taylor": {"degree": 400},
             "svd_pade": {"degree": (200, 200)}, "ns": {"num_iters": 30},
             "mtp_lya": {"degree": 60, "lya_iters": 30}, "mpa_lya": {"degree": (8, 8), "lya_iters": 30}}


@pytest.mark.parametrize("inverse", ROOTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_symmetric_for_any_upstream_gradient(backend, inverse, device):
    # torch.linalg.matrix_sqrth's convention: for symmetric input the gradient is the one w.r.t.
    # symmetric perturbations, symmetric whatever the upstream gradient.
    family = well_separated if backend.startswith("svd") else well_conditioned
    a = family(2, 8, seed=19).to(device)
    g = torch.randn(2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(device)
    assert rel(g, g.mT) > 1
    x = a.clone().requires_grad_()
    (root(x, backend, inverse) * g).sum().backward()
    torch.testing.assert_close(x.grad, x.grad.mT, rtol=1e-10, atol=1e-12 * float(x.grad.abs().max()))
    if backend in CONVERGED:
        y = a.clone().requires_grad_()
        (root(y, backend, inverse, **CONVERGED[backend]) * g).sum().backward()
        torch.testing.assert_close(y.grad, y.grad.mT, rtol=1e-10, atol=1e-12 * float(y.grad.abs().max()))
        assert rel(y.grad, exact_grad(a, g, inverse)) < (1e-10 if backend == "eig" else 2e-3)


# Stated tolerances of the approximate backwards against the exact Daleckii–Krein gradient on
# well-conditioned input (eigenvalues in [1, 4]), float64 so only the approximation is measured.
# Measured (sqrt / inverse): svd_pi 0.23 / 0.67, svd_taylor 0.23 / 0.22, svd_pade 0.095 / 0.089,
# mtp_lya 0.013 / 0.074, mpa_lya 3.7e-4 / 6.5e-4. ns is checked against its own iteration instead: its
# gradient is exact for the 5-step approximation, which is itself far from the root at this size.
APPROX_GRAD_TOL = {"eig": 1e-10, "svd_pi": 0.9, "svd_taylor": 0.3, "svd_pade": 0.13, "mtp_lya": 0.1, "mpa_lya": 1e-3}


@pytest.mark.parametrize("inverse", ROOTS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in APPROX_GRAD_TOL])
def test_gradient_close_to_exact_on_well_conditioned_input(backend, inverse, device):
    a = well_conditioned(4, 16, seed=7)
    g = torch.randn(4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = a.to(device).requires_grad_()
    (root(x, backend, inverse) * g.to(device)).sum().backward()
    err = rel(x.grad, exact_grad(a, g, inverse))
    assert err < APPROX_GRAD_TOL[backend], err


@pytest.mark.parametrize(
    "backend, options",
    [("svd_pi", {"num_iters": 400}), ("svd_taylor", {"degree": 400}), ("svd_pade", {"degree": (200, 200)}),
     ("mtp_lya", {"degree": 60, "lya_iters": 30}), ("mpa_lya", {"degree": (8, 8), "lya_iters": 30})],
)
@pytest.mark.parametrize("inverse", ROOTS)
def test_approximate_gradients_converge_to_the_exact_one(backend, options, inverse):
    # The SVD family's error comes from close eigenvalue pairs, the Lyapunov family's from the forward.
    family = well_separated if backend.startswith("svd") else well_conditioned
    a = family(2, 10, seed=8)
    g = torch.randn(2, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = a.clone().requires_grad_()
    (root(x, backend, inverse, **options) * g).sum().backward()
    assert rel(x.grad, exact_grad(a, g, inverse)) < 2e-3


# ------------------------------------------------------------------------- hard families, all backends
FAMILIES = {
    "rank_deficient_49x256": lambda: rank_deficient(2, 256, 49),
    "rank_deficient_8x32": lambda: rank_deficient(4, 32, 8),
    "repeated": lambda: repeated_eigenvalues(4, 24),
    "identity": lambda: torch.eye(16).expand(3, 16, 16).clone(),
    "zero_matrix": lambda: torch.zeros(2, 8, 8),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("inverse", ROOTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_output_and_gradient_on_hard_matrices(backend, inverse, family, device, dtype):
    a = FAMILIES[family]().to(device, dtype)
    if family == "zero_matrix" and inverse:
        pytest.skip("the inverse root of the zero matrix is infinite by definition")
    x = a.clone().requires_grad_()
    out = root(x, backend, inverse)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()


# The polynomial backends approximate √x badly near x = 0 (measured: ns 0.011, mtp_lya 0.57, mpa_lya 0.30
# relative error on 8 samples of 32 channels); the exact-forward backends only lose the floored eigenvalues.
RANK_DEFICIENT_TOL = {"ns": 0.02, "mtp_lya": 0.7, "mpa_lya": 0.4}


@pytest.mark.parametrize("backend", BACKENDS)
def test_sqrt_of_rank_deficient_covariance(backend):
    a = rank_deficient(2, 32, 8)
    ref = exact_root(a)
    tol = RANK_DEFICIENT_TOL.get(backend, 1e-6)
    assert rel(covpool.sqrtm(a, backend), ref) < tol


def test_pade_solve_at_batch_64_dim_256():
    # The published MPA-Lya uses torch.linalg.solve, whose batched LU fails on the CPU at this size.
    a = rank_deficient(64, 256, 512, dtype=torch.float32, seed=9) + 0.1 * torch.eye(256)
    x = a.clone().requires_grad_()
    out = covpool.sqrtm(x, "mpa_lya")
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    for inverse in (False, True):
        ref = mpa_reference(a[:4], (5, 5), inverse)
        assert rel(root(a, "mpa_lya", inverse)[:4], ref) < 5e-4  # float32 rounding at d = 256


# ----------------------------------------------------------------------- batches, dtypes and autocast
@pytest.mark.parametrize("inverse", ROOTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_matrix_is_independent_of_its_batch(backend, inverse, device):
    a = well_conditioned(3, 10, seed=10).to(device)
    g = torch.randn(3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    x = a.clone().requires_grad_()
    (root(x, backend, inverse) * g).sum().backward()
    b = a.clone()
    b[1:] = 1000 * rank_deficient(2, 10, 4, seed=11).to(device)
    y = b.clone().requires_grad_()
    (root(y, backend, inverse) * g).sum().backward()
    torch.testing.assert_close(root(b, backend, inverse)[0], root(a, backend, inverse)[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(y.grad[0], x.grad[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_number_of_batch_dimensions(backend, device):
    a = well_conditioned(6, 7, seed=12).to(device)
    flat = covpool.sqrtm(a, backend)
    torch.testing.assert_close(covpool.sqrtm(a.reshape(2, 3, 7, 7), backend), flat.reshape(2, 3, 7, 7))
    torch.testing.assert_close(covpool.sqrtm(a[0], backend), flat[0])
    assert covpool.inv_sqrtm(a.reshape(1, 2, 1, 3, 7, 7), backend).shape == (1, 2, 1, 3, 7, 7)
    assert covpool.sqrtm(a[:0], backend).shape == (0, 7, 7)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_input_computes_in_float32(backend, half, device):
    a = well_conditioned(2, 16, seed=13).to(device)
    x = a.to(half).requires_grad_()
    out = covpool.sqrtm(x, backend)
    assert out.dtype == half and torch.isfinite(out).all()
    ref32 = covpool.sqrtm(a.to(half).float(), backend)
    torch.testing.assert_close(out, ref32.to(half))
    out.float().sum().backward()
    assert x.grad.dtype == half and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_region_runs_the_root_in_float32(backend, device):
    a = well_conditioned(2, 16, dtype=torch.float32, seed=14).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = covpool.sqrtm(a, backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, covpool.sqrtm(a, backend))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("inverse", ROOTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_matches_cpu(backend, inverse):
    a = well_conditioned(4, 32, dtype=torch.float32, seed=15)
    x = a.cuda().requires_grad_()
    out = root(x, backend, inverse)
    out.sum().backward()
    assert out.device == x.device and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.cpu(), root(a, backend, inverse), rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "a, message",
    [(torch.ones(3), "at least 2 dimensions"), (torch.ones(2, 3, 4), "square"),
     (torch.ones(3, 3, dtype=torch.int64), "floating-point"), ([[1.0]], "torch.Tensor")],
)
def test_bad_input_is_named(a, message):
    with pytest.raises((ValueError, TypeError), match=message):
        covpool.sqrtm(a)


def test_unknown_backend_lists_the_valid_ones():
    valid = "eig, svd_pi, svd_taylor, svd_pade, ns, mtp_lya, mpa_lya"
    with pytest.raises(ValueError, match=f"unknown backend 'newton'.*{valid}"):
        covpool.sqrtm(torch.eye(3), backend="newton")


def test_unknown_option_lists_the_backend_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['iters'\].*num_iters=5, norm='trace'"):
        covpool.sqrtm(torch.eye(3), backend="ns", iters=3)


@pytest.mark.parametrize(
    "backend, options, message",
    [("ns", {"num_iters": 0}, "ns.num_iters must be an integer >= 1"),
     ("ns", {"num_iters": 2.5}, "integer"),
     ("ns", {"norm": "max"}, "ns.norm must be one of 'trace', 'fro'"),
     ("mpa_lya", {"degree": "5"}, "pair"),
     ("mpa_lya", {"degree": (1, 0)}, "m \\+ n >= 2"),
     ("svd_pi", {"num_iters": 1}, ">= 2"),
     ("eig", {"eps": -1.0}, r"in \(0, 1\)"),
     ("mtp_lya", {"lya_iters": 0}, ">= 1")],
)
def test_invalid_option_values(backend, options, message):
    with pytest.raises(ValueError, match=message):
        covpool.sqrtm(torch.eye(3), backend=backend, **options)


def test_backend_given_as_a_config_dict():
    a = well_conditioned(2, 8, seed=16)
    spec = {"name": "mpa_lya", "degree": [3, 3]}
    torch.testing.assert_close(covpool.sqrtm(a, spec), covpool.sqrtm(a, "mpa_lya", degree=(3, 3)))
    assert spec == {"name": "mpa_lya", "degree": [3, 3]}, "the caller's dict must not be modified"
    with pytest.raises(ValueError, match="needs a 'name' key"):
        covpool.sqrtm(a, {"degree": 3})


def test_registering_a_name_twice_raises_and_a_new_backend_works(monkeypatch):
    def halves(a, inverse, scale):
        return covpool.sqrtm(a, "eig") * (1 / scale if inverse else scale)

    # Register into a copy of the registry: tests that run every registered backend must not meet this one.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    name = "test_scaled_eig"
    covpool.register_backend(name, halves, {"scale": covpool.linalg.Option(2.0, lambda k, v: float(v))})
    with pytest.raises(ValueError, match="already registered"):
        covpool.register_backend(name, halves)
    torch.testing.assert_close(covpool.sqrtm(4 * torch.eye(2), name), 4 * torch.eye(2))
    assert get_backend(name).defaults == {"scale": 2.0}


class _CountProducts(TorchDispatchMode):
    """Counts the batched n×n matrix products (and the triangular solve, one product) that reach aten; a
    per-matrix dot product ⟨X, Y⟩ (a 1×n² by n²×1 product) is a reduction, not one of them."""

    PRODUCTS = {"bmm", "baddbmm", "baddbmm_", "mm", "addmm", "cholesky_solve"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += func.overloadpacket.__name__ in self.PRODUCTS and out.shape[-1] > 1
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
def test_declared_product_counts_are_what_the_backend_runs(backend, inverse):
    # The count a backend declares when it registers (what `covpool bench` reports) is checked against
    # the products its forward and backward actually dispatch, for defaults and non-default options.
    entry = get_backend(backend)
    if entry.products_fn is None:
        assert entry.products(inverse) is None
        return
    option_sets = {"ns": [{}, {"num_iters": 1}, {"num_iters": 2, "norm": "fro"}, {"num_iters": 7}],
                   "mtp_lya": [{}, {"degree": 7, "refine": 2}, {"degree": 1, "lya_iters": 1}],
                   "mpa_lya": [{}, {"degree": (3, 4), "refine": 1}, {"degree": (8, 8), "lya_iters": 3}]}[backend]
    fn = covpool.inv_sqrtm if inverse else covpool.sqrtm
    for options in option_sets:
        a = well_conditioned(2, 6, dtype=torch.float64, seed=3).requires_grad_()
        with torch.no_grad(), _CountProducts() as forward:
            fn(a, backend, **options)
        with _CountProducts() as both:
            out = fn(a, backend, **options)
            out.backward(torch.randn_like(out))
        assert entry.products(inverse, **options) == (forward.count, both.count), options


def test_products_check_their_options_and_registration_checks_products():
    assert get_backend("ns").products() == (12, 36) == get_backend("ns").products(num_iters=5, norm="trace")
    with pytest.raises(ValueError, match="ns.num_iters must be an integer >= 1"):
        get_backend("ns").products(num_iters=0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['iters'\]"):
        get_backend("mpa_lya").products(iters=3)
    with pytest.raises(TypeError, match="products must be a function"):
        covpool.register_backend("test_bad_products", lambda a, inverse: a, products=(1, 2))
    assert "test_bad_products" not in covpool.list_backends()


# ------------------------------------------------------------------------------- coefficients, helpers
def test_taylor_and_pade_coefficients_are_exact():
    from covpool.linalg import _coefficients as co

    assert co.taylor_sqrt(4, False) == (1.0, -0.5, -0.125, -0.0625, -0.0390625)
    assert co.taylor_sqrt(3, True) == (1.0, 0.5, 0.375, 0.3125)
    for m, n in [(5, 5), (3, 4), (6, 2)]:
        p, q = co._pade(co._binomial_series(Fraction(1, 2), m + n), m, n)
        series = co._binomial_series(Fraction(1, 2), m + n)
        product = [sum(q[j] * series[k - j] for j in range(min(k, n) + 1)) for k in range(m + n + 1)]
        assert product[: m + 1] == list(p) and all(c == 0 for c in product[m + 1:])
        pf, qf = co.pade_sqrt(m, n)
        torch.testing.assert_close(torch.tensor(pf, dtype=torch.float64), pade_reference(m, n)[0])


def test_lyapunov_solver_solves_the_equation():
    b = covpool.sqrtm(well_conditioned(3, 12, seed=17), "eig")
    b = b / torch.linalg.matrix_norm(b, ord=2)[:, None, None]
    c = torch.randn(3, 12, 12, dtype=torch.float64)
    c = c + c.mT
    x = lyapunov_sign(b, c, num_iters=12)
    assert rel(b @ x + x @ b, c) < 1e-10


def test_covariance_matches_the_centring_matrix_formula():
    x = torch.randn(2, 6, 10, dtype=torch.float64)
    centre = torch.eye(10, dtype=torch.float64) - torch.full((10, 10), 0.1, dtype=torch.float64)
    torch.testing.assert_close(covariance(x), x @ centre @ x.mT / 10)


def test_triu_vectorize_order_and_width():
    a = torch.arange(9.0).reshape(3, 3)
    assert triu_vectorize(a).tolist() == [0.0, 1.0, 2.0, 4.0, 5.0, 8.0]
    assert triu_vectorize(torch.zeros(2, 256, 256)).shape == (2, 32896)


# --------------------------------------------------------------------------------- second derivatives
DOUBLE_BACKWARD = {"ns"}  # backends whose double backward is exact; every other one must raise


def issue_example(backend, **options):
    """d/dw of ‖∂/∂z Σ sqrtm(w·z)‖² at z = 4·I₃, w = 2; the exact value is 9/16."""
    z = (4 * torch.eye(3, dtype=torch.float64)).requires_grad_()
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(covpool.sqrtm(w * z, backend, **options).sum(), z, create_graph=True)
    (gw,) = torch.autograd.grad(g.pow(2).sum(), w)
    return float(gw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivative_is_right_or_raises(backend):
    if backend in DOUBLE_BACKWARD:
        assert issue_example(backend, num_iters=20) == pytest.approx(0.5625, rel=1e-10)
    else:
        with pytest.raises(RuntimeError, match=f"backend '{backend}' has no second derivative"):
            issue_example(backend)


@pytest.mark.parametrize("inverse", ROOTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck_or_a_clear_error(backend, inverse, device):
    a = well_conditioned(2, 4, seed=20).to(device).requires_grad_()
    fn = symmetrised(lambda m: root(m, backend, inverse))
    if backend in DOUBLE_BACKWARD:
        assert torch.autograd.gradgradcheck(fn, (a,))
    else:
        # The upstream gradient requires grad here (the path once_differentiable alone covers).
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.gradgradcheck(fn, (a,))


@pytest.mark.parametrize("norm", ["trace", "fro"])
@pytest.mark.parametrize("num_iters", [1, 3])
def test_ns_gradgradcheck_options(num_iters, norm):
    a = well_conditioned(2, 4, seed=21).requires_grad_()
    for inverse in (False, True):
        fn = symmetrised(lambda m: root(m, "ns", inverse, num_iters=num_iters, norm=norm))
        assert torch.autograd.gradgradcheck(fn, (a,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_alone_keeps_the_first_derivative(backend, device):
    # Only differentiating the gradient raises; the gradient itself is the usual one.
    a = well_conditioned(2, 6, seed=22).to(device)
    x, y = a.clone().requires_grad_(), a.clone().requires_grad_()
    (g1,) = torch.autograd.grad(covpool.sqrtm(x, backend).square().sum(), x, create_graph=True)
    (g0,) = torch.autograd.grad(covpool.sqrtm(y, backend).square().sum(), y)
    torch.testing.assert_close(g1.detach(), g0, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ scale invariance
SCALES = [1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e20, 1e30]


@pytest.mark.parametrize("inverse", ROOTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_roots_are_scale_invariant_from_1e_minus_30_to_1e30(backend, inverse, device):
    # root(s·A) = s^(±1/2)·root(A): the error against the float64 eigh reference must not grow with the
    # scale (it overflowed to inf / NaN in the Frobenius normaliser of mtp_lya / mpa_lya before).
    ref = exact_root(well_conditioned(2, 6, seed=23), inverse)
    a = well_conditioned(2, 6, seed=23).to(device)
    for dtype, floor in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        base = rel(root(a.to(dtype), backend, inverse), ref)
        assert base < 0.5, (dtype, base)
        for s in SCALES:
            out = root((s * a).to(dtype), backend, inverse)
            assert torch.isfinite(out).all(), (dtype, s)
            err = rel(out.double() * s ** (0.5 if inverse else -0.5), ref)
            assert err < 1.5 * base + floor, (dtype, s, err, base)


@pytest.mark.parametrize("inverse", ROOTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_scale_invariant_in_float64(backend, inverse, device):
    # ∂root(sA) = s^(-1/2) ∂root(A) (square root) or s^(-3/2) (inverse root), at every scale.
    a = well_conditioned(2, 6, seed=24).to(device)
    g = torch.randn(2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)

    def grad_at(s):
        x = (s * a).requires_grad_()
        (root(x, backend, inverse) * g).sum().backward()
        return x.grad

    base = grad_at(1.0)
    for s in SCALES:
        scaled = grad_at(s) * s ** (1.5 if inverse else 0.5)
        assert rel(scaled, base) < 1e-8, (s, rel(scaled, base))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cov_pool_and_zca_of_features_scaled_by_1e10(backend):
    # Through the layers, float32: CovPool's root scales with the features, ZCA's output does not
    # (it was NaN for mpa_lya and all zeros for ZCA before the normaliser was made scale-safe).
    x = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(5))
    pool = covpool.CovPool(6, reduced_dim=None, backend=backend)
    big = pool(1e10 * x.unsqueeze(-1))
    assert torch.isfinite(big).all()
    assert rel(big / 1e10, pool(x.unsqueeze(-1))) < 1e-4
    feats = torch.randn(64, 8, generator=torch.Generator().manual_seed(6))
    y = covpool.zca_batch_norm(feats, training=True, group_size=4, eps=0.0, backend=backend)
    y_big = covpool.zca_batch_norm(1e10 * feats, training=True, group_size=4, eps=0.0, backend=backend)
    assert torch.isfinite(y_big).all() and y_big.norm() > 0.5 * y.norm() > 0
    assert rel(y_big, y) < 1e-3


# --------------------------------------------------------------------------------------- input contract
@pytest.mark.parametrize("inverse", ROOTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_matrices_give_empty_roots(backend, inverse, device):
    for shape in [(3, 0, 0), (0, 0), (2, 3, 0, 0)]:
        for dtype in (torch.float64, torch.float16):
            x = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
            out = root(x, backend, inverse)
            assert out.shape == shape and out.dtype == dtype
            out.sum().backward()
            assert x.grad.shape == shape
    assert torch.linalg.matrix_sqrth(torch.zeros(3, 0, 0)).shape == (3, 0, 0)  # what torch.linalg does


@pytest.mark.parametrize("eps", [math.inf, math.nan, -1.0, 0.0])
def test_backend_eps_must_be_positive_and_finite(eps):
    with pytest.raises(ValueError, match=r"eig.eps must be a number in \(0, 1\) or None"):
        covpool.sqrtm(torch.eye(3), "eig", eps=eps)


@pytest.mark.parametrize("eps", [math.inf, math.nan, -1e-5, "1e-5"])
def test_zca_eps_must_be_finite_and_non_negative(eps):
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        covpool.zca_batch_norm(torch.randn(16, 4), training=True, group_size=4, eps=eps)


def test_integer_features_are_promoted_not_truncated():
    x = torch.randint(-3, 4, (2, 5, 30), generator=torch.Generator().manual_seed(7))
    cov = covariance(x)
    assert cov.dtype == torch.get_default_dtype()
    torch.testing.assert_close(cov, covariance(x.float()))
    assert cov.frac().abs().max() > 0, "this data has a non-integer covariance"
    pool = covpool.CovPool(5, reduced_dim=None)
    out = pool(x.unsqueeze(-1))
    assert out.dtype == torch.get_default_dtype()
    torch.testing.assert_close(out, pool(x.float().unsqueeze(-1)))
    with pytest.raises(TypeError, match="real"):
        covariance(torch.zeros(2, 3, 4, dtype=torch.complex64))


def indefinite(n=4, seed=25):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    lam = torch.tensor([4.0, 2.0, 1.0, -0.5], dtype=torch.float64)
    return (q * lam) @ q.T, q, lam


@pytest.mark.parametrize("fn", [covpool.sqrtm, covpool.inv_sqrtm])
def test_check_input_rejects_non_symmetric_indefinite_and_non_finite(fn):
    good = well_conditioned(3, 4, seed=26)
    bad = good.clone()
    bad[1, 0, 2] += 0.1
    with pytest.raises(ValueError, match=r"batch index \(1,\) is not symmetric"):
        fn(bad, check_input=True)
    a, _, _ = indefinite()
    with pytest.raises(ValueError, match=r"the matrix is indefinite: smallest eigenvalue -0.5\b"):
        fn(a, check_input=True)
    stacked = torch.stack([good[0], 1e12 * a]).reshape(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"batch index \(1, 0\) is indefinite"):
        fn(stacked, check_input=True)
    nan = good.clone()
    nan[2, 1, 1] = math.nan
    with pytest.raises(ValueError, match=r"batch index \(2,\) has inf or NaN"):
        fn(nan, check_input=True)
    fn(bad)  # unchecked by default
    fn(a)


def test_check_input_accepts_rounding():
    # float32 covariances of 12 samples in 64 channels (rank 11), shifted so that the null space sits at
    # −1e-7 × the largest eigenvalue: rounding-level negative eigenvalues, as float32 covariances have.
    a64 = rank_deficient(2, 64, 12, seed=27)
    a = (a64 - 1e-7 * torch.linalg.matrix_norm(a64, ord=2)[:, None, None] * torch.eye(64)).float()
    assert float(torch.linalg.eigvalsh(a)[:, 0].max()) < 0, "the test needs rounding-negative eigenvalues"
    covpool.sqrtm(a, "ns", check_input=True)
    jitter = a + 1e-8 * torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(8))
    covpool.sqrtm(jitter, check_input=True)
    covpool.sqrtm(1e-30 * well_conditioned(2, 5, seed=28), check_input=True)


@pytest.mark.parametrize("backend", EXACT_FORWARD)
def test_exact_forward_backends_clip_a_negative_eigenvalue(backend):
    # The documented behaviour on unchecked indefinite input: the root of the PSD part.
    a, q, lam = indefinite()
    torch.testing.assert_close(covpool.sqrtm(a, backend), (q * lam.clamp_min(0).sqrt()) @ q.T, rtol=0, atol=1e-6)


# -- float32 eigh that does not converge -------------------------------------------------------------------------
def _dead_relu_covariance() -> torch.Tensor:
    """A 64×64 covariance from training (a ResNet's CovPool after its reduction conv + ReLU): 51 of 64
    channels exactly zero. On some CPUs float32 LAPACK fails to converge on it (batched: NaN, silently)."""
    from pathlib import Path

    data = torch.load(Path(__file__).parent / "data" / "eigh_float32_nonconvergence.pt", weights_only=True)
    a = torch.zeros(data["size"], data["size"])
    a[data["index"].unsqueeze(-1), data["index"]] = data["block"]
    return a


@pytest.mark.parametrize("backend", EXACT_FORWARD)
def test_spectral_backends_stay_finite_where_float32_eigh_fails(backend):
    a = _dead_relu_covariance().expand(3, 64, 64).clone().requires_grad_()
    out = covpool.sqrtm(a, backend=backend)
    out.backward(torch.randn_like(out))
    # reference: float64, with the backends' documented eigenvalue floor (10·ε₃₂·λmax: the 51 null channels
    # get √floor on the diagonal)
    lam, v = torch.linalg.eigh(a.detach().double())
    lam = lam.clamp_min(10 * torch.finfo(torch.float32).eps * lam[..., -1:])
    ref = (v * lam.sqrt().unsqueeze(-2)) @ v.mT
    assert torch.isfinite(out).all() and torch.isfinite(a.grad).all()
    assert rel(out.double(), ref) < 1e-5


def test_eigh_redoes_only_the_failed_matrices_in_float64(monkeypatch):
    from covpool.linalg import _spectral

    real = torch.linalg.eigh
    calls = []

    def flaky(x):  # float32 LAPACK failing on matrix 1 of the batch, as ssyevd does
        calls.append((tuple(x.shape), x.dtype))
        lam, v = real(x)
        if x.dtype == torch.float32:
            lam[1] = float("nan")
        return lam, v

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    a = well_conditioned(4, 8, dtype=torch.float32, seed=3)
    lam, v = _spectral._eigh_checked(a, "eig")
    assert calls == [((4, 8, 8), torch.float32), ((1, 8, 8), torch.float64)]
    ref_lam, _ = real(a.double())
    assert torch.allclose(lam.double(), ref_lam, rtol=1e-5, atol=1e-6)
    assert rel((v * lam.unsqueeze(-2)) @ v.mT, a) < 1e-5

    def raising(x):  # a single matrix: float32 LAPACK raises instead
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(x)

    monkeypatch.setattr(torch.linalg, "eigh", raising)
    lam, v = _spectral._eigh_checked(a[0], "eig")
    assert lam.dtype == torch.float32 and rel((v * lam.unsqueeze(-2)) @ v.mT, a[0]) < 1e-5


@pytest.mark.parametrize("backend", ["eig", "svd_pi", "svd_taylor", "svd_pade"])
def test_eigenvalue_floor_must_be_below_the_largest_eigenvalue(backend):
    # eps is relative to the largest eigenvalue: at 10 every eigenvalue was raised to 10·λmax (root 3× off).
    with pytest.raises(ValueError, match=rf"{backend}.eps must be a number in \(0, 1\) or None.*got 10"):
        covpool.sqrtm(torch.eye(3), backend, eps=10)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        covpool.sqrtm(torch.eye(3), backend, eps=1.0)
    assert torch.allclose(covpool.sqrtm(4 * torch.eye(3), backend, eps=0.5), 2 * torch.eye(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["eig", "svd_pade"])
def test_non_finite_input_to_the_eigendecomposition_says_so(backend, dtype):
    # LAPACK blames the conditioning ("ill-conditioned"), or returns NaN; the message must name the NaN.
    a = torch.eye(4, dtype=dtype).repeat(3, 1, 1)
    a[1] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError, match="NaN or inf entries \\(index 1 of a batch of 3\\)"):
        covpool.sqrtm(a, backend)
    x = torch.randn(2, 8, 5, dtype=dtype)
    x[0, 0, 0] = float("inf")
    for gram in (False, True):
        with pytest.raises(torch.linalg.LinAlgError, match="NaN or inf entries"):
            covpool.cov_pool(x, backend, gram=gram)
    with pytest.raises(torch.linalg.LinAlgError, match="NaN or inf entries"):
        covpool.ZCABatchNorm2d(8, group_size=4, backend=backend).to(dtype)(torch.full((2, 8, 3, 3), float("nan"),
                                                                                      dtype=dtype))


def test_lyapunov_solver_needs_a_step():
    b, c = torch.eye(3).expand(1, 3, 3), torch.ones(1, 3, 3)
    with pytest.raises(ValueError, match="num_iters must be an integer >= 1"):
        lyapunov_sign(b, c, 0)
    before = c.clone()
    lyapunov_sign(b, c, 2)
    assert torch.equal(c, before), "the right-hand side must not be modified"


def test_empty_covariance_root_stays_on_the_graph():
    x = torch.randn(2, 0, 5, requires_grad=True)
    out = covpool.covariance_sqrtm(x)
    assert out.shape == (2, 0, 0) and out.requires_grad


def test_the_quick_start_figures():
    """The quick start (README, docs/guides/install.md): the distance of each backend's root of its rank-deficient
    covariance to the float64 root, and of the whitening line's inverse roots, as its comments and
    docs/guides/backends.md ("On a rank-deficient covariance") quote them (the SVD family's forward is eig's, by
    construction). One float64 eigendecomposition gives every reference: adding eps·I keeps the eigenvectors."""
    torch.manual_seed(0)
    x = torch.randn(8, 256, 49)
    cov = covpool.covariance(x)
    lam, v = torch.linalg.eigh(covpool.covariance(x.double()))

    def exact(f):
        return (v * f(lam.clamp_min(0)).unsqueeze(-2)) @ v.mT

    for backend, err in {"eig": 3.2e-3, "ns": 0.18, "mpa_lya": 0.52, "mtp_lya": 1.01}.items():
        assert rel(covpool.sqrtm(cov, backend).double(), exact(torch.sqrt)) == pytest.approx(err, rel=0.05), backend
    eye = torch.eye(256)
    for eps, spec, err in [(0.1, "eig", 3.3e-6), (0.1, {"name": "mpa_lya", "refine": 2}, 0.13), (0.1, "ns", 0.85),
                           (1.0, {"name": "mpa_lya", "refine": 2}, 1.3e-4), (1e-3, "eig", 3.1e-4)]:
        ref = exact(lambda lam, eps=eps: (lam + eps).rsqrt())
        assert rel(covpool.inv_sqrtm(cov + eps * eye, spec).double(), ref) == pytest.approx(err, rel=0.1), (eps, spec)
