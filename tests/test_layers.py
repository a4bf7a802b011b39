"""Meta-layers against float64 references: CovPool, SoViTHead, ZCABatchNorm1d/2d, convert_sync_zca.

The references below are written out directly (explicit centring matrix, eigh, Python loops over the
upper triangle and over groups) so that they share no code with covpool.
"""
import pytest
import torch
from torch import nn

import covpool
from covpool.layers import (
    CovPool,
    SoViTHead,
    ZCABatchNorm1d,
    ZCABatchNorm2d,
    convert_sync_zca,
    cov_pool,
    zca_batch_norm,
)
from covpool.linalg import get_backend
from covpool.testing import rel

F64 = torch.float64
BACKENDS = covpool.list_backends()
EXACT_FORWARD = {"eig", "svd_pi", "svd_taylor", "svd_pade"}


# --------------------------------------------------------------------------------------- references
def ref_cov(x):
    """(B, d, N) -> (B, d, d), centred with the explicit N×N matrix I − 11ᵀ/N, divided by N."""
    n = x.shape[-1]
    centre = torch.eye(n, dtype=F64) - torch.full((n, n), 1.0 / n, dtype=F64)
    return x.double() @ centre @ x.double().mT / n


def ref_root(a, inverse=False):
    lam, v = torch.linalg.eigh(a.double())
    f = lam.rsqrt() if inverse else lam.clamp_min(0).sqrt()
    return v @ torch.diag_embed(f) @ v.mT


def ref_triu(a):
    d = a.shape[-1]
    return torch.stack([a[..., i, j] for i in range(d) for j in range(i, d)], dim=-1)


def ref_zca(x, group_size, eps, weight=None, bias=None, mean=None, cov=None):
    """Whitening of (B, C, *) one group at a time; batch statistics unless mean/cov are given."""
    c = x.shape[1]
    flat = x.double().transpose(0, 1).reshape(c, -1)
    out = torch.empty_like(flat)
    for g in range(c // group_size):
        rows = slice(g * group_size, (g + 1) * group_size)
        xg = flat[rows]
        mu = xg.mean(dim=1, keepdim=True) if mean is None else mean[rows, None].double()
        sigma = ref_cov(xg[None])[0] if cov is None else cov[g].double()
        out[rows] = ref_root(sigma + eps * torch.eye(group_size, dtype=F64), inverse=True) @ (xg - mu)
    if weight is not None:
        out = out * weight.double()[:, None] + bias.double()[:, None]
    return out.reshape(c, x.shape[0], *x.shape[2:]).transpose(0, 1)


def randomise(module, seed=0):
    """Non-trivial affine parameters and BatchNorm statistics, so that they are tested too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, ZCABatchNorm1d, ZCABatchNorm2d)) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g, dtype=F64))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=F64))
    return module


def correlated(*shape, seed=0):
    """(B, C, *) float64 with correlated channels and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(shape[1], shape[1], generator=g, dtype=F64)
    z = torch.randn(shape, generator=g, dtype=F64)
    return torch.einsum("dc,bc...->bd...", mix, z) + 1.5


def backend_specs():
    """Every registered backend as a name and as a dict spelling out all its default options."""
    specs = []
    for name in BACKENDS:
        specs.append(pytest.param(name, id=f"{name}-name"))
        specs.append(pytest.param({"name": name, **get_backend(name).defaults}, id=f"{name}-dict"))
    return specs


def backend_name(spec):
    return spec if isinstance(spec, str) else spec["name"]


def assert_grads_everywhere(module):
    for name, p in module.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
        assert p.grad.abs().max() > 0, f"zero gradient in {name}"


def test_every_public_layer_name_is_covpools_too():  # the snapshot of the names: tests/test_api.py
    for name in covpool.layers.__all__:
        assert getattr(covpool, name) is getattr(covpool.layers, name)


# ------------------------------------------------------------------------------------------- CovPool
def test_covpool_matches_reference_for_maps_and_tokens(device):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4, dtype=F64)
    expected = ref_root(ref_cov(x.flatten(2)))
    pool = CovPool(5, reduced_dim=None, backend="eig", device=device)
    assert pool.out_features == 15
    torch.testing.assert_close(pool(x.to(device)).cpu(), ref_triu(expected), rtol=1e-10, atol=1e-12)
    tokens = x.flatten(2).transpose(1, 2).to(device)
    torch.testing.assert_close(pool(tokens).cpu(), ref_triu(expected), rtol=1e-10, atol=1e-12)
    matrix = CovPool(5, reduced_dim=None, backend="eig", vectorize=False)
    assert matrix.out_features == 5
    torch.testing.assert_close(matrix(x.to(device)).cpu(), expected, rtol=1e-10, atol=1e-12)


