"""The Gram side: the root of a covariance of M samples from its M×M Gram matrix, against the d×d side.

Every backend with a Gram form must give the channel side's value and gradient (float64 to 1e-10 relative)
at M < d, M = d − 1 and M ≥ d, with repeated and zero eigenvalues; the automatic choice must pick the side
with fewer products; covariance pooling must keep no more for backward than the shapes allow; and the
product backends must run without a host synchronisation (FakeTensor), also on a CUDA device.
"""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import covpool
from covpool.testing import rel

GRAM_BACKENDS = [b for b in covpool.list_backends() if covpool.get_backend(b).gram_fn is not None]
SPECTRAL = ["eig", "svd_pi", "svd_taylor", "svd_pade"]
PRODUCT_BACKENDS = ["ns", "mtp_lya", "mpa_lya"]


def test_every_shipped_backend_has_a_gram_side():
    assert GRAM_BACKENDS == covpool.list_backends()[:7]


def features(d, m, rank=None, spectrum=None, dead=0, seed=0, batch=2):
    """(batch, d, m) float64 features whose centred covariance has the given singular-value ``spectrum``
    (rank ``len(spectrum)``), or random ones; ``dead`` leading channels are exactly zero (dead ReLUs)."""
    g = torch.Generator().manual_seed(seed)
    if spectrum is None:
        x = torch.randn(batch, d, m, generator=g, dtype=torch.float64)
    else:
        r = len(spectrum)
        q, _ = torch.linalg.qr(torch.randn(batch, d, r, generator=g, dtype=torch.float64))
        raw = torch.randn(batch, m, r, generator=g, dtype=torch.float64)
        raw = raw - raw.mean(-2, keepdim=True)  # orthogonal to the mean direction: centring keeps it
        p, _ = torch.linalg.qr(raw)
        x = q @ torch.diag_embed(torch.tensor(spectrum, dtype=torch.float64)) @ p.mT + 0.5
    if dead:
        x[:, :dead] = 0
    return x


CASES = {
    "M<d": dict(d=24, m=6),
    "M=d-1": dict(d=24, m=23),
    "M=d": dict(d=24, m=24),
    "M>d": dict(d=24, m=31),
    # Three tied pairs and a triple in Σ's range, 15 zero eigenvalues besides.
    "repeated": dict(d=24, m=12, spectrum=[3.0, 3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5]),
    "dead channels": dict(d=24, m=12, dead=16),
}


def both_sides(backend, x, g, **options):
    out = []
    for side in (False, True):
        xi = x.clone().requires_grad_()
        root = covpool.covariance_sqrtm(xi, backend, gram=side, **options)
        (grad,) = torch.autograd.grad((root * g).sum(), xi)
        out.append((root.detach(), grad))
    return out


