"""The second-order head family: each preset against a float64 formula written here from its paper, gradients,
layouts, dtypes, compilation, DDP, set_backend, swap_pooling and option errors."""
import dataclasses
import math
import os

import pytest
import timm
import torch
import torch.multiprocessing as mp

import covpool
from covpool.layers import AdaptiveChannelDrop, MultiHeadCrossCov
from covpool.testing import rel

F64 = torch.float64
MAP_HEADS = [h for h in covpool.list_heads() if not covpool.get_head(h).tokens_only]


def test_presets_are_registered_in_order():
    assert covpool.list_heads() == ["isqrt_cov", "bcnn", "improved_bcnn", "mpn_cov", "cbp_ts", "cbp_rm", "dropcov",
                                    "mpa_cov", "svpn", "sot"]
    with pytest.raises(ValueError, match="unknown head 'bilinear'; valid heads are: isqrt_cov, bcnn"):
        covpool.get_head("bilinear")


def features(b=2, c=6, n=9, seed=0, positive=True):
    x = torch.randn(b, c, n, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return x.abs() + 0.1 if positive else x  # after a ReLU, as the heads see them; away from 0 for √


def pooled(name, x, **options):
    """The head on features ``x`` ``(B, C, N)`` without a reduction (as ``(B, C, N, 1)`` maps)."""
    pool = covpool.build_head(name, x.shape[1], reduced_dim=None, dtype=F64, **options)
    return pool, pool(x.unsqueeze(-1))


def moment(x):
    return x @ x.mT / x.shape[-1]


def cov(x):
    xc = x - x.mean(-1, keepdim=True)
    return xc @ xc.mT / x.shape[-1]


def ssqrt_l2(z):
    z = z.sign() * z.abs().sqrt()
    return z / (z.square().sum(-1, keepdim=True) + 1e-10).sqrt()


def sym_fn(a, f):
    lam, v = torch.linalg.eigh(a)
    return (v * f(lam).unsqueeze(-2)) @ v.mT


def triu(a):
    r, c = torch.triu_indices(a.shape[-1], a.shape[-1])
    return a[..., r, c]


# ------------------------------------------------------------------------- each head against its paper
def test_bcnn_is_signed_sqrt_l2_of_the_averaged_outer_products():
    # Lin et al. 2015: Φ = Σ_n x_n x_nᵀ / N (bilinear pooling), y = sign(Φ)√|Φ|, z = y / ‖y‖, the whole matrix.
    x = features()
    _, out = pooled("bcnn", x)
    assert out.shape == (2, 36)
    assert rel(out, ssqrt_l2(moment(x).flatten(-2))) < 1e-12


def newton_schulz_fro(a, iters):
    y = a / torch.linalg.matrix_norm(a)[:, None, None]
    z = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a)
    for _ in range(iters):
        t = 0.5 * (3 * torch.eye(a.shape[-1], dtype=a.dtype) - z @ y)
        y, z = y @ t, t @ z
    return y * torch.linalg.matrix_norm(a).sqrt()[:, None, None]


def test_improved_bcnn_is_signed_sqrt_l2_of_the_matrix_square_root():
    # Lin and Maji 2017: Z = (Σ_n x_n x_nᵀ / N)^{1/2} by their Newton–Schulz iteration (Frobenius
    # normalisation, 5 steps), then the signed square root and ℓ2 of its entries; any backend gives the root.
    x = features(seed=1)
    _, out = pooled("improved_bcnn", x)
    assert rel(out, ssqrt_l2(newton_schulz_fro(moment(x), 5).flatten(-2))) < 1e-12
    _, exact = pooled("improved_bcnn", x, backend="eig")
    assert rel(exact, ssqrt_l2(sym_fn(moment(x), torch.sqrt).flatten(-2))) < 1e-12


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_mpn_cov_is_the_matrix_power_of_the_covariance(alpha):
    # Li et al. 2017: Σ^α = U diag(λ^α) Uᵀ of the covariance, upper triangle; with fewer positions than channels
    # the zero eigenvalues stay zero (MPN-COV zeroes those at the float spacing of the largest).
    for n in (9, 4):  # full rank, rank 3
        x = features(c=6, n=n, seed=2)
        _, out = pooled("mpn_cov", x, alpha=alpha)
        ref = sym_fn(cov(x), lambda lam, n=n: torch.where(lam > 1e-12 * lam[..., -1:], lam.clamp_min(0), 0) ** alpha)
        assert rel(out, triu(ref)) < 1e-10