def test_covpool_reduction_is_conv_bn_relu_and_shared_by_both_layouts():
    torch.manual_seed(0)
    pool = randomise(CovPool(6, reduced_dim=4, backend="eig", dtype=F64)).eval()
    x = torch.randn(3, 6, 4, 4, dtype=F64)
    conv, bn = pool.reduce.conv, pool.reduce.bn
    z = torch.einsum("dc,bcn->bdn", conv.weight[:, :, 0, 0], x.flatten(2))
    z = (z - bn.running_mean[:, None]) / (bn.running_var[:, None] + bn.eps).sqrt()
    z = (z * bn.weight[:, None] + bn.bias[:, None]).clamp_min(0)
    expected = ref_triu(ref_root(ref_cov(z)))
    assert pool.out_features == 10
    with torch.no_grad():
        torch.testing.assert_close(pool(x), expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(pool(x.flatten(2).transpose(1, 2)), expected, rtol=1e-9, atol=1e-12)


def test_covpool_default_is_isqrt_cov():
    pool = CovPool(16)
    assert pool.backend == "ns" and pool.dim == 256 and pool.out_features == 32896
    assert get_backend("ns").defaults["num_iters"] == 5


# ------------------------------------------------------------------------------------------ SoViTHead
def test_sovit_head_matches_reference(device):
    torch.manual_seed(0)
    head = SoViTHead(6, num_classes=3, reduced_dim=None, backend="eig", dtype=F64)
    x = torch.randn(2, 1 + 10, 6, dtype=F64)
    cov_vec = ref_triu(ref_root(ref_cov(x[:, 1:].mT)))
    expected = x[:, 0] @ head.fc_cls.weight.T + head.fc_cls.bias + cov_vec @ head.fc_cov.weight.T + head.fc_cov.bias
    assert head.cov_dim == 21 and head.num_features == 27
    head, x = head.to(device), x.to(device)
    torch.testing.assert_close(head(x).cpu(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head(x, pre_logits=True).cpu(), torch.cat([x[:, 0].cpu(), cov_vec], -1),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_sovit_head_reduction_is_conv_bn_relu(training):
    # Both releases (So-ViT, MPA-Lya So-ViT) reduce the tokens with 1×1 conv → BatchNorm → ReLU, the
    # BatchNorm over all B·N tokens.
    torch.manual_seed(0)
    head = randomise(SoViTHead(6, num_classes=2, reduced_dim=4, backend="eig", dtype=F64)).train(training)
    x = torch.randn(2, 1 + 9, 6, dtype=F64)
    conv, bn = head.pool.reduce.conv, head.pool.reduce.bn
    z = x[:, 1:] @ conv.weight[:, :, 0, 0].T
    if training:
        mean, var = z.mean(dim=(0, 1)), z.var(dim=(0, 1), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    z = torch.relu((z - mean) / (var + bn.eps).sqrt() * bn.weight + bn.bias)
    expected = torch.cat([x[:, 0], ref_triu(ref_root(ref_cov(z.mT)))], -1)
    torch.testing.assert_close(head(x, pre_logits=True), expected, rtol=1e-9, atol=1e-12)


def test_sovit_head_features_and_reset_classifier():
    torch.manual_seed(0)
    head = SoViTHead(8, num_classes=0, dtype=F64)
    assert head.reduced_dim == 64 and head.cov_dim == 2080 and head.num_features == 8 + 2080
    assert isinstance(head.fc_cls, nn.Identity) and isinstance(head.fc_cov, nn.Identity)
    x = torch.randn(2, 1 + 5, 8, dtype=F64)
    features = head(x)
    assert features.shape == (2, head.num_features)
    torch.testing.assert_close(features[:, :8], x[:, 0])

    head.reset_classifier(7)
    assert head.fc_cls.weight.shape == (7, 8) and head.fc_cov.weight.shape == (7, 2080)
    assert head.fc_cls.weight.dtype == F64
    assert head(x).shape == (2, 7)
    torch.testing.assert_close(head(x, pre_logits=True), features)
    head.reset_classifier(0)
    assert isinstance(head.fc_cov, nn.Identity) and head(x).shape == (2, head.num_features)


def test_sovit_head_dropout_acts_on_the_covariance_branch_only():
    torch.manual_seed(0)
    head = SoViTHead(8, num_classes=0, reduced_dim=6, drop_rate=0.5).train()
    x = torch.randn(4, 1 + 12, 8)
    out = head(x)
    assert torch.equal(out[:, :8], x[:, 0])
    dropped = (out[:, 8:] == 0).float().mean()
    assert 0.3 < dropped < 0.7
    head.eval()
    assert (head(x)[:, 8:] != 0).float().mean() > 0.9


# ------------------------------------------------------------------------------------------------ ZCA
@pytest.mark.parametrize("shape", [(24, 8), (6, 8, 5)], ids=["BC", "BCL"])
def test_zca1d_matches_reference(shape, device):
    x = correlated(*shape)
    zca = randomise(ZCABatchNorm1d(8, group_size=4, eps=1e-5, dtype=F64))
    expected = ref_zca(x, 4, 1e-5, zca.weight.detach(), zca.bias.detach())
    torch.testing.assert_close(zca.to(device)(x.to(device)).cpu(), expected, rtol=1e-9, atol=1e-11)


def test_zca2d_matches_reference(device):
    x = correlated(3, 8, 4, 5)
    zca = randomise(ZCABatchNorm2d(8, group_size=2, eps=1e-4, dtype=F64))
    expected = ref_zca(x, 2, 1e-4, zca.weight.detach(), zca.bias.detach())
    torch.testing.assert_close(zca.to(device)(x.to(device)).cpu(), expected, rtol=1e-9, atol=1e-11)


def test_zca_training_output_has_identity_group_covariance(device):
    # Exact backend, float64, eps 1e-12 on a covariance with eigenvalues >= O(0.1): off by < 1e-9.
    x = correlated(4, 8, 6, 6)
    zca = ZCABatchNorm2d(8, group_size=4, eps=1e-12, dtype=F64, device=device)
    out = zca(x.to(device)).cpu()
    cov = ref_cov(out.transpose(0, 1).reshape(2, 4, -1))
    torch.testing.assert_close(cov, torch.eye(4, dtype=F64).expand(2, 4, 4), rtol=0, atol=1e-9)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(8, dtype=F64), rtol=0, atol=1e-12)


def test_zca_running_update_rule():
    x = correlated(32, 8)
    zca = ZCABatchNorm1d(8, group_size=4, momentum=0.1, dtype=F64)
    zca(x)
    unbiased = ref_cov(x.T.reshape(2, 4, 32)) * 32 / 31
    torch.testing.assert_close(zca.running_mean, 0.1 * x.mean(0))
    torch.testing.assert_close(zca.running_cov, 0.9 * torch.eye(4, dtype=F64) + 0.1 * unbiased)
    assert int(zca.num_batches_tracked) == 1

    # momentum=None: the running statistics are the plain average over the batches seen.
    batches = [correlated(16, 8, seed=s) for s in range(3)]
    cumulative = ZCABatchNorm1d(8, group_size=4, momentum=None, dtype=F64)
    for b in batches:
        cumulative(b)
    torch.testing.assert_close(cumulative.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    covs = torch.stack([ref_cov(b.T.reshape(2, 4, 16)) * 16 / 15 for b in batches])
    torch.testing.assert_close(cumulative.running_cov, covs.mean(0))


def test_zca_running_statistics_converge_to_the_data_distribution():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g, dtype=F64)
    mu = torch.randn(8, generator=g, dtype=F64)
    true_cov = torch.stack([(mix @ mix.T)[i:i + 4, i:i + 4] for i in (0, 4)])
    zca = ZCABatchNorm1d(8, group_size=4, momentum=0.1, dtype=F64)
    for _ in range(100):
        zca(torch.randn(256, 8, generator=g, dtype=F64) @ mix.T + mu)
    # The moving average weighs ~19 batches of 256: a standard error of about 1.5 % of the scale.
    scale = true_cov.diagonal(dim1=-2, dim2=-1).sqrt().flatten()
    assert ((zca.running_mean - mu).abs() / scale).max() < 0.08
    assert rel(zca.running_cov, true_cov) < 0.08
    assert rel(ref_root(zca.running_cov, inverse=True), ref_root(true_cov, inverse=True)) < 0.08


def test_zca_eval_whitens_with_the_running_statistics():
    zca = randomise(ZCABatchNorm2d(8, group_size=4, dtype=F64))
    for s in range(3):
        zca(correlated(4, 8, 3, 3, seed=s))
    zca.eval()
    x = correlated(2, 8, 3, 3, seed=9)
    expected = ref_zca(x, 4, zca.eps, zca.weight.detach(), zca.bias.detach(), zca.running_mean, zca.running_cov)
    before = zca.running_cov.clone()
    torch.testing.assert_close(zca(x), expected, rtol=1e-9, atol=1e-11)
    assert torch.equal(zca.running_cov, before) and int(zca.num_batches_tracked) == 3


def test_zca_state_dict_round_trip():
    zca = randomise(ZCABatchNorm2d(8, group_size=4, momentum=0.3))
    for s in range(2):
        zca(correlated(4, 8, 3, 3, seed=s).float())
    state = zca.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_cov", "num_batches_tracked"}
    assert state["running_cov"].shape == (2, 4, 4)
    fresh = ZCABatchNorm2d(8, group_size=4)
    fresh.load_state_dict(state)
    x = correlated(2, 8, 3, 3, seed=5).float()
    assert torch.equal(fresh.eval()(x), zca.eval()(x))


def test_zca_reset_running_stats_and_parameters():
    zca = randomise(ZCABatchNorm1d(8, group_size=4))
    zca(correlated(16, 8).float())
    zca.reset_running_stats()
    assert torch.equal(zca.running_mean, torch.zeros(8))
    assert torch.equal(zca.running_cov, torch.eye(4).expand(2, 4, 4))
    assert int(zca.num_batches_tracked) == 0
    assert not torch.equal(zca.weight, torch.ones(8))
    zca.reset_parameters()
    assert torch.equal(zca.weight, torch.ones(8)) and torch.equal(zca.bias, torch.zeros(8))


def test_zca_without_running_stats_uses_batch_statistics_in_eval():
    zca = ZCABatchNorm1d(8, group_size=4, track_running_stats=False, affine=False, dtype=F64)
    assert zca.running_mean is None and zca.running_cov is None and zca.weight is None
    assert zca.state_dict() == {}
    x = correlated(16, 8)
    train_out = zca(x)
    torch.testing.assert_close(zca.eval()(x), train_out, rtol=0, atol=0)
    torch.testing.assert_close(train_out, ref_zca(x, 4, zca.eps), rtol=1e-9, atol=1e-11)


def test_zca_factory_kwargs_and_repr():
    zca = ZCABatchNorm2d(32, dtype=F64)
    assert zca.group_size == 16 and zca.backend == "eig"
    assert all(t.dtype == F64 for t in (zca.weight, zca.bias, zca.running_mean, zca.running_cov))
    assert zca.num_batches_tracked.dtype == torch.long
    assert zca(correlated(2, 32, 3, 3)).dtype == F64
    text = repr(ZCABatchNorm1d(8, group_size=4, backend={"name": "mpa_lya", "degree": [3, 3]}))
    assert "group_size=4" in text and "mpa_lya" in text and "sync" not in text


def test_convert_sync_zca_switches_layers_in_place_and_is_a_no_op_without_distributed():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), ZCABatchNorm2d(8, group_size=4), nn.Sequential(ZCABatchNorm2d(8, 8)))
    randomise(model)
    x = torch.randn(4, 3, 5, 5)
    expected = model(x)
    group = object()
    assert convert_sync_zca(model, process_group=group) is model
    assert model[1].sync and model[2][0].sync and model[1].process_group is group
    assert "sync=True" in repr(model[1])
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="nn.Module"):
        convert_sync_zca("model")