# In float64 the channel side's eigh leaves Σ's zero eigenvalues at ~1e-15·λmax, above the default floor of
# 10·ε·λmax = 2e-15·λmax, so that side's own result is off by ~1e-9 (the Gram side has exact zeros). A floor
# above the rounding compares the two algorithms rather than the rounding.
FLOAT64_OPTIONS = {b: {"eps": 1e-9} for b in SPECTRAL}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", GRAM_BACKENDS)
def test_gram_side_equals_channel_side_in_float64(backend, case):
    x = features(**CASES[case])
    d = x.shape[-2]
    g = torch.randn(x.shape[0], d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (root_c, grad_c), (root_g, grad_g) = both_sides(backend, x, g, **FLOAT64_OPTIONS.get(backend, {}))
    assert rel(root_g, root_c) < 1e-10
    if case == "repeated" and backend.startswith("svd"):
        # The SVD family's gradients bound 1/(λi − λj) per *pair of eigenvectors*: within a cluster of equal
        # eigenvalues they depend on the basis LAPACK returns, on either side. For an upstream gradient that
        # is a function of Σ (the same in every eigenbasis) both sides must still agree.
        xc = x - x.mean(-1, keepdim=True)
        cov = xc @ xc.mT / x.shape[-1]
        (_, grad_c), (_, grad_g) = both_sides(backend, x, cov @ cov, **FLOAT64_OPTIONS[backend])
    assert rel(grad_g, grad_c) < 1e-10


# float32 against float64: the channel side loses ~1e-4 where its eigh leaves Σ's null space at ~1e-7·λmax
# (the spectral gradients) and in the Padé solve of an ill-conditioned d×d polynomial (mpa_lya); the Gram side
# has exact zeros and an N×N solve (measured ≤ 3e-6 at d = 256, M = 49 and 196).
FLOAT32_TOL = {"eig": 1e-3, "svd_pi": 1e-3, "svd_taylor": 1e-3, "svd_pade": 1e-3, "ns": 1e-5, "mtp_lya": 1e-5,
               "mpa_lya": 1e-3}


@pytest.mark.parametrize("backend", GRAM_BACKENDS)
def test_gram_side_agrees_in_float32_and_is_accurate(backend, device):
    x = features(64, 20, seed=3)
    g = torch.randn(2, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    floor32 = {"eps": 10 * torch.finfo(torch.float32).eps} if backend in SPECTRAL else {}
    (_, _), (ref_root, ref_grad) = both_sides(backend, x, g, **floor32)  # float64 Gram side: the reference
    x32, g32 = x.float().to(device), g.float().to(device)
    (root_c, grad_c), (root_g, grad_g) = both_sides(backend, x32, g32)
    assert rel(root_g, root_c) < FLOAT32_TOL[backend] and rel(grad_g, grad_c) < FLOAT32_TOL[backend]
    assert rel(root_g, ref_root) < 1e-5 and rel(grad_g, ref_grad) < 1e-5


@pytest.mark.parametrize("backend", ["mtp_lya", "mpa_lya"])
def test_gram_side_with_newton_schulz_refinement(backend):
    x = features(24, 8, seed=4)
    g = torch.randn(2, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    (root_c, grad_c), (root_g, grad_g) = both_sides(backend, x, g, refine=2)
    assert rel(root_g, root_c) < 1e-10 and rel(grad_g, grad_c) < 1e-10


def decaying(d=48, m=40, smallest=1e-4, seed=12):
    """Centred features whose singular values fall log-evenly from 1 to ``smallest`` (eigenvalues to its square)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(2, d, m, generator=g, dtype=torch.float64))
    raw = torch.randn(2, m, m, generator=g, dtype=torch.float64)
    p, _ = torch.linalg.qr(raw - raw.mean(-2, keepdim=True))
    s = torch.logspace(0, math.log10(smallest), m - 1, dtype=torch.float64)
    return (q[..., :m - 1] * s) @ p[..., :m - 1].mT * m ** 0.5 + 0.3


@pytest.mark.parametrize("backend", ["mtp_lya", "mpa_lya"])
def test_gram_side_refinement_stays_stable_on_an_ill_conditioned_covariance(backend):
    # Eigenvalues from 1 to 1e-8: the refinement must stay coupled (Y and Z) on the Gram side; a Z-only form
    # drifted from the d×d side step by step (float64: 4e-7 at 3 steps) and blew up in float32 (gradient 2e2).
    x = decaying()
    g = torch.randn(2, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    for refine in (1, 2, 3):
        (root_c, grad_c), (root_g, grad_g) = both_sides(backend, x, g, refine=refine)
        assert rel(root_g, root_c) < 1e-10 and rel(grad_g, grad_c) < 1e-9, refine
        x32 = x.float().requires_grad_()
        out = covpool.covariance_sqrtm(x32, backend, gram=True, refine=refine)
        (grad32,) = torch.autograd.grad((out * g.float()).sum(), x32)
        assert rel(out, root_g) < 1e-3 and rel(grad32, grad_g) < 0.05, refine


@pytest.mark.parametrize("backend", SPECTRAL)
def test_gram_side_with_positive_eigenvalues_below_the_floor(backend):
    # Eigenvalues between 0 and the floor (here 1e-9·λmax): raised to the floor on both sides, where the
    # SVD family's kernel between two floored directions is f'(floor) (a basis-free choice, as eig's).
    x = decaying(d=24, m=12, smallest=2e-5)  # eigenvalues down to 4e-10
    g = torch.randn(2, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    (root_c, grad_c), (root_g, grad_g) = both_sides(backend, x, g, eps=1e-9)
    # 1e-9 is the d×d side's own rounding with eigenvalues of 4e-10 (eig too); the kernel mismatch was 0.2.
    assert rel(root_g, root_c) < 1e-10 and rel(grad_g, grad_c) < 1e-8


def test_uncentred_second_moment():
    x = features(24, 8, seed=8)
    g = torch.randn(2, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for backend in ("ns", "eig"):
        roots = []
        for side in (False, True):
            xi = x.clone().requires_grad_()
            root = covpool.covariance_sqrtm(xi, backend, centered=False, gram=side, **FLOAT64_OPTIONS.get(backend, {}))
            roots.append((root, torch.autograd.grad((root * g).sum(), xi)[0]))
        assert rel(roots[1][0], roots[0][0]) < 1e-10 and rel(roots[1][1], roots[0][1]) < 1e-10
        assert rel(roots[0][0], covpool.sqrtm(x @ x.mT / 8, backend, **FLOAT64_OPTIONS.get(backend, {}))) < 1e-12


def test_null_space_value_of_the_approximants_is_kept():
    # The Taylor polynomial of √(1 − x) at x = 1 is not 0: the channel side gives Σ's null space the value
    # √‖Σ‖·Σ c_k, and so must the Gram side (it is most of mtp_lya's error on rank-deficient input).
    x = features(32, 4, seed=9)
    root = covpool.covariance_sqrtm(x, "mtp_lya", gram=True)
    xc = x - x.mean(-1, keepdim=True)
    null = torch.linalg.svd(xc, full_matrices=True).U[..., 4:]  # directions orthogonal to the features
    cov = xc @ xc.mT / 4
    value = torch.linalg.matrix_norm(cov).sqrt() * sum(covpool.linalg._coefficients.taylor_sqrt(10, False))
    got = null.mT @ root @ null
    eye = torch.eye(got.shape[-1], dtype=got.dtype)
    assert rel(got, value[:, None, None] * eye) < 1e-10 and float(value.min()) > 0.1


# ------------------------------------------------------------------------------------------- the choice
def flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("backend", PRODUCT_BACKENDS)
def test_automatic_choice_takes_the_side_with_fewer_products(backend):
    # Below the crossover the Gram side costs fewer multiply-adds, forward and backward; at M = d more (the
    # eigendecomposition backends' eigh is not counted by the flop counter; their crossover is measured:
    # docs/guides/backends.md, "Second order at first-order cost: the Gram side").
    d = 64
    entry = covpool.get_backend(backend)
    for m, gram_cheaper in ((d // 4, True), (d, False), (2 * d, False)):
        x = torch.randn(2, d, m, requires_grad=True)

        def step(side, x=x):
            covpool.covariance_sqrtm(x, backend, gram=side).sum().backward()

        cheaper = flops(lambda: step(True)) < flops(lambda: step(False))
        assert cheaper == gram_cheaper, (m, flops(lambda: step(True)), flops(lambda: step(False)))
        assert entry.uses_gram(d, m) == gram_cheaper


def test_choice_follows_the_declared_crossover():
    for name in GRAM_BACKENDS:
        b = covpool.get_backend(name)
        assert 0.5 <= b.gram_below <= 1.0
        below, above = math.ceil(b.gram_below * 256) - 1, math.ceil(b.gram_below * 256)
        assert b.uses_gram(256, below) and not b.uses_gram(256, above)
        assert b.uses_gram(256, 300, gram=True) and not b.uses_gram(256, 10, gram=False)


def test_gram_option_errors():
    def eig_only(a, inverse):
        return covpool.sqrtm(a, "eig")

    from covpool.linalg import _registry

    registry = dict(_registry._REGISTRY)
    try:
        covpool.register_backend("no_gram_side", eig_only)
        with pytest.raises(ValueError, match="'no_gram_side' has no Gram-side form.*eig, svd_pi"):
            covpool.covariance_sqrtm(torch.randn(8, 3), "no_gram_side", gram=True)
        with pytest.raises(ValueError, match="'no_gram_side' has no Gram-side form"):
            covpool.CovPool(8, None, backend="no_gram_side", gram=True)
        out = covpool.covariance_sqrtm(torch.randn(8, 3, dtype=torch.float64), "no_gram_side")  # auto: channel side
        assert out.shape == (8, 8)
    finally:
        _registry._REGISTRY.clear()
        _registry._REGISTRY.update(registry)
    with pytest.raises(ValueError, match="gram must be 'auto', True or False, got 'yes'"):
        covpool.CovPool(8, 4, gram="yes")
    with pytest.raises(ValueError, match="gram must be 'auto', True or False"):
        covpool.cov_pool(torch.randn(2, 8, 3), gram=1)


# --------------------------------------------------------------------------------- covariance pooling
@pytest.mark.parametrize("backend", GRAM_BACKENDS)
def test_covpool_gram_side_for_maps_and_tokens(backend, device):
    torch.manual_seed(0)
    pool = covpool.CovPool(16, 12, backend=backend).to(device, torch.float64)
    for x in (torch.randn(3, 16, 2, 3), torch.randn(3, 6, 16)):  # 6 positions < 12 channels
        x = x.to(device, torch.float64)
        outs = []
        for side in (False, True):
            pool.gram = side
            xi = x.clone().requires_grad_()
            y = pool(xi)
            outs.append((y, torch.autograd.grad(y.square().sum(), xi)[0]))
        tol = 1e-7 if backend in SPECTRAL else 1e-10  # default floor: the channel side's null-space rounding
        assert rel(outs[1][0], outs[0][0]) < tol and rel(outs[1][1], outs[0][1]) < tol


@pytest.mark.parametrize("backend", ["ns", "mpa_lya"])  # mtp_lya shares mpa_lya's code; ~10-18 s each
def test_gram_side_under_torch_compile_fullgraph(backend):
    x = torch.randn(2, 16, 5, generator=torch.Generator().manual_seed(0))
    covpool.testing.assert_compiles_like_eager(lambda t: covpool.cov_pool(t, backend, gram=True), x)


@pytest.mark.parametrize("backend", GRAM_BACKENDS)
def test_gram_side_under_autocast(backend, device):
    x = torch.randn(2, 32, 7, dtype=torch.float32, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = covpool.cov_pool(x, backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, covpool.cov_pool(x, backend, gram=True))
    half = covpool.cov_pool(x.to(torch.bfloat16), backend)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, covpool.cov_pool(x.to(torch.bfloat16).float(), backend).to(torch.bfloat16))


def saved_bytes(module, x):
    """Bytes of the tensors autograd keeps for the backward of ``module(x)``, each storage once."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def isqrt_bound(batch, c, d, m, num_iters, gram):
    """What iSQRT-COV's head keeps for backward, in float32 elements: the reduction's input, BatchNorm's
    input and ReLU's output, the centred factors and one d×M product, and the 3N − 2 Newton–Schulz iterates
    with the input (Gram side: M×M; channel side: d×d), plus the reduction's parameters."""
    side = m if gram else d
    return 4 * (batch * (c * m + 4 * d * m + (3 * num_iters + 1) * side * side) + d * c + 6 * d + 1024)


def authors_bound(batch, c, d, m, num_iters):
    """The published layer (fast-MPN-COV's MPNCOV): the same reduction, its Covpool's input and M×M centring
    matrix, Sqrtm's input, A, YZY, N iterates of Y and of Z, and Triuvec's input."""
    return 4 * batch * (c * m + 3 * d * m + m * m + (2 * num_iters + 4) * d * d)


@pytest.mark.parametrize("hw", [4, 7])
def test_covpool_ns_saved_for_backward_is_bounded_by_the_shapes(hw):
    batch, c, d = 2, 64, 32
    x = torch.randn(batch, c, hw, hw, requires_grad=True)
    gram = covpool.get_backend("ns").uses_gram(d, hw * hw)
    assert gram == (hw == 4)
    measured = saved_bytes(covpool.CovPool(c, d, backend="ns"), x)
    assert measured <= isqrt_bound(batch, c, d, hw * hw, 5, gram)


@pytest.mark.parametrize("hw", [7, 14])
def test_isqrt_cov_head_keeps_less_than_the_published_layer(hw):
    # ResNet-50's head, 2048 -> 256 channels, batch 32: the bound, against the published layer's figure.
    m = hw * hw
    ours = isqrt_bound(32, 2048, 256, m, 5, gram=covpool.get_backend("ns").uses_gram(256, m))
    assert ours < authors_bound(32, 2048, 256, m, 5)


# ------------------------------------------------------------------------------ ready for a GPU
@pytest.mark.parametrize("backend", PRODUCT_BACKENDS)
def test_product_backends_never_synchronise_with_the_host(backend):
    # A FakeTensor has no data: .item(), bool(t) or a data-dependent branch raises. The forward runs on a fake
    # CUDA device (no GPU needed); autograd's engine needs a real CUDA context for CUDA tensors, so the
    # backward runs on fake CPU tensors, where the same ops would raise just the same.
    for device in ("cuda", "cpu"):
        with FakeTensorMode():
            pool = covpool.CovPool(32, 16, backend=backend, device=device)
            for hw in (3, 8):  # Gram side and channel side
                x = torch.randn(2, 32, hw, hw, device=device, requires_grad=device == "cpu")
                y = pool(x)
                assert y.device.type == device and y.shape == (2, 136)
                if device == "cpu":
                    y.sum().backward()
                a = torch.randn(2, 16, 16, device=device)
                covpool.sqrtm(a @ a.mT, backend)
                covpool.inv_sqrtm(a @ a.mT, backend)


def test_eigendecomposition_backends_synchronise():
    # eigh itself synchronises on CUDA, and covpool checks its result for LAPACK's non-convergence
    # (docs/guides/backends.md, "Numerical caveats").
    from torch._subclasses.fake_tensor import DataDependentOutputException

    with FakeTensorMode(), pytest.raises(DataDependentOutputException):
        a = torch.randn(2, 8, 8)
        covpool.sqrtm(a @ a.mT, "eig")


# --------------------------------------------------------------------------------- TF32 products
def test_tf32_option_switches_cuda_products_only_inside_the_backend():
    from covpool.linalg._matrix import products_in_tf32

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with products_in_tf32(torch.device("cuda"), True):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with products_in_tf32(torch.device("cpu"), True), products_in_tf32(torch.device("cuda"), False):
        assert matmul.fp32_precision == before
    a = covpool.testing.well_conditioned(2, 8, dtype=torch.float32)
    for backend in ("ns", "mtp_lya"):  # on the CPU the option changes nothing
        assert torch.equal(covpool.sqrtm(a, backend, tf32=True), covpool.sqrtm(a, backend))
    with pytest.raises(ValueError, match="ns.tf32 must be true or false, got 'yes'"):
        covpool.sqrtm(a, "ns", tf32="yes")
    with pytest.raises(TypeError, match="unknown option"):
        covpool.sqrtm(a, "mpa_lya", tf32=True)


def test_tf32_switch_is_restored_after_concurrent_regions():
    import threading

    from covpool.linalg._matrix import products_in_tf32

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    inside = threading.Barrier(2)
    done = threading.Event()

    def replica(first):
        with products_in_tf32(torch.device("cuda"), True):
            inside.wait()  # both regions are open
            if first:
                done.wait(5)  # the first to enter leaves last
            else:
                done.set()

    threads = [threading.Thread(target=replica, args=(i == 0,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert matmul.fp32_precision == before


def errors(backend, a64, g64, rounding=None, **options):
    x = a64.float().clone().requires_grad_()
    with covpool.testing.round_products(rounding) if rounding else torch.enable_grad():
        out = covpool.sqrtm(x, backend, **options)
        (out * g64.float()).sum().backward()
    return (rel(out, covpool.testing.exact_root(a64)), rel(x.grad, covpool.testing.exact_grad(a64, g64)))


@pytest.mark.parametrize("backend, offered", [("ns", True), ("mtp_lya", True), ("mpa_lya", False)])
def test_tf32_products_stay_within_the_backends_own_error(backend, offered):
    # Why ns and mtp_lya offer tf32=True and mpa_lya does not (docs/guides/backends.md, "TF32 and bf16
    # products"): with TF32 operands their error against the exact root and gradient moves by less than 1% of
    # what their own approximation already costs; mpa_lya's Padé solve amplifies the rounding ~7×.
    a = covpool.testing.well_conditioned(4, 64, seed=0)
    g = torch.randn(4, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    full, tf32 = errors(backend, a, g), errors(backend, a, g, "tf32")
    within = all(abs(t - f) < 0.01 * f for f, t in zip(full, tf32))
    assert within == offered, (full, tf32)


# ---------------------------------------------------------------------------------- features far from 1
@pytest.mark.parametrize("scale", [1e20, 1e-20])
@pytest.mark.parametrize("backend", covpool.list_backends())
def test_float32_features_far_from_one_give_the_float64_root(backend, scale):
    """Beyond ~1e±19 the products of float32 features over- or underflow (before: NaN at ×1e20 for the product
    backends, a LinAlgError for eig; 0.85% to 135% off at ×1e-20). Formed from features divided by a power of
    two and scaled back, the root is as close to the float64 one as float32 features of order 1 give, forward
    and gradient, on both sides (√Σ(s·x) = s·√Σ(x), so the gradient at s·x is the gradient at x). The float32
    error at order 1 is the bound: on the rank-deficient Gram-side input it is 2e-3 for eig and the SVD family,
    whose eigenvalue floor (10·ε of the dtype) gives the null space √floor."""
    g = torch.Generator().manual_seed(3)
    for d, m in [(8, 40), (16, 6)]:  # the d×d side, the Gram side
        x = torch.randn(2, d, m, generator=g, dtype=torch.float64, requires_grad=True)
        ref = covpool.covariance_sqrtm(x, backend)
        up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        (ref_grad,) = torch.autograd.grad(ref, x, up)
        errors = []
        for factor in (1.0, scale):
            y = (x.detach() * factor).float().requires_grad_()
            root = covpool.covariance_sqrtm(y, backend)
            (grad,) = torch.autograd.grad(root, y, up.float())
            errors.append((rel(root.double() / factor, ref), rel(grad.double(), ref_grad)))
        (fwd1, grad1), (fwd, grad) = errors
        assert fwd <= 2 * fwd1 + 1e-6 and grad <= 2 * grad1 + 1e-6, (d, m, errors)
    pool = covpool.CovPool(16, None, backend=backend)  # (B, 16, 6, 1) maps
    maps = x.detach().unsqueeze(-1)
    torch.testing.assert_close(pool((maps * scale).float()).double() / scale, pool(maps.float()).double(),
                               rtol=1e-4, atol=1e-5)
    power = covpool.covariance_power((x.detach() * scale).float(), 0.5).double() / scale
    assert rel(power, covpool.covariance_power(x.detach().float(), 0.5).double()) < 1e-5


def test_covariance_far_from_one_is_inf_where_it_must_be_and_keeps_its_digits_below():
    x = torch.randn(2, 4, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, 0] = 0.0  # a dead channel: its row of the covariance is 0, never 0·inf = NaN
    big = covpool.covariance((x * 1e20).float())
    ref = covpool.covariance(x) * 1e40
    beyond = ref.abs() > torch.finfo(torch.float32).max
    assert beyond.any() and torch.equal(torch.isinf(big), beyond) and not big.isnan().any()
    assert (big[:, 0] == 0).all()
    torch.testing.assert_close(big[~beyond].double(), ref[~beyond], rtol=1e-5, atol=0)
    small = covpool.covariance((x * 1e-20).float()).double()  # ~1e-40: float32 subnormals
    assert rel(small, covpool.covariance(x) * 1e-40) < 1e-4


@pytest.mark.parametrize("backend", covpool.list_backends())
def test_a_shipped_backend_given_the_scale_returns_the_root_of_the_unscaled_matrix(backend):
    """The shipped backends fold the features' power-of-two scale into their small tensors: ``fn(A, scale=t)``
    is the (inverse) root of t²·A and ``gram(U, scale=t)`` the root of (tU)(tU)ᵀ, value and gradient."""
    entry = covpool.get_backend(backend)
    assert entry.fn_scale and entry.gram_scale
    t = torch.tensor([4.0, 0.125], dtype=torch.float64).view(2, 1, 1)
    g = torch.Generator().manual_seed(5)
    a = covpool.covariance(torch.randn(2, 6, 20, generator=g, dtype=torch.float64)).requires_grad_()
    u = torch.randn(2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    cases = [(lambda a: entry.fn(a, inverse, scale=t, **entry.defaults),
              lambda a: entry.fn(a * t * t, inverse, **entry.defaults), a) for inverse in (False, True)]
    cases.append((lambda u: entry.gram_fn(u, scale=t, **entry.defaults),
                  lambda u: entry.gram_fn(u * t, **entry.defaults), u))
    for folded, plain, x in cases:
        out, ref = folded(x), plain(x)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=0)
        torch.testing.assert_close(*(torch.autograd.grad(y, x, up)[0] for y in (out, ref)), rtol=1e-9, atol=1e-12)