def test_cbp_tensor_sketch_is_the_hashed_second_moment():
    # Gao et al. 2016, Tensor Sketch: entry k collects s₁(i)s₂(j)·M_ij over the pairs with h₁(i)+h₂(j) ≡ k mod D.
    x = features(seed=3)
    pool, out = pooled("cbp_ts", x, sketch_dim=16)
    m = moment(x)
    z = torch.zeros(2, 16, dtype=F64)
    for i in range(6):
        for j in range(6):
            k = int(pool.h1[i] + pool.h2[j]) % 16
            z[:, k] += pool.s1[i] * pool.s2[j] * m[:, i, j]
    _, raw = pooled("cbp_ts", x, sketch_dim=16, signed_sqrt=False, l2=False)
    assert rel(raw, z) < 1e-12
    # Empty buckets come out of the FFT as ~1e-17, which the signed square root lifts to ~1e-9.
    assert rel(out, ssqrt_l2(z)) < 1e-7
    assert set(pool.s1.tolist()) <= {-1.0, 1.0} and int(pool.h1.max()) < 16


def test_cbp_random_maclaurin_is_the_projected_second_moment():
    # Gao et al. 2016, Random Maclaurin: z_k = ⟨w1_k, x⟩⟨w2_k, x⟩ averaged over positions = w1_kᵀ M w2_k.
    x = features(seed=4)
    pool, out = pooled("cbp_rm", x, sketch_dim=32)
    z = torch.einsum("ik,bij,jk->bk", pool.w1, moment(x), pool.w2)
    assert rel(out, ssqrt_l2(z)) < 1e-12
    assert torch.allclose(pool.w1.abs(), torch.full_like(pool.w1, 1 / math.sqrt(32)))


@pytest.mark.parametrize("name, delta", [("cbp_rm", 0.1), ("cbp_ts", 0.03)])
def test_sqrt_smoothing_is_the_compact_bilinear_backward_on_the_summed_sketch(name, delta):
    """The compact bilinear code sums its sketch z over the N positions and smooths the signed square root's
    backward as ½/(√|z| + δ) (0.1 MatConvNet, 0.03 Caffe); covpool averages, so its δ acts as δ/√N on the
    average. Written out here on the sum: ℓ2 after it makes the sum's factor N invisible in the forward (but for
    ℓ2's ε, 1e-10 against a squared norm N times larger: 1e-11 here)."""
    x = features(seed=11)
    up = torch.randn(2, 16, dtype=F64, generator=torch.Generator().manual_seed(12))
    pool = covpool.build_head(name, 6, reduced_dim=None, dtype=F64, sketch_dim=16, sqrt_smoothing=delta)
    xx = x.clone().requires_grad_()
    out = pool(xx.unsqueeze(-1))
    (grad,) = torch.autograd.grad(out, xx, up)
    plain = covpool.build_head(name, 6, reduced_dim=None, dtype=F64, sketch_dim=16, signed_sqrt=False, l2=False)
    plain.load_state_dict(pool.state_dict())
    xr = x.clone().requires_grad_()
    z = plain(xr.unsqueeze(-1)) * x.shape[-1]  # the sketch summed over positions
    s = z.sign() * z.abs().sqrt()
    ref = s / (s.square().sum(-1, keepdim=True) + 1e-10).sqrt()
    g_s = torch.autograd.grad(ref, s, up)[0]
    (ref_grad,) = torch.autograd.grad(z, xr, g_s * 0.5 / (z.abs().sqrt() + delta))
    assert rel(out, ref) < 1e-9 and rel(grad, ref_grad) < 1e-9
    default = covpool.build_head(name, 6, reduced_dim=None, dtype=F64, sketch_dim=16)
    default.load_state_dict(pool.state_dict())
    assert rel(torch.autograd.grad(default(xx.unsqueeze(-1)), xx, up)[0], ref_grad) > 1e-3  # a real difference
    with pytest.raises(ValueError, match="sqrt_smoothing=0.1 would have no effect"):
        covpool.CovPool(6, None, sqrt_smoothing=0.1)