def test_zca_half_precision_is_whitened_in_float32(device):
    zca = ZCABatchNorm2d(8, group_size=4, device=device)
    x = correlated(4, 8, 4, 4)
    out = zca(x.to(device, torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double().cpu(), ref_zca(x.to(torch.bfloat16), 4, zca.eps), rtol=0.02, atol=0.05)


# -------------------------------------------------------------------------------- shared behaviours
LAYERS = {
    "covpool": (lambda b: CovPool(6, reduced_dim=None, backend=b), lambda: torch.randn(3, 6, 4, 4, dtype=F64)),
    "sovit": (lambda b: SoViTHead(6, 3, reduced_dim=None, backend=b, dtype=F64),
              lambda: torch.randn(2, 21, 6, dtype=F64)),
    "zca1d": (lambda b: ZCABatchNorm1d(8, 4, backend=b, dtype=F64), lambda: correlated(64, 8)),
    "zca2d": (lambda b: ZCABatchNorm2d(8, 4, backend=b, dtype=F64), lambda: correlated(4, 8, 4, 4)),
}
# Iterative backends at default options against eig, with about 2-3x margin over the measured error.
ITERATIVE_RTOL = {"covpool": 0.05, "sovit": 0.03, "zca1d": 0.3, "zca2d": 0.3}


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("spec", backend_specs())
def test_backend_is_swapped_by_config(layer, spec, device):
    make, data = LAYERS[layer]
    torch.manual_seed(0)
    x = data().to(device)
    reference = make("eig").to(device)
    module = make(spec).to(device)
    module.load_state_dict(reference.state_dict())
    out = module(x)
    assert torch.isfinite(out).all()
    by_name = make(backend_name(spec)).to(device)
    by_name.load_state_dict(reference.state_dict())
    torch.testing.assert_close(by_name(x), out, rtol=0, atol=0)
    expected = reference(x)
    if backend_name(spec) in EXACT_FORWARD:
        torch.testing.assert_close(out, expected, rtol=1e-8, atol=1e-10)
    else:
        assert rel(out, expected) < ITERATIVE_RTOL[layer]


RANK_DEFICIENT = {
    # N = 4 positions for d = 6 channels.
    "covpool": (lambda b: CovPool(5, reduced_dim=6, backend=b), lambda: torch.randn(2, 5, 2, 2)),
    # 3 word tokens for d = 8.
    "sovit": (lambda b: SoViTHead(5, 4, reduced_dim=8, backend=b), lambda: torch.randn(2, 1 + 3, 5)),
    # 5 samples for groups of 8 channels: eps alone keeps the whitening finite.
    "zca2d": (lambda b: ZCABatchNorm2d(8, group_size=8, backend=b), lambda: torch.randn(5, 8, 1, 1)),
    "zca1d": (lambda b: ZCABatchNorm1d(8, group_size=8, backend=b), lambda: torch.randn(5, 8)),
}


@pytest.mark.parametrize("layer", RANK_DEFICIENT)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_every_parameter_on_rank_deficient_input(layer, backend, device, dtype):
    make, data = RANK_DEFICIENT[layer]
    torch.manual_seed(0)
    module = randomise(make(backend)).train().to(device, dtype)
    x = data().to(device, dtype).requires_grad_()
    out = module(x)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    assert_grads_everywhere(module)


# -------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("module, bad, expected", [
    (CovPool(6, reduced_dim=4), torch.randn(2, 5, 3, 3),
     r"\(B, 6, H, W\) or tokens \(B, N, 6\), got shape \(2, 5, 3, 3\)"),
    (CovPool(6, reduced_dim=4), torch.randn(6, 9), r"got shape \(6, 9\)"),
    (SoViTHead(6, 2, reduced_dim=4), torch.randn(2, 5, 7), r"\(B, 1 \+ N, 6\).*got shape \(2, 5, 7\)"),
    (SoViTHead(6, 2, reduced_dim=4), torch.randn(2, 1, 6), r"N >= 1 word tokens, got shape \(2, 1, 6\)"),
    (ZCABatchNorm2d(8, 4), torch.randn(2, 8, 3), r"\(B, 8, H, W\), got shape \(2, 8, 3\)"),
    (ZCABatchNorm2d(8, 4), torch.randn(2, 6, 3, 3), r"got shape \(2, 6, 3, 3\)"),
    (ZCABatchNorm1d(8, 4), torch.randn(2, 8, 3, 3), r"\(B, 8\) or \(B, 8, L\), got shape \(2, 8, 3, 3\)"),
    (ZCABatchNorm1d(8, 4), torch.randn(1, 8), r"more than one value per channel"),
])
def test_bad_input_shapes_raise(module, bad, expected):
    with pytest.raises(ValueError, match=expected):
        module(bad)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="group_size=16 does not divide num_features=24; pick a divisor such as 12"):
        ZCABatchNorm2d(24)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        CovPool(8, backend="nope")
    with pytest.raises(TypeError, match="unknown option"):
        SoViTHead(8, 2, backend={"name": "mpa_lya", "num_iters": 3})
    with pytest.raises(ValueError, match="'name' key"):
        ZCABatchNorm1d(8, 4, backend={"degree": 3})
    with pytest.raises(ValueError, match="momentum"):
        ZCABatchNorm1d(8, 4, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        ZCABatchNorm1d(8, 4, eps=0)
    with pytest.raises(ValueError, match="reduced_dim"):
        CovPool(8, reduced_dim=0)
    with pytest.raises(ValueError, match="num_classes"):
        SoViTHead(8, -1)


def test_functional_forms_validate_their_input():
    with pytest.raises(ValueError, match=r"\(\*, d, N\).*got \(5,\)"):
        cov_pool(torch.randn(5))
    with pytest.raises(ValueError, match=r"positive divisor of the 6 channels of input shape \(4, 6\), got 4"):
        zca_batch_norm(torch.randn(4, 6), group_size=4, training=True)
    with pytest.raises(ValueError, match=r"running_cov \(2, 4, 4\).*got \(8,\) and \(1, 8, 8\)"):
        zca_batch_norm(torch.randn(4, 8), torch.zeros(8), torch.zeros(1, 8, 8), group_size=4)
    with pytest.raises(ValueError, match="both running_mean and running_cov"):
        zca_batch_norm(torch.randn(4, 8), torch.zeros(8), None, group_size=4)


@pytest.mark.parametrize("build, match", [
    (lambda: CovPool(True), "in_channels must be an integer >= 1, got True"),
    (lambda: CovPool(8, reduced_dim=2.0), "reduced_dim must be an integer >= 1 or None, got 2.0"),
    (lambda: ZCABatchNorm2d(8, 4, eps=float("inf")), r"eps must be a positive finite number, got inf"),
    (lambda: ZCABatchNorm2d(8, 4, momentum=True), r"momentum must be a number in \[0, 1\] or None"),
    (lambda: SoViTHead(8, 2, drop_rate=1), r"drop_rate must be a number in \[0, 1\), got 1"),
    (lambda: SoViTHead(8, False), "num_classes must be an integer >= 0, got False"),
    (lambda: zca_batch_norm(torch.randn(4, 8), group_size=True), "positive divisor"),
])
def test_number_guards_share_one_wording(build, match):
    # One rule for every count and number in the library: bool is not an int, the message names the
    # argument, the allowed range and the value.
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("spec, error, match", [
    ("nope", ValueError, "unknown backend 'nope'; valid backends are: eig"),
    ({"num_iters": 3}, ValueError, "needs a 'name' key"),
    ({"name": "ns", "iters": 3}, TypeError, r"unknown option\(s\) \['iters'\]"),
    (3, TypeError, "backend must be a name or a dict with 'name' and options, got int"),
])
def test_layers_check_the_backend_spec_as_the_functions_do(spec, error, match):
    # The layers fail at construction with the exact error sqrtm would raise at the first forward.
    with pytest.raises(error, match=match):
        covpool.sqrtm(torch.eye(2), spec)
    for build in (lambda: CovPool(8, backend=spec), lambda: ZCABatchNorm1d(8, 4, backend=spec),
                  lambda: SoViTHead(8, 2, backend=spec)):
        with pytest.raises(error, match=match):
            build()


# --------------------------------------------------------------------------------------- convert_zca
def _bn_net(dtype=F64):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    net = net.to(dtype)
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 3.0)
            bn.num_batches_tracked.fill_(7)
    return net


def test_convert_zca_keeps_batch_norm_eval_outputs():
    # The running variances become a diagonal running covariance: in eval mode, whitening with it is
    # BatchNorm's normalisation, so the converted model computes what the original computed.
    net = _bn_net().eval()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    expected = net(x)
    out = covpool.convert_zca(net, group_size=4)
    assert out is net and [type(m) for m in (net[1], net[4])] == [ZCABatchNorm2d, ZCABatchNorm2d]
    assert not net[1].training and net[1].running_cov.dtype == F64 and int(net[1].num_batches_tracked) == 7
    torch.testing.assert_close(net(x), expected, rtol=1e-10, atol=1e-10)


def test_convert_zca_modes_options_and_errors():
    net = _bn_net(torch.float32)
    covpool.convert_zca(net, "stem", group_size=2, backend="ns", eps=1e-3)
    assert type(net[1]) is ZCABatchNorm2d and type(net[4]) is nn.BatchNorm2d
    assert (net[1].group_size, net[1].backend, net[1].eps, net[1].momentum) == (2, "ns", 1e-3, 0.1)
    # A fresh BatchNorm2d gives exactly a fresh ZCABatchNorm2d (what `covpool train` built before).
    fresh = covpool.convert_zca(nn.BatchNorm2d(8, momentum=None, affine=False), group_size=4)
    reference = ZCABatchNorm2d(8, 4, momentum=None, affine=False)
    assert type(fresh) is ZCABatchNorm2d and fresh.extra_repr() == reference.extra_repr()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
    # Subclasses with another forward are left alone.
    sync = nn.Sequential(nn.SyncBatchNorm(8))
    with pytest.raises(ValueError, match="Sequential has no BatchNorm2d to replace"):
        covpool.convert_zca(sync)
    with pytest.raises(ValueError, match="mode must be one of 'all', 'stem', got 'none'"):
        covpool.convert_zca(_bn_net(), "none")
    with pytest.raises(ValueError, match="group_size=16 does not divide num_features=8"):
        covpool.convert_zca(_bn_net())
    with pytest.raises(TypeError, match="expects an nn.Module"):
        covpool.convert_zca("resnet18")