def test_sot_preset_and_head_centre_as_the_release_and_feature_centring_is_the_option():
    """The released SoT subtracts one mean per head (its tokens and channels); with per-channel token means, as
    real tokens have, the per-channel cross-covariance is a different head (~100% apart), so the preset and
    SoViTHead(head="sot") compute the release's, and centering="feature" gives the cross-covariance."""
    torch.manual_seed(0)  # the projection: the two centrings' distance depends on it (47–73% over seeds 0–5)
    g = torch.Generator().manual_seed(13)
    tokens = torch.randn(2, 11, 10, dtype=F64, generator=g) + torch.randn(10, dtype=F64, generator=g)
    preset = covpool.build_head("sot", 10, reduced_dim=(3, 4), dtype=F64)
    head = covpool.SoViTHead(10, num_classes=0, reduced_dim=(3, 4), head="sot", dtype=F64)
    feature = covpool.SoViTHead(10, num_classes=0, reduced_dim=(3, 4), head="sot", centering="feature", dtype=F64)
    for pool in (head.pool, feature.pool):
        pool.load_state_dict(preset.state_dict())
    release = sot_reference(tokens, preset.proj.weight, preset.v0, 3, 4, scalar_mean=True)
    assert rel(preset(tokens), release) < 1e-12
    with_class_token = torch.cat([torch.zeros(2, 1, 10, dtype=F64), tokens], dim=1)
    assert rel(head(with_class_token)[:, 10:], release) < 1e-12
    cross = sot_reference(tokens, preset.proj.weight, preset.v0, 3, 4)
    assert rel(feature(with_class_token)[:, 10:], cross) < 1e-12 and rel(cross, release) > 0.5
    with pytest.raises(ValueError, match="head 'mpa_cov' takes no centering: centering='feature' does not apply; "
                                         "the token heads that take it: sot"):
        covpool.SoViTHead(10, reduced_dim=4, centering="feature")


def test_dropcov_is_a_plain_covariance_at_inference():
    x = features(seed=5)
    pool, _ = pooled("dropcov", x)
    pool.eval()
    assert rel(pool(x.unsqueeze(-1)), triu(cov(x))) < 1e-12


def test_dropcov_adaptive_channel_dropout_in_training():
    # Wang et al. 2022 (their code): a = softmax(conv1d₃(channel means)), x' = x(1 + a), one drop rate
    # p = clamp(1 − 10/log₂(d)·mean_b cos(a_b, Cov(x')_b·1), 0, 1), channels zeroed w.p. p, kept ones ×1/(1 − p).
    c = 256  # the constant 10/log₂ d is tuned for 256 channels: fewer rarely drop
    x = features(b=3, c=c, n=20, seed=6)
    torch.manual_seed(6)  # the ECA weight's initialisation: the drop rate checked below depends on it
    drop = AdaptiveChannelDrop(c, dtype=F64).train()
    torch.manual_seed(7)
    out = drop(x)
    a = torch.softmax(torch.nn.functional.conv1d(x.mean(-1).unsqueeze(1), drop.conv.weight, padding=1).squeeze(1), -1)
    xp = x * (1 + a).unsqueeze(-1)
    rows = cov(xp).sum(-1)
    p = (1 - 10 / math.log2(c) * torch.nn.functional.cosine_similarity(a, rows, dim=-1).mean()).clamp(0, 1)
    torch.manual_seed(7)
    keep = (torch.rand(3, c) >= p).to(F64)
    assert 0.05 < float(p.detach()) < 0.95, float(p.detach())
    assert rel(out, xp * (keep / (1 - p)).unsqueeze(-1)) < 1e-12
    assert torch.equal(drop.eval()(x), x)