def test_so_vit_head_new_classifiers_follow_the_head_without_reduction():
    # head="mpa_cov", reduced_dim=None: the pooling has no parameters, the classifiers still follow the head's dtype
    head = covpool.SoViTHead(8, num_classes=3, reduced_dim=None, dtype=torch.float64)
    head.reset_classifier(5)
    assert head.fc_cls.weight.dtype == head.fc_cov.weight.dtype == torch.float64
    assert head(torch.randn(2, 5, 8, dtype=torch.float64)).shape == (2, 5)


def test_ambiguous_three_dimensional_input_needs_an_explicit_layout():
    # (B, C, N) with N = C could be tokens (B, N, C) or channels-first features: it was read as tokens silently.
    pool = CovPool(16, reduced_dim=None, backend="eig")
    x = torch.randn(2, 16, 16)
    with pytest.raises(ValueError, match=r"ambiguous: tokens \(B, N, 16\) or channels-first features \(B, 16, N\)"):
        pool(x)
    tokens = CovPool(16, reduced_dim=None, backend="eig", layout="tokens")
    torch.testing.assert_close(tokens(x), CovPool(16, None, backend="eig")(x.mT.unsqueeze(-1)))
    with pytest.raises(ValueError, match=r"expects feature maps \(B, 16, H, W\) \(layout='maps'\)"):
        CovPool(16, None, layout="maps")(torch.randn(2, 5, 16))
    assert CovPool(16, None, layout="tokens")(torch.randn(2, 5, 16)).shape == (2, 136)


@pytest.mark.parametrize("x", [torch.randn(2, 16, 0, 7), torch.randn(2, 0, 16)], ids=["empty map", "no tokens"])
def test_pooling_nothing_says_so(x):
    with pytest.raises(ValueError, match="needs at least one position to pool"):
        CovPool(16, reduced_dim=8)(x)


@pytest.mark.parametrize("options, match", [
    ({"backend": "eig", "normalization": "none"}, "backend='eig' would have no effect"),
    ({"backend": "eig", "normalization": "power"}, "backend='eig' would have no effect"),
    ({"alpha": 0.3}, "alpha=0.3 would have no effect"),
])
def test_cov_pool_refuses_the_options_its_head_never_reads_as_covpool_does(options, match):
    x = torch.randn(2, 8, 10)
    with pytest.raises(ValueError, match=match) as functional:
        covpool.cov_pool(x, **options)
    with pytest.raises(ValueError, match=match) as layer:
        covpool.CovPool(8, None, **options)
    assert str(functional.value) == str(layer.value)


def test_rank_deficient_pooling_gradient_of_eig_is_close_to_exact_and_ns_is_below_it():
    """What the CovPool docstring and docs/guides/backends.md ("Numerical caveats") say about 49 positions of 256
    channels: the eig gradient with respect to the features is the exact one to float32 accuracy (not
    "large"), ns's is smaller than the exact one (its iteration stops short of convergence on the null space:
    0.84 of its norm, 22% off)."""
    x = torch.randn(2, 256, 49, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    up = torch.randn(2, 256 * 257 // 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grad(backend, dtype):
        y = x.to(dtype).requires_grad_()
        return torch.autograd.grad(covpool.cov_pool(y, backend), y, up.to(dtype))[0].double()

    exact = grad("eig", torch.float64)
    eig, ns = grad("eig", torch.float32), grad("ns", torch.float32)
    assert rel(eig, exact) < 1e-2 and abs(float(eig.norm() / exact.norm()) - 1) < 1e-2
    assert 0.5 < float(ns.norm() / exact.norm()) < 0.95 and rel(ns, exact) > 0.1