def sot_reference(tokens, weight, v0, heads, width, scalar_mean=False):
    """SoT's head (Xie et al. 2021) written out: per head P = (Q − q̄)ᵀ(K − k̄)/N, svPN from the right."""
    b, n, _ = tokens.shape
    qk = (tokens @ weight.mT).reshape(b, n, 2, heads, width)
    outs = []
    for h in range(heads):
        q, k = qk[:, :, 0, h], qk[:, :, 1, h]
        dims = (1, 2) if scalar_mean else (1,)
        q, k = q - q.mean(dims, keepdim=True), k - k.mean(dims, keepdim=True)
        p = q.mT @ k / n
        u = torch.nn.functional.normalize(p @ v0.expand(b, width).unsqueeze(-1), dim=1)
        v = torch.nn.functional.normalize(p.mT @ u, dim=1)
        s = u.mT @ p @ v
        y = s.sqrt() * u @ v.mT + (p - s * u @ v.mT) / (s.sqrt() + 1e-5)
        outs.append(y.flatten(1))
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("centering", ["feature", "scalar"])
def test_sot_multi_head_cross_covariance_with_svpn(centering):
    tokens = torch.randn(2, 11, 10, dtype=F64, generator=torch.Generator().manual_seed(8))
    pool = MultiHeadCrossCov(10, (3, 4), centering=centering, dtype=F64)
    out = pool(tokens)
    assert out.shape == (2, 48) and pool.out_features == 48
    ref = sot_reference(tokens, pool.proj.weight, pool.v0, 3, 4, scalar_mean=centering == "scalar")
    assert rel(out, ref) < 1e-12


def test_dropcov_transformer_head_drops_tokens_as_their_code_draws_them():
    # DropCov's transformers (mingzeG/DropCov, Transformers/src): SoT's projection and scalar centring, no svPN,
    # and in training their mask Dropout2d(0.2) of ones (B·h, N, d_r) on both queries and keys: whole tokens
    # of one head, the same draw under the same seed.
    b, n, heads, width = 2, 11, 3, 4
    tokens = torch.randn(b, n, 10, dtype=F64, generator=torch.Generator().manual_seed(8))
    pool = MultiHeadCrossCov(10, (heads, width), centering="scalar", normalization="none", token_drop=0.2, dtype=F64)
    assert pool.v0 is None and "v0" not in pool.state_dict() and pool.out_features == heads * width ** 2
    assert MultiHeadCrossCov(10, **pool.options).options == pool.options

    def reference(mask=None):
        qk = (tokens @ pool.proj.weight.mT).reshape(b, n, 2, heads, width).permute(2, 0, 3, 1, 4)
        q, k = qk[0].reshape(b * heads, n, width), qk[1].reshape(b * heads, n, width)
        if mask is not None:
            q, k = q * mask, k * mask
        q, k = q - q.mean((1, 2), keepdim=True), k - k.mean((1, 2), keepdim=True)
        return (q.mT @ k / n).reshape(b, -1)

    assert rel(pool.eval()(tokens), reference()) < 1e-12
    torch.manual_seed(4)
    out = pool.train()(tokens)
    torch.manual_seed(4)
    with pytest.warns(UserWarning, match="dropout2d"):
        mask = torch.nn.functional.dropout2d(torch.ones(b * heads, n, width, dtype=F64), 0.2, True)
    assert 0 < int((mask[..., 0] == 0).sum()) < b * heads * n and torch.equal(mask, mask[..., :1].expand_as(mask))
    assert rel(out, reference(mask)) < 1e-12
    assert torch.autograd.gradcheck(pool.eval(), (tokens[:1, :6].clone().requires_grad_(),))

    head = covpool.SoViTHead(10, 3, reduced_dim=(heads, width), head="sot",
                             pool_options={"normalization": "none", "centering": "scalar"})
    assert head.pool.normalization == "none" and head.pool.centering == "scalar" and head.pool.v0 is None
    with pytest.raises(ValueError, match="normalization must be one of \\('svpn', 'none'\\), got 'sqrt'"):
        MultiHeadCrossCov(10, normalization="sqrt")
    with pytest.raises(ValueError, match="token_drop"):
        MultiHeadCrossCov(10, token_drop=1.0)


# ------------------------------------------------------------------------------------------ gradients
GRAD_OPTIONS = {"cbp_ts": {"sketch_dim": 8}, "cbp_rm": {"sketch_dim": 8}}


@pytest.mark.parametrize("name", MAP_HEADS)
def test_gradcheck_every_map_head(name):
    x = features(b=2, c=4, n=5, seed=9).requires_grad_()
    exact = {"backend": "eig"} if covpool.build_head(name, 4).uses_backend else {}  # a gradient gradcheck can verify
    pool = covpool.build_head(name, 4, reduced_dim=None, dtype=F64, **exact, **GRAD_OPTIONS.get(name, {}))

    def fn(t):
        torch.manual_seed(0)  # DropCov draws its channel mask in training: the same draw every call
        return pool(t.unsqueeze(-1))

    # Signed √'s gradient is ½/√(|x| + 1e-8) by design; 1e-8 against entries ≥ 1e-3 is within the tolerance.
    assert torch.autograd.gradcheck(fn, (x,), atol=1e-6, rtol=1e-4)


def test_gradcheck_sot():
    tokens = torch.randn(2, 7, 6, dtype=F64, generator=torch.Generator().manual_seed(10)).requires_grad_()
    pool = MultiHeadCrossCov(6, (2, 3), dtype=F64)
    assert torch.autograd.gradcheck(pool, (tokens,))


def test_signed_sqrt_gradient_is_bounded_at_zero():
    x = torch.tensor([0.0, 1e-12, 4.0], dtype=F64, requires_grad=True)
    covpool.layers.functional.signed_sqrt(x).sum().backward()
    torch.testing.assert_close(x.grad, 0.5 / (x.detach().abs() + 1e-8).sqrt())
    half = torch.zeros(3, dtype=torch.float16, requires_grad=True)  # 1e-8 is 0 in float16
    covpool.layers.functional.signed_sqrt(half).sum().backward()
    assert torch.isfinite(half.grad).all() and float(half.grad[0]) == 5000.0


def test_matrix_power_gradcheck_and_gram_side():
    a = covpool.testing.well_conditioned(2, 5).requires_grad_()
    assert torch.autograd.gradcheck(lambda m: covpool.matrix_power(0.5 * (m + m.mT), 0.3), (a,))
    x = features(c=24, n=6, seed=11)
    g = torch.randn(2, 24, 24, dtype=F64, generator=torch.Generator().manual_seed(1))
    grads = []
    for side in (False, True):
        xi = x.clone().requires_grad_()
        out = covpool.covariance_power(xi, 0.4, gram=side)
        grads.append((out, torch.autograd.grad((out * g).sum(), xi)[0]))
    assert rel(grads[1][0], grads[0][0]) < 1e-10 and rel(grads[1][1], grads[0][1]) < 1e-10


# ------------------------------------------------------------------------------ layouts, dtypes, modes
@pytest.mark.parametrize("name", MAP_HEADS)
def test_maps_and_tokens_give_the_same_features(name, device):
    torch.manual_seed(0)
    pool = covpool.build_head(name, 8, reduced_dim=6, **GRAD_OPTIONS.get(name, {})).to(device).eval()
    maps = torch.randn(2, 8, 3, 4).to(device)
    tokens = maps.flatten(2).mT
    torch.testing.assert_close(pool(tokens), pool(maps))


@pytest.mark.parametrize("name", MAP_HEADS)
def test_autocast_and_half_precision_pool_in_float32(name, device):
    torch.manual_seed(0)
    pool = covpool.build_head(name, 8, reduced_dim=6, **GRAD_OPTIONS.get(name, {})).to(device).eval()
    x = torch.randn(2, 8, 3, 3).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = pool(x)
    reference = pool(x)
    assert out.dtype in (torch.float32, torch.bfloat16) and torch.isfinite(out).all()
    # The reduction's 1×1 convolution runs in bf16 under autocast; the pooling itself in float32.
    assert rel(out.float(), reference) < 0.05
    half = pool.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()


@pytest.mark.parametrize("name", ["bcnn", "cbp_ts", "dropcov", "mpn_cov"])
def test_heads_under_torch_compile(name):
    # The heads made of products compile whole; mpn_cov's eigh checks its result on the host (a graph break).
    torch.manual_seed(0)
    pool = covpool.build_head(name, 8, reduced_dim=6, **GRAD_OPTIONS.get(name, {})).eval()
    covpool.testing.assert_compiles_like_eager(pool, torch.randn(2, 8, 3, 3), fullgraph=name != "mpn_cov")


def test_set_backend_reaches_the_heads_with_a_square_root_only():
    model = covpool.swap_pooling(timm.create_model("resnet18", num_classes=3), head="improved_bcnn", reduced_dim=8)
    old = covpool.set_backend(model, "eig")
    assert old == {"global_pool": {"name": "ns", "norm": "fro", "num_iters": 5}}
    assert model.global_pool.backend == "eig"
    bcnn = covpool.swap_pooling(timm.create_model("resnet18", num_classes=3), head="bcnn", reduced_dim=8)
    with pytest.raises(ValueError, match="has no matrix square root whose backend could be set"):
        covpool.set_backend(bcnn, "eig")


def test_sketch_parameters_are_buffers_that_a_checkpoint_restores():
    a = covpool.build_head("cbp_ts", 8, reduced_dim=4, sketch_dim=32)
    b = covpool.build_head("cbp_ts", 8, reduced_dim=4, sketch_dim=32, sketch_seed=5)
    assert {"h1", "s1", "h2", "s2"} <= set(dict(a.named_buffers()))
    assert not torch.equal(a.h1, b.h1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(b.eval()(x), a.eval()(x))
    # The sketch is drawn from a generator of its own: the global RNG moves only by the reduction's init.
    torch.manual_seed(0)
    covpool.build_head("cbp_rm", 8, reduced_dim=4, sketch_dim=32)
    after_sketch = torch.random.get_rng_state()
    torch.manual_seed(0)
    covpool.CovPool(8, 4)
    assert torch.equal(after_sketch, torch.random.get_rng_state())


def test_a_covpool_pickled_whole_by_covpool_0_1_still_runs():
    import pickle

    pool = covpool.CovPool(8, 4, backend="eig", vectorize=True).eval()
    x = torch.randn(2, 8, 3, 3)
    expected = pool(x)
    for name in ("centered", "normalization", "alpha", "signed_sqrt", "l2", "sketch", "sketch_dim", "sketch_seed",
                 "channel_drop", "gram", "layout"):
        del pool.__dict__[name]  # what 0.1.0 pickled
    del pool._modules["drop"]
    pool.__dict__["vectorize"] = True
    restored = pickle.loads(pickle.dumps(pool))
    torch.testing.assert_close(restored(x), expected)
    assert restored.vectorize == "triu"


# ------------------------------------------------------------------------------------- option errors
@pytest.mark.parametrize("options, match", [
    ({"normalization": "log"}, "normalization must be one of 'sqrt', 'power', 'none'"),
    ({"vectorize": "diag"}, "vectorize must be one of 'triu', 'full', 'matrix'"),
    ({"sketch": "count"}, "sketch must be one of 'tensor', 'maclaurin' or None"),
    ({"sketch": "tensor"}, "pass normalization='none'"),
    ({"channel_drop": "random"}, "channel_drop must be 'adaptive' or None"),
    ({"normalization": "power", "alpha": 0}, "alpha must be a positive finite number"),
    ({"signed_sqrt": 1}, "signed_sqrt must be true or false"),
    ({"vectorize": "matrix", "l2": True}, "produce a vector"),
    ({"layout": "NCHW"}, "layout must be one of 'auto', 'maps', 'tokens'"),
    ({"normalization": "power", "backend": "svd_pade"}, "backend='svd_pade' would have no effect"),
    ({"alpha": 0.3}, "alpha=0.3 would have no effect"),
    ({"sketch_dim": 64}, "sketch_dim=64 would have no effect"),
])
def test_bad_head_options_name_the_valid_ones(options, match):
    with pytest.raises(ValueError, match=match):
        covpool.CovPool(8, 4, **options)


def test_option_typos_name_the_public_function_and_the_closest_option():
    with pytest.raises(TypeError, match=r"^covpool\.CovPool got an unexpected keyword argument 'reduced_dimm' "
                                        r"\(did you mean 'reduced_dim'\?\); valid: reduced_dim, backend, "):
        covpool.CovPool(8, reduced_dimm=4)
    with pytest.raises(TypeError, match=r"^covpool\.build_head\('bcnn', \.\.\.\) got an unexpected keyword "
                                        r"argument 'centred' \(did you mean 'centered'\?\)"):
        covpool.build_head("bcnn", 8, centred=False)
    with pytest.raises(TypeError, match=r"arguments 'centring' \(did you mean 'centering'\?\), 'zzz'; valid: "
                                        r"reduced_dim, alpha, iters, eps, centering, normalization, token_drop, "
                                        r"layout, device, dtype$"):
        covpool.build_head("sot", 8, centring="scalar", zzz=1)
    with pytest.raises(TypeError, match=r"^covpool\.swap_pooling got an unexpected keyword argument 'bakend' "
                                        r"\(did you mean 'backend'\?\); valid: head, last_stride, reduced_dim, "):
        covpool.swap_pooling(timm.create_model("resnet18"), bakend="eig")
    with pytest.raises(TypeError, match=r"'num_iter'\] \(did you mean 'num_iters'\?\); its options are"):
        covpool.CovPool(8, 4, backend={"name": "ns", "num_iter": 3})
    assert covpool.get_head("bcnn").keywords == [f.name for f in dataclasses.fields(covpool.CovPool.options_class)
                                                 ] + ["device", "dtype"]


def test_dropcov_needs_two_channels():
    with pytest.raises(ValueError, match="channels must be an integer >= 2"):
        covpool.CovPool(8, 1, channel_drop="adaptive")


def test_unknown_head_in_swap_pooling_and_token_head_on_maps():
    with pytest.raises(ValueError, match="unknown head 'bilinear'"):
        covpool.swap_pooling(timm.create_model("resnet18"), head="bilinear")
    with pytest.raises(ValueError, match="head 'sot' pools transformer tokens.*use one of isqrt_cov, bcnn"):
        covpool.swap_pooling(timm.create_model("resnet18"), head="sot")


# ------------------------------------------------------------------------------------ swap_pooling
BACKBONES = {"resnet18": lambda: timm.create_model("resnet18", num_classes=4),
             "convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=4),
             "vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32),
             "torchvision_resnet18": lambda: __import__("torchvision").models.resnet18(num_classes=4)}


@pytest.mark.parametrize("name, backbone", [(h, b) for h in covpool.list_heads() for b in BACKBONES
                                             if b == "vit_tiny" or not covpool.get_head(h).tokens_only])
def test_swap_pooling_with_each_head_trains_a_step(name, backbone):  # a token head goes on the ViT only
    torch.manual_seed(0)
    tokens_only = covpool.get_head(name).tokens_only
    options = {"reduced_dim": (2, 4)} if tokens_only else {"reduced_dim": 8, **GRAD_OPTIONS.get(name, {})}
    model = covpool.swap_pooling(BACKBONES[backbone](), head=name, **options)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    if backbone.startswith("torchvision"):
        return  # torchvision's forward is unchanged; timm's API below does not apply
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    assert features.shape == (4, model.head_hidden_size)
    assert model.forward_features(x).shape[1 if backbone != "vit_tiny" else 2] == model.num_features
    model.reset_classifier(7)
    assert model(x).shape == (4, 7)
    model.reset_classifier(0, "")
    model.reset_classifier(5)  # the head comes back, as the preset made it
    assert model(x).shape == (4, 5) and model.head_hidden_size == features.shape[1]


# --------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        for name in ("dropcov", "cbp_ts", "mpn_cov"):
            model = covpool.swap_pooling(timm.create_model("resnet18", num_classes=3), head=name, reduced_dim=8,
                                         **GRAD_OPTIONS.get(name, {}))
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            torch.manual_seed(rank + 1)  # different data on each process
            loss = ddp(torch.randn(2, 3, 32, 32)).square().mean()
            loss.backward()
            grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results[(name, rank)] = grad
    finally:
        torch.distributed.destroy_process_group()


def test_heads_train_under_ddp():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    for name in ("dropcov", "cbp_ts", "mpn_cov"):
        torch.testing.assert_close(results[(name, 0)], results[(name, 1)])  # all-reduced: equal on every rank
        assert torch.isfinite(results[(name, 0)]).all()
