"""covpool's timm models (iSQRT-COV ResNets, So-ViT) and ``swap_pooling``.

Parametrised over the models covpool registers with timm. Inputs are 64×64 with batch 2 to stay fast on
CPU; So-ViT is built for that size (``img_size=64``: a 4×4 token grid).
"""
import argparse
import copy
import math

import pytest
import timm
import timm.optim
import torch
import torchvision
from torch import nn

import covpool
from covpool.layers import CovPool
from covpool.models.resnet_isqrt import ISqrtResNet

MODELS = timm.list_models(["resnet*_isqrt", "so_vit*"])  # the other families have test files of their own
IMG = 64

# Xie et al., So-ViT (arXiv:2104.10935), parameters at 1000 classes in millions, as published (one decimal).
SO_VIT_PUBLISHED_M = {"so_vit_7": 5.6, "so_vit_10": 7.2, "so_vit_14": 24.7, "so_vit_19": 43.9}
# (embed_dim, depth, mlp_ratio, svPN branch widths, MPA width) of the releases, from their builders.
SO_VIT_RELEASE = {
    "so_vit_7": (256, 7, 2, (48, 24), 48),
    "so_vit_10": (256, 10, 2, (48, 24), 48),
    "so_vit_14": (384, 14, 3, (64, 48), 64),
    "so_vit_19": (448, 19, 3, (96, 48), 96),
}
HEAVY = {"resnet101_isqrt", "so_vit_19"}


def _size_kwargs(name, img_size=IMG):
    return {"img_size": img_size} if name.startswith("so_vit") else {}


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _images(batch=2, size=IMG, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _mark_heavy(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


def test_registry_lists_all_models():
    assert timm.list_models("so_vit*") == ["so_vit_7", "so_vit_10", "so_vit_14", "so_vit_19"]
    assert timm.list_models("resnet*_isqrt") == ["resnet18_isqrt", "resnet50_isqrt", "resnet101_isqrt"]
    assert "swap_pooling" in covpool.__all__ and covpool.swap_pooling is covpool.models.swap_pooling


@pytest.mark.parametrize("name", MODELS)
def test_param_count(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = _params(model)
    if name in SO_VIT_PUBLISHED_M:
        # The release's parameter tensors, counted from the official layout. Its fixed sinusoid is a frozen
        # parameter there (counted in the published figure) and a buffer here.
        release = _release_state_dict(name, num_classes=1000, n_pos=197, values=False)
        fixed = model.pos_embed.numel()
        assert "pos_embed" in dict(model.named_buffers())
        assert count + fixed == sum(v.numel() for k, v in release.items() if not _is_bn_buffer(k))
        assert abs((count + fixed) / 1e6 - SO_VIT_PUBLISHED_M[name]) <= 0.05
    else:
        # timm's ResNet without its classifier + 1×1 reduction to 256 with BN + linear on 32 896 features.
        with torch.device("meta"):
            plain = timm.create_model(name.removesuffix("_isqrt"), num_classes=0)
        channels = plain.num_features
        assert model.head_hidden_size == 32896 and model.num_features == channels
        assert count == _params(plain) + channels * 256 + 2 * 256 + 32896 * 1000 + 1000


@pytest.mark.parametrize("name", _mark_heavy(MODELS))
def test_forward_backward_and_classifier(name, device):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **_size_kwargs(name))
    state = model.state_dict()
    classifiers = model.pretrained_cfg["classifier"]
    classifiers = (classifiers,) if isinstance(classifiers, str) else classifiers
    for classifier in classifiers:
        assert f"{classifier}.weight" in state and f"{classifier}.bias" in state
    assert f"{model.pretrained_cfg['first_conv']}.weight" in state

    model, x = model.to(device), _images().to(device)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"

    model.eval()
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        features = model(x)
    assert pre.shape == features.shape == (2, model.head_hidden_size)
    assert torch.allclose(pre, features)
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(x).shape == (2, 3)


def test_builders_share_no_state():
    def build(name):
        torch.manual_seed(0)
        return timm.create_model(name, num_classes=4, **_size_kwargs(name))

    first = {n: build(n) for n in ("resnet18_isqrt", "so_vit_7")}
    first["resnet18_isqrt"].global_pool.backend["num_iters"] = 1
    later = {n: build(n) for n in ("so_vit_7", "resnet18_isqrt")}
    for name, model in first.items():
        other = later[name]
        assert other.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    assert later["resnet18_isqrt"].global_pool.backend == {"name": "ns", "num_iters": 5}


def test_isqrt_resnet_options():
    model = timm.create_model("resnet18_isqrt", num_classes=2, backend="eig", reduced_dim=32)
    assert model.global_pool.backend == "eig" and model.head_hidden_size == 32 * 33 // 2
    assert model.forward_features(_images()).shape[-1] == IMG // 16
    assert model.feature_info[-1]["reduction"] == 16
    strided = timm.create_model("resnet18_isqrt", num_classes=2, last_stride=2)
    assert strided.forward_features(_images()).shape[-1] == IMG // 32
    with pytest.raises(ValueError, match="last_stride"):
        timm.create_model("resnet18_isqrt", last_stride=4)
    with pytest.raises(ValueError, match="last_stride must be 1 or 2, got True"):
        timm.create_model("resnet18_isqrt", last_stride=True)
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("resnet18_isqrt", global_pool="avg")
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)
    features = timm.create_model("resnet18_isqrt", features_only=True)(_images())
    assert [f.shape[-1] for f in features] == [IMG // 2, IMG // 4, IMG // 8, IMG // 16, IMG // 16]


def _plain_resnet18_state(source):
    torch.manual_seed(1)
    if source == "timm":
        return timm.create_model("resnet18").state_dict()
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.mark.parametrize("source", ["timm", "torchvision"])
@pytest.mark.parametrize("num_classes", [10, 1000])
def test_pretrained_backbone_from_local_file(tmp_path, source, num_classes):
    path = tmp_path / "resnet18.pth"
    torch.save(_plain_resnet18_state(source), path)
    file_state = torch.load(path, weights_only=True)

    torch.manual_seed(0)
    fresh = timm.create_model("resnet18_isqrt", num_classes=num_classes)
    torch.manual_seed(0)
    model = timm.create_model("resnet18_isqrt", pretrained=True, num_classes=num_classes,
                              pretrained_cfg_overlay=dict(file=str(path)))
    state, fresh_state = model.state_dict(), fresh.state_dict()
    backbone = [k for k in file_state if not k.startswith("fc.")]
    assert backbone and all(torch.equal(state[k], file_state[k]) for k in backbone)
    head = [k for k in state if k.startswith(("global_pool.", "fc."))]
    assert any(k.startswith("global_pool.reduce") for k in head)
    assert all(torch.equal(state[k], fresh_state[k]) for k in head)
    assert model.fc.weight.shape == (num_classes, 32896)


def test_covpool_checkpoint_round_trip(tmp_path):
    # As for any timm model, the overlay's num_classes says the file's classifier fits; otherwise timm
    # drops it (the cfg says 1000 ImageNet classes).
    model = timm.create_model("resnet18_isqrt", num_classes=10)
    with torch.no_grad():
        model.fc.bias.uniform_()
        model.global_pool.reduce.bn.running_mean.uniform_()
    path = tmp_path / "resnet18_isqrt.pth"
    torch.save(model.state_dict(), path)
    loaded = timm.create_model("resnet18_isqrt", pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    expected = torch.load(path, weights_only=True)
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())

    # The iSQRT-COV authors' fast-MPN-COV checkpoints: DataParallel prefix and their reduction names.
    authors = {}
    for k, v in expected.items():
        k = k.replace("global_pool.reduce.conv.", "layer_reduce.").replace("global_pool.reduce.bn.", "layer_reduce_bn.")
        authors[f"module.{k}"] = v
    torch.save(authors, path)
    from_authors = timm.create_model("resnet18_isqrt", pretrained=True, num_classes=10,
                                     pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    assert all(torch.equal(v, expected[k]) for k, v in from_authors.state_dict().items())


def _train_step(model, num_classes):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.fc.weight.detach().clone()
    loss = nn.functional.cross_entropy(model(_images()), torch.tensor([0, num_classes - 1]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.fc.weight)


def _assert_state_round_trip(model, rebuild, tmp_path):
    path = tmp_path / "swapped.pth"
    torch.save(model.state_dict(), path)
    other = rebuild()
    other.load_state_dict(torch.load(path, weights_only=True))
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(model(_images(seed=3)), other(_images(seed=3)))


def test_swap_pooling_timm_resnet(tmp_path):
    def build():
        return covpool.swap_pooling(timm.create_model("resnet18", num_classes=7), last_stride=1)

    model = build()
    assert isinstance(model, ISqrtResNet) and isinstance(model.global_pool, CovPool)
    assert model.num_classes == 7 and model.fc.in_features == model.head_hidden_size == 32896
    assert model.forward_features(_images()).shape[-1] == IMG // 16
    assert model(_images()).shape == (2, 7)
    _train_step(model, 7)
    _assert_state_round_trip(model, build, tmp_path)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(copied(_images()), model(_images()))
        model.reset_classifier(0)
        assert model(_images()).shape == (2, 32896)

    kept = covpool.swap_pooling(timm.create_model("resnet18", num_classes=3), reduced_dim=16, backend="eig")
    assert kept.forward_features(_images()).shape[-1] == IMG // 32
    assert kept.head_hidden_size == 16 * 17 // 2 and kept.global_pool.backend == "eig"


def test_swap_pooling_torchvision_resnet(tmp_path):
    def build():
        return covpool.swap_pooling(torchvision.models.resnet18(weights=None, num_classes=7), last_stride=1)

    model = build()
    assert isinstance(model.avgpool, CovPool)
    assert model.fc.in_features == 32896 and model.fc.out_features == 7
    assert model(_images()).shape == (2, 7)
    assert model.layer4[0].conv1.stride == (1, 1) and model.layer4[0].downsample[0].stride == (1, 1)
    _train_step(model, 7)
    _assert_state_round_trip(model, build, tmp_path)


def test_swap_pooling_errors():
    with pytest.raises(TypeError, match="swap_pooling supports"):
        covpool.swap_pooling(nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1)))
    with pytest.raises(TypeError, match="supports"):
        covpool.swap_pooling(torchvision.models.squeezenet1_1(weights=None))
    model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(ValueError, match="last_stride"):
        covpool.swap_pooling(model, last_stride=3)
    with pytest.raises(ValueError, match="reduced_dim"):
        covpool.swap_pooling(model, reduced_dim=0)
    assert type(model) is timm.models.resnet.ResNet, "a rejected option must leave the model as it was"
    covpool.swap_pooling(model)
    with pytest.raises(ValueError, match="already uses covariance pooling"):
        covpool.swap_pooling(model)
    tv = torchvision.models.resnet18(weights=None)
    covpool.swap_pooling(tv)
    with pytest.raises(ValueError, match="already uses covariance pooling"):
        covpool.swap_pooling(tv)


# ------------------------------------------------------------------------------------------ So-ViT release
# Offline stand-ins for the authors' checkpoints: the key names and shapes of jiangtaoxie/So-ViT (2021,
# src/so_vit.py and src/model/*) and of KingJamesSong/FastDifferentiableMatSqrt/So-ViT (MPA head), with
# random values; and their forward written out from that code in float64.
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _is_bn_buffer(key):
    return key.endswith(_BN_BUFFERS)


def _release_state_dict(name, num_classes=5, n_pos=17, head="svpn", values=True, seed=0):
    embed, depth, mlp_ratio, dims, mpa_dim = SO_VIT_RELEASE[name]
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def put(key, *shape, scale=None, kind="w"):
        if not values:
            sd[key] = torch.empty(shape, device="meta")
            return
        if kind == "var":
            sd[key] = torch.rand(shape, generator=gen) + 0.5
        elif kind == "count":
            sd[key] = torch.tensor(7)
        else:
            fan_in = max(1, math.prod(shape[1:])) if len(shape) > 1 else 1
            sd[key] = torch.randn(shape, generator=gen) * (scale if scale is not None else fan_in ** -0.5)

    def bn(prefix, c):
        put(prefix + "weight", c, scale=0.2)
        sd[prefix + "weight"] = sd[prefix + "weight"] + 1 if values else sd[prefix + "weight"]
        put(prefix + "bias", c, scale=0.1)
        put(prefix + "running_mean", c, scale=0.1)
        put(prefix + "running_var", c, kind="var")
        put(prefix + "num_batches_tracked", kind="count")

    tok = "visual_tokens.tokens."
    put(tok + "stem.0.weight", 64, 3, 3, 3)
    put(tok + "stem.0.bias", 64, scale=0.1)
    in_chs = 64
    for i in range(3):
        p = f"{tok}stage.{i}."
        put(p + "conv1.weight", 64, in_chs, 1, 1)
        bn(p + "bn1.", 64)
        put(p + "conv2.weight", 64, 64, 3, 3)
        bn(p + "bn2.", 64)
        put(p + "conv3.weight", 256, 64, 1, 1)
        bn(p + "bn3.", 256)
        put(p + "downsample.0.weight", 256, in_chs, 1, 1)
        bn(p + "downsample.1.", 256)
        in_chs = 256
    put(tok + "transition.weight", embed, 256, 1, 1)
    put(tok + "transition.bias", embed, scale=0.1)
    put("cls_token", 1, 1, embed, scale=0.02)
    if values:
        sd["pos_embed"] = covpool.models.so_vit.sinusoid_pos_embed(n_pos, embed)
    else:
        put("pos_embed", 1, n_pos, embed)
    hidden = int(embed * mlp_ratio)
    for i in range(depth):
        p = f"blocks.{i}."
        put(p + "norm1.weight", embed, scale=0.1)
        sd[p + "norm1.weight"] = sd[p + "norm1.weight"] + 1 if values else sd[p + "norm1.weight"]
        put(p + "norm1.bias", embed, scale=0.1)
        put(p + "attn.qkv.weight", 3 * embed, embed)
        put(p + "attn.proj.weight", embed, embed)
        put(p + "attn.proj.bias", embed, scale=0.1)
        put(p + "norm2.weight", embed, scale=0.1)
        sd[p + "norm2.weight"] = sd[p + "norm2.weight"] + 1 if values else sd[p + "norm2.weight"]
        put(p + "norm2.bias", embed, scale=0.1)
        put(p + "mlp.fc1.weight", hidden, embed)
        put(p + "mlp.fc1.bias", hidden, scale=0.1)
        put(p + "mlp.fc2.weight", embed, hidden)
        put(p + "mlp.fc2.bias", embed, scale=0.1)
    put("norm.weight", embed, scale=0.1)
    sd["norm.weight"] = sd["norm.weight"] + 1 if values else sd["norm.weight"]
    put("norm.bias", embed, scale=0.1)
    rep = "classifier.representation.conv_dr_block."
    if head == "svpn":
        for b, d in enumerate(dims):
            put(f"{rep}{b}.0.weight", d, embed, 1, 1)
            bn(f"{rep}{b}.1.", d)
        put("classifier.normalization.weight", dims[0], scale=1.0)
        cov_dim = dims[0] * dims[1]
    else:
        put(f"{rep}0.weight", mpa_dim, embed, 1, 1)
        bn(f"{rep}1.", mpa_dim)
        cov_dim = mpa_dim * (mpa_dim + 1) // 2
    put("classifier.cls_fc.weight", num_classes, embed)
    put("classifier.cls_fc.bias", num_classes, scale=0.1)
    put("classifier.visual_fc.weight", num_classes, cov_dim)
    put("classifier.visual_fc.bias", num_classes, scale=0.1)
    return sd


def _release_forward(sd, x, num_heads, head="svpn"):
    """The authors' eval-mode forward, transcribed from their modules, in float64."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    x = x.double()
    F = nn.functional

    def bn(t, p, eps=1e-5):
        return F.batch_norm(t, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                            False, 0.0, eps)

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + "weight"], sd[p + "bias"], 1e-5)

    tok = "visual_tokens.tokens."
    t = F.conv2d(x, sd[tok + "stem.0.weight"], sd[tok + "stem.0.bias"], padding=1)
    t = F.max_pool2d(t, 3, 2, 1)
    for i in range(3):
        p = f"{tok}stage.{i}."
        out = F.relu(bn(F.conv2d(t, sd[p + "conv1.weight"]), p + "bn1.", 1e-3))
        out = F.relu(bn(F.conv2d(out, sd[p + "conv2.weight"], stride=2, padding=1), p + "bn2.", 1e-3))
        out = bn(F.conv2d(out, sd[p + "conv3.weight"]), p + "bn3.", 1e-3)
        t = F.relu(out + bn(F.conv2d(t, sd[p + "downsample.0.weight"], stride=2), p + "downsample.1."))
    t = F.conv2d(t, sd[tok + "transition.weight"], sd[tok + "transition.bias"])
    B, C = t.shape[:2]
    t = t.view(B, C, -1).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], dim=1) + sd["pos_embed"]
    n = t.shape[1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = ln(t, p + "norm1.")
        qkv = (h @ sd[p + "attn.qkv.weight"].T).reshape(B, n, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (C // num_heads) ** -0.5).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(B, n, C) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        t = t + h
        h = ln(t, p + "norm2.")
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        t = t + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    t = ln(t, "norm.")
    logits = t[:, 0] @ sd["classifier.cls_fc.weight"].T + sd["classifier.cls_fc.bias"]
    maps = t[:, 1:].transpose(-1, -2).unsqueeze(-1)
    rep = "classifier.representation.conv_dr_block."

    def branch(conv, norm):
        z = F.relu(bn(F.conv2d(maps, sd[conv]), norm))
        z = z - z.mean(dim=(2, 3), keepdim=True)
        return z.flatten(2)

    if head == "svpn":
        a, b = branch(rep + "0.0.weight", rep + "0.1."), branch(rep + "1.0.weight", rep + "1.1.")
        cross = a.bmm(b.transpose(1, 2)) / a.shape[-1]                 # (B, d1, d2)
        m = cross.transpose(1, 2)                                      # svPN works on (B, d2, d1)
        v0 = sd["classifier.normalization.weight"].view(1, -1, 1).expand(B, -1, 1)
        u = F.normalize(m.bmm(v0), dim=1)
        v = F.normalize(m.transpose(1, 2).bmm(u), dim=1)
        s = u.transpose(1, 2).bmm(m).bmm(v)
        y = u.bmm(s.pow(0.5)).bmm(v.transpose(1, 2))
        y = y + (m - u.bmm(s).bmm(v.transpose(1, 2))) / (s.pow(0.5) + 1e-5)
        feats = y.transpose(1, 2).reshape(B, -1)
    else:
        a = branch(rep + "0.weight", rep + "1.")
        cov = a.bmm(a.transpose(1, 2)) / a.shape[-1]
        w, vecs = torch.linalg.eigh(cov)
        root = vecs @ torch.diag_embed(w.clamp_min(0).sqrt()) @ vecs.transpose(1, 2)
        d = root.shape[-1]
        index = torch.ones(d, d).triu().reshape(-1).nonzero().squeeze(1)
        feats = root.reshape(B, -1)[:, index]
    return logits + feats @ sd["classifier.visual_fc.weight"].T + sd["classifier.visual_fc.bias"]


def _save_training_checkpoint(sd, path):
    # What timm's train.py (and so the releases) write: DataParallel prefixes, args, optimizer state.
    torch.save({"epoch": 299, "arch": "So_vit_7", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": []}, "args": argparse.Namespace(model="So_vit_7"),
                "version": 2}, path)


@pytest.mark.parametrize("head", ["svpn", "mpa_cov"])
def test_so_vit_release_checkpoint_loads_and_gives_official_logits(tmp_path, head):
    sd = _release_state_dict("so_vit_7", head=head)
    path = tmp_path / "So-ViT-7.pth.tar"
    _save_training_checkpoint(sd, path)
    extra = {"backend": "eig"} if head == "mpa_cov" else {}  # the exact root, to compare with eigh in float64
    # as a user writes it: the file's 5-way classifiers are kept because they fit num_classes=5
    model = timm.create_model("so_vit_7", pretrained=True, img_size=IMG, num_classes=5, head=head,
                              pretrained_cfg_overlay=dict(file=str(path)), **extra).eval()
    # Strict load: every official key found a home and every model key was filled.
    state = model.state_dict()
    assert len(state) == len(sd) == (174 if head == "svpn" else 167)
    assert torch.equal(state["head.fc_cov.weight"], sd["classifier.visual_fc.weight"])
    assert torch.equal(state["patch_embed.backbone.stage.2.downsample.1.running_var"],
                       sd["visual_tokens.tokens.stage.2.downsample.1.running_var"])

    x = _images(seed=5)
    reference = _release_forward(sd, x, num_heads=4, head=head)
    with torch.no_grad():
        out32 = model(x)
        out64 = model.double()(x.double())
    assert reference.abs().max() > 1e-2
    scale = reference.abs().max()
    # 16 tokens, 48 channels: the covariance has zero eigenvalues, whose roots carry √(rounding) ~ 1e-8.
    assert (out64 - reference).abs().max() <= (1e-10 if head == "svpn" else 1e-6) * scale
    # float32: the svPN head within the 1e-4; the square root of a rank-deficient float32 covariance
    # carries √(float32 rounding) ~ 3e-4 (an artefact of 16 tokens; 196 at 224² give a full-rank one).
    assert (out32.double() - reference).abs().max() <= (1e-4 if head == "svpn" else 1e-3) * scale


def test_so_vit_release_head_for_other_classes_and_wrong_kind(tmp_path, caplog):
    sd = _release_state_dict("so_vit_7", num_classes=1000)
    path = tmp_path / "So-ViT-7.pth.tar"
    _save_training_checkpoint(sd, path)
    torch.manual_seed(0)
    with caplog.at_level("INFO"):
        model = timm.create_model("so_vit_7", pretrained=True, img_size=IMG, num_classes=10,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.blocks[3].mlp.fc2.weight, sd["blocks.3.mlp.fc2.weight"])
    assert torch.equal(model.head.pool.v0, sd["classifier.normalization.weight"])
    assert model.head.fc_cov.weight.shape == (10, 48 * 24) and not model.head.fc_cov.bias.any()
    assert "head.fc_cov.weight" in caplog.text  # timm reports the classifier it left fresh

    headless = timm.create_model("so_vit_7", pretrained=True, img_size=IMG, num_classes=0,
                                 pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(headless.head.pool.v0, sd["classifier.normalization.weight"])
    assert headless(_images()).shape == (2, 256 + 48 * 24)
    tokens_only = timm.create_model("so_vit_7", pretrained=True, img_size=IMG, num_classes=0, global_pool="",
                                    pretrained_cfg_overlay=dict(file=str(path)))
    assert tokens_only(_images()).shape == (2, 17, 256)

    with pytest.raises(ValueError, match="head='svpn'"):
        timm.create_model("so_vit_7", pretrained=True, img_size=IMG, head="mpa_cov",
                          pretrained_cfg_overlay=dict(file=str(path)))

    # The release at 224² (197 positions) into a 64² model: the fixed table is the model's own.
    big = tmp_path / "So-ViT-7-224.pth"
    torch.save(_release_state_dict("so_vit_7", num_classes=5, n_pos=197), big)
    small = timm.create_model("so_vit_7", pretrained=True, img_size=IMG, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(big), num_classes=5))
    assert torch.equal(small.pos_embed, covpool.models.so_vit.sinusoid_pos_embed(17, 256))
    learned = timm.create_model("so_vit_7", pretrained=True, img_size=IMG, num_classes=5, pos_embed="learn",
                                pretrained_cfg_overlay=dict(file=str(big), num_classes=5))
    assert learned.pos_embed.requires_grad and learned.pos_embed.shape == (1, 17, 256)


def test_svpn_matches_svd_when_the_power_iteration_has_converged(device):
    from covpool.layers.functional import svpn

    gen = torch.Generator().manual_seed(0)
    c = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    u_, s_, vh = torch.linalg.svd(c, full_matrices=False)
    top = s_[:, :1, None]
    rank1 = u_[:, :, :1] @ vh[:, :1, :]
    expected = top.sqrt() * rank1 + (c - top * rank1) / (top.sqrt() + 1e-5)
    got = svpn(c.to(device), torch.randn(6, generator=gen, dtype=torch.float64).to(device), alpha=0.5, iters=200)
    assert (got.cpu() - expected).abs().max() <= 1e-9
    # alpha = 1 and eps = 0 leave the matrix unchanged, whatever the estimate.
    assert torch.allclose(svpn(c, torch.ones(6, dtype=torch.float64), alpha=1.0, eps=0.0), c, atol=1e-12)


def test_sinusoid_table():
    table = covpool.models.so_vit.sinusoid_pos_embed(5, 6)
    assert table.shape == (1, 5, 6) and table.dtype == torch.float32
    for p, j in [(0, 0), (0, 1), (3, 2), (4, 5), (2, 3)]:
        angle = p / 10000 ** (2 * (j // 2) / 6)
        assert table[0, p, j].item() == pytest.approx(math.sin(angle) if j % 2 == 0 else math.cos(angle), abs=1e-7)


def test_so_vit_official_init():
    torch.manual_seed(0)
    model = timm.create_model("so_vit_14", img_size=IMG)
    assert model.head.head_drop.p == 0.5 and model.head.pool.reduced_dim == (64, 48)
    assert "pos_embed" in dict(model.named_buffers()) and "pos_embed" in model.state_dict()
    assert torch.equal(model.pos_embed, covpool.models.so_vit.sinusoid_pos_embed(17, 384))
    for fc in (model.head.fc_cls, model.head.fc_cov, model.blocks[0].mlp.fc1):
        assert fc.weight.std().item() == pytest.approx(0.02, rel=0.05) and not fc.bias.any()
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.3)
    stem = model.patch_embed.backbone
    assert all(torch.equal(b.bn3.weight, torch.ones(256)) for b in stem.stage)  # no zero-init of the last BN
    conv = stem.stage[0].conv2  # PyTorch's default: kaiming_uniform(a=√5), bound 1/√fan_in
    assert conv.weight.abs().max() <= (64 * 9) ** -0.5 and conv.weight.std() > 0.5 * (3 * 64 * 9) ** -0.5
    reduce = model.head.pool.reduce[0].conv  # Kaiming normal, fan-out
    assert reduce.weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.05)

    timm_init = timm.create_model("so_vit_7", img_size=IMG, official_init=False, pos_embed="learn")
    assert all(not b.bn3.weight.any() for b in timm_init.patch_embed.backbone.stage)
    assert timm_init.cls_token.abs().max() < 1e-4 and timm_init.pos_embed.requires_grad
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    assert all(p is not model.pos_embed for g in optimizer.param_groups for p in g["params"])


def test_so_vit_mpa_head_and_so_vit_head_api():
    model = timm.create_model("so_vit_14", img_size=IMG, num_classes=3, head="mpa_cov")
    assert model.head.head_name == "mpa_cov" and model.head.pool.backend == "mpa_lya" and model.head.pool.dim == 64
    assert model.head.head_drop.p == 0.0 and model.head_hidden_size == 384 + 64 * 65 // 2
    assert timm.create_model("so_vit_7", img_size=IMG, head="mpa_cov", backend="ns").head.pool.backend == "ns"

    head = covpool.SoViTHead(32, num_classes=4, backend="ns")
    assert head.head_name == "mpa_cov" and head(torch.randn(2, 10, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="kind must be one of \\('svpn', 'mpa', 'sot'\\), got 'bilinear'"):
        covpool.SoViTHead(32, kind="bilinear")
    with pytest.raises(ValueError, match=r"reduced_dim must be a pair \(d1, d2\)"):
        covpool.SoViTHead(32, head="svpn", reduced_dim=8)
    with pytest.raises(ValueError, match="unknown head 'cross'; valid heads are: isqrt_cov"):
        timm.create_model("so_vit_7", head="cross")


def test_so_vit_timm_contract():
    torch.manual_seed(0)
    model = timm.create_model("so_vit_7", img_size=IMG, num_classes=5).eval()
    x = _images()
    with torch.no_grad():
        tokens = model.forward_features(x)
        pre = model.forward_head(tokens, pre_logits=True)
    assert tokens.shape == (2, 17, model.num_features) and model.num_features == 256
    assert pre.shape == (2, model.head_hidden_size) and model.head_hidden_size == 256 + 48 * 24
    assert [f["reduction"] for f in model.feature_info] == [16] * 7
    final, inter = model.forward_intermediates(x, indices=2)
    assert torch.allclose(final, tokens, atol=1e-6) and [t.shape for t in inter] == [(2, 256, 4, 4)] * 2

    model.reset_classifier(0, "")
    assert model(x).shape == (2, 17, 256) and model.head_hidden_size == 256
    with pytest.raises(ValueError, match="num_classes=0"):
        model.reset_classifier(3, "")
    model.reset_classifier(3)  # a classifier brings the second-order head back, as for resnet*_isqrt
    assert model(x).shape == (2, 3) and model.global_pool == "cov"
    bare = timm.create_model("so_vit_7", img_size=IMG, num_classes=0, global_pool="")
    assert bare(x).shape == (2, 17, 256) and not any(k.startswith("head.") for k in bare.state_dict())

    # forward_intermediates gives grids; FX returns the blocks' raw token outputs.
    for feature_cls, shape in (("getter", (2, 256, 4, 4)), ("fx", (2, 17, 256))):
        features = timm.create_model("so_vit_7", img_size=IMG, features_only=True, out_indices=(1, 6),
                                     feature_cls=feature_cls)
        assert [f.shape for f in features(x)] == [shape] * 2

    pruned = timm.create_model("so_vit_7", img_size=IMG, num_classes=5)
    assert pruned.prune_intermediate_layers(indices=2) == [5, 6] and pruned.global_pool == ""
    assert pruned(x).shape == (2, 17, 256) and len(pruned.blocks) == 7

    typed = timm.create_model("so_vit_7", img_size=IMG, num_classes=2, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in typed.parameters())
    assert typed(x.double()).dtype == torch.float64

    from timm.layers import is_notrace_module
    from torchvision.models.feature_extraction import create_feature_extractor
    assert is_notrace_module(covpool.SoViTHead)
    extractor = create_feature_extractor(model, return_nodes=["blocks.6", "head"],
                                         tracer_kwargs={"leaf_modules": [covpool.SoViTHead,
                                                                         covpool.models.so_vit.VisualTokenEmbed]})
    assert extractor(x)["head"].shape == (2, 3)


def test_so_vit_pretrained_tags_point_at_the_release():
    assert timm.list_pretrained("so_vit*") == ["so_vit_7.in1k", "so_vit_10.in1k", "so_vit_14.in1k",
                                              "so_vit_19.in1k"]
    for name in ("so_vit_7", "so_vit_10", "so_vit_14", "so_vit_19"):
        cfg = timm.models.get_pretrained_cfg(name)
        size = name.split("_")[-1]
        assert cfg.url.startswith(f"https://jiangtaoxie.oss-cn-beijing.aliyuncs.com/So-ViT/So-ViT-{size}.pth.tar?")
        assert cfg.num_classes == 1000 and cfg.classifier == ("head.fc_cls", "head.fc_cov")
        assert cfg.first_conv == "patch_embed.backbone.conv"


def test_so_vit_other_img_size():
    assert timm.models.get_pretrained_cfg("so_vit_7").fixed_input_size  # as timm's ViTs: img_size fixes the grid
    odd = timm.create_model("so_vit_7", img_size=100, num_classes=5)
    assert odd.patch_embed.grid_size == (7, 7) and odd.pos_embed.shape == (1, 50, 256)
    assert odd(_images(size=100)).shape == (2, 5)
    with pytest.raises(ValueError, match="img_size"):
        odd(_images(size=64))
    dynamic = timm.create_model("so_vit_7", img_size=IMG, num_classes=5, dynamic_img_size=True)
    assert dynamic(_images(size=96)).shape == (2, 5)
    odd.set_input_size(img_size=IMG)
    assert torch.equal(odd.pos_embed, covpool.models.so_vit.sinusoid_pos_embed(17, 256))
    assert odd(_images()).shape == (2, 5)


# ------------------------------------------------------------------------------- fast-MPN-COV checkpoints
def _fast_mpncov_checkpoint(layout, seed=0, reduced=16, num_classes=7):
    """A ResNet-18 iSQRT-COV in one of fast-MPN-COV's layouts, built from torchvision's names (their
    src/network/resnet.py is torchvision's ResNet) and their reduction / classifier names, random values."""
    torch.manual_seed(seed)
    tv = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
    backbone = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    reduce = {"0.weight": torch.randn(reduced, 512, 1, 1) * 512 ** -0.5, "1.weight": torch.rand(reduced) + 0.5,
              "1.bias": torch.randn(reduced) * 0.1, "1.running_mean": torch.randn(reduced) * 0.1,
              "1.running_var": torch.rand(reduced) + 0.5, "1.num_batches_tracked": torch.tensor(3)}
    fc = {"weight": torch.randn(num_classes, reduced * (reduced + 1) // 2) * 0.1, "bias": torch.randn(num_classes)}
    children = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    if layout == "zoo":  # mpncovresnet50-*.pth: MPNCOVResNet's own names
        sd = dict(backbone)
        sd.update({("layer_reduce." if k[0] == "0" else "layer_reduce_bn.") + k[2:]: v for k, v in reduce.items()})
        sd.update({f"fc.{k}": v for k, v in fc.items()})
        return sd
    features = {}
    for k, v in backbone.items():
        head, rest = k.split(".", 1)
        features[f"features.module.{children[head]}.{rest}"] = v
    if layout == "main_finetune":  # --pretrained mpncovresnet: the reduction is features 8 and 9
        features.update({f"features.module.{8 + int(k[0])}.{k[2:]}": v for k, v in reduce.items()})
    else:  # from scratch: the reduction lives in MPNCOV's conv_dr_block
        features.update({f"representation.conv_dr_block.{k}": v for k, v in reduce.items()})
    features.update({f"classifier.{k}": v for k, v in fc.items()})
    if layout == "main_ddp":
        features = {f"module.{k.replace('features.module.', 'features.')}": v for k, v in features.items()}
    return {"epoch": 3, "arch": "resnet18", "best_prec1": torch.tensor(71.5), "state_dict": features,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}


def _fast_mpncov_forward(checkpoint, layout, x, last_stride):
    """fast-MPN-COV's forward, transcribed (torchvision backbone, Covpool, Sqrtm with 5 iterations, Triuvec)."""
    sd = checkpoint if layout == "zoo" else checkpoint["state_dict"]
    sd = {k.removeprefix("module.").replace("features.module.", "features."): v.double() if v.is_floating_point() else v
          for k, v in sd.items()}
    names = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4"}
    if layout == "zoo":
        tv_state = {k: v for k, v in sd.items() if not k.startswith(("layer_reduce", "fc."))}
        red = {("0." if k.startswith("layer_reduce.") else "1.") + k.split(".", 1)[1]: v
               for k, v in sd.items() if k.startswith("layer_reduce")}
        fc_w, fc_b = sd["fc.weight"], sd["fc.bias"]
    else:
        tv_state = {}
        red = {}
        for k, v in sd.items():
            if k.startswith("features."):
                idx, rest = k[len("features."):].split(".", 1)
                if int(idx) in names:
                    tv_state[f"{names[int(idx)]}.{rest}"] = v
                else:
                    red[f"{int(idx) - 8}.{rest}"] = v
            elif k.startswith("representation.conv_dr_block."):
                red[k[len("representation.conv_dr_block."):]] = v
        fc_w, fc_b = sd["classifier.weight"], sd["classifier.bias"]
    tv = torchvision.models.resnet18(weights=None).double()
    tv.load_state_dict(dict(tv_state, **{"fc.weight": tv.fc.weight, "fc.bias": tv.fc.bias}))
    if last_stride == 1:
        tv.layer4[0].conv1.stride = tv.layer4[0].downsample[0].stride = (1, 1)
    tv.eval()
    F = nn.functional
    f = nn.Sequential(*list(tv.children())[:-2])(x.double())
    f = F.relu(F.batch_norm(F.conv2d(f, red["0.weight"]), red["1.running_mean"], red["1.running_var"],
                            red["1.weight"], red["1.bias"], False, 0.0, 1e-5))
    B, d = f.shape[:2]
    X = f.reshape(B, d, -1)
    M = X.shape[-1]
    I_hat = (-1.0 / M / M) * torch.ones(M, M, dtype=X.dtype) + (1.0 / M) * torch.eye(M, dtype=X.dtype)
    cov = X @ I_hat @ X.transpose(1, 2)
    I3 = 3.0 * torch.eye(d, dtype=X.dtype).expand(B, d, d)
    normA = (1.0 / 3.0) * (cov * I3).sum(dim=(1, 2))
    A = cov / normA.view(B, 1, 1)
    ZY = 0.5 * (I3 - A)
    Y, Z = A @ ZY, ZY
    for _ in range(1, 5 - 1):
        ZY = 0.5 * (I3 - Z @ Y)
        Y, Z = Y @ ZY, ZY @ Z
    root = 0.5 * Y @ (I3 - Z @ Y) * normA.sqrt().view(B, 1, 1)
    index = torch.ones(d, d).triu().reshape(-1).nonzero().squeeze(1)
    return root.reshape(B, -1)[:, index] @ fc_w.T + fc_b


@pytest.mark.parametrize("layout,last_stride", [("zoo", 1), ("main_scratch", 2), ("main_finetune", 1),
                                                ("main_ddp", 2)])
def test_fast_mpncov_layouts_load_and_give_the_authors_logits(tmp_path, layout, last_stride):
    checkpoint = _fast_mpncov_checkpoint(layout)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(checkpoint, path)
    model = timm.create_model("resnet18_isqrt", pretrained=True, num_classes=7, reduced_dim=16,
                              last_stride=last_stride, pretrained_cfg_overlay=dict(file=str(path)))
    model.eval().double()
    x = _images(seed=4)
    with torch.no_grad():
        ours = model(x.double())
    reference = _fast_mpncov_forward(checkpoint, layout, x, last_stride)
    assert reference.abs().max() > 1e-3
    assert (ours - reference).abs().max() <= 1e-10 * reference.abs().max()


def test_isqrt_resnet_official_init_and_tags():
    torch.manual_seed(0)
    model = timm.create_model("resnet50_isqrt", num_classes=3)
    assert model.num_classes == 3
    assert all(torch.equal(b.bn3.weight, torch.ones_like(b.bn3.weight)) for b in model.layer1)
    reduce = model.global_pool.reduce.conv.weight  # Kaiming normal, fan-out = 256 channels × 1×1
    assert reduce.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.05)
    timm_init = timm.create_model("resnet18_isqrt", num_classes=3, official_init=False)
    assert not timm_init.layer1[0].bn2.weight.any()

    assert timm.create_model("resnet18_isqrt").num_classes == 1000
    for name in ("resnet50_isqrt", "resnet101_isqrt"):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.tag == "mpncov_in1k" and cfg.num_classes == 1000 and not (cfg.url or cfg.hf_hub_id)
        assert "drive.google.com" in cfg.notes[0]
        with pytest.raises(ValueError, match="pretrained_cfg_overlay=dict\\(file=path\\)"):
            timm.create_model(name, pretrained=True)
        backbone = timm.models.get_pretrained_cfg(f"{name}.tv_in1k")
        assert backbone.num_classes == 0 and backbone.hf_hub_id == f"timm/{name.removesuffix('_isqrt')}.tv_in1k"
    with pytest.raises(ValueError, match="No released iSQRT-COV ResNet-18"):
        timm.create_model("resnet18_isqrt", pretrained=True)


def test_fast_mpncov_checkpoint_with_another_class_count(tmp_path, caplog):
    # A fine-grained main.py checkpoint (7 classes) into a 3-class model: backbone and reduction load, the
    # classifier is left fresh and timm says so.
    checkpoint = _fast_mpncov_checkpoint("main_finetune")
    path = tmp_path / "cub.pth.tar"
    torch.save(checkpoint, path)
    with caplog.at_level("INFO"):
        model = timm.create_model("resnet18_isqrt", pretrained=True, num_classes=3, reduced_dim=16,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=7))
    sd = checkpoint["state_dict"]
    assert torch.equal(model.layer3[1].conv2.weight, sd["features.module.6.1.conv2.weight"])
    assert torch.equal(model.global_pool.reduce.bn.running_var, sd["features.module.9.running_var"])
    assert model.fc.weight.shape == (3, 136) and "fc.weight" in caplog.text


def test_mpa_head_is_the_releases_pade_square_root():
    # MPA-Lya So-ViT's PadeSqt: X = I − Σ/‖Σ‖_F, √Σ ≈ √‖Σ‖_F · Q(X)⁻¹P(X) with the [5/5] Padé approximant of
    # √(1 − x) (computed here from its Taylor series), upper triangle. The release rounds the coefficients to
    # float16; this reference, like covpool, keeps them exact.
    taylor = [1.0]
    for k in range(1, 11):
        taylor.append(taylor[-1] * (k - 1.5) / k)  # coefficients of √(1 − x)
    a = torch.tensor(taylor, dtype=torch.float64)
    system = torch.stack([torch.stack([a[k - j] for j in range(1, 6)]) for k in range(6, 11)])
    q = torch.cat([torch.ones(1, dtype=torch.float64), torch.linalg.solve(system, -a[6:11])])
    p = torch.stack([sum(q[j] * a[k - j] for j in range(min(k, 5) + 1)) for k in range(6)])

    torch.manual_seed(0)
    head = covpool.SoViTHead(16, num_classes=0, reduced_dim=6, dtype=torch.float64).eval()
    x = torch.randn(2, 1 + 30, 16, dtype=torch.float64)
    conv, bn = head.pool.reduce.conv, head.pool.reduce.bn
    z = torch.relu(bn((x[:, 1:] @ conv.weight[:, :, 0, 0].T).mT.unsqueeze(-1))).squeeze(-1)
    z = z - z.mean(-1, keepdim=True)
    cov = z @ z.mT / z.shape[-1]
    norm = cov.norm(dim=(-2, -1), keepdim=True)
    eye = torch.eye(6, dtype=torch.float64)
    xs = eye - cov / norm
    powers = [eye.expand_as(xs)]
    for _ in range(5):
        powers.append(powers[-1] @ xs)
    num = sum(c * m for c, m in zip(p, powers))
    den = sum(c * m for c, m in zip(q, powers))
    root = torch.linalg.solve(den, num) * norm.sqrt()
    rows, cols = torch.triu_indices(6, 6)
    expected = root[:, rows, cols]
    got = head(x)[:, 16:]
    assert (got - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_cifar_stem_keeps_32x32_maps_at_4x4(device):
    model = timm.create_model("resnet18", num_classes=10).to(device)
    assert covpool.cifar_stem(model) is model
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and isinstance(model.maxpool, nn.Identity)
    assert model.conv1.weight.device == device
    assert model.forward_features(torch.randn(1, 3, 32, 32, device=device)).shape == (1, 512, 4, 4)
    with pytest.raises(ValueError, match=r"single-conv stem \(conv1 \+ maxpool\)"):
        covpool.cifar_stem(nn.Sequential(nn.Conv2d(3, 8, 3)))


@pytest.mark.parametrize("name", ["so_vit_7", "so_vit_10", "so_vit_14", "so_vit_19"])
def test_so_vit_with_one_word_token_has_finite_gradients(name):
    # 16×16 pixels make one word token, whose centred cross-covariance is 0: svPN's s^½ had an infinite
    # derivative there and every gradient came back NaN (the forward was finite).
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, img_size=16)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    model(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    head = covpool.SoViTHead(8, num_classes=2, reduced_dim=(4, 3), head="svpn")
    tokens = torch.randn(2, 1 + 1, 8, requires_grad=True)
    head(tokens).sum().backward()
    assert torch.isfinite(tokens.grad).all()


def test_so_vit_checks_the_backend_its_head_would_ignore():
    with pytest.raises(ValueError, match="unknown backend 'foo'"):
        timm.create_model("so_vit_7", head="mpa_cov", backend="foo")
    with pytest.raises(ValueError, match="head 'svpn' has no matrix square root: backend='foo' does not apply; the "
                                         "token heads that take it: isqrt_cov, improved_bcnn, mpa_cov"):
        timm.create_model("so_vit_7", backend="foo")
    with pytest.raises(ValueError, match="backend='eig' does not apply"):
        covpool.SoViTHead(8, 2, reduced_dim=(4, 3), head="svpn", backend="eig")


@pytest.mark.parametrize("name", ["resnet18_isqrt", "resnet18_dropcov"])
def test_a_covpool_checkpoint_loads_strictly_into_the_model_without_head(name):
    """``global_pool=''``: the checkpoint's covariance head gives way (it used to pass through to a model with
    nowhere to put it: unexpected ``global_pool.reduce.*`` keys), and the backbone is the trained one."""
    from importlib import import_module

    torch.manual_seed(0)
    full = timm.create_model(name, num_classes=5).eval()
    bare = timm.create_model(name, global_pool="", num_classes=0).eval()
    filter_fn = import_module(type(full).__module__).checkpoint_filter_fn
    bare.load_state_dict(filter_fn(full.state_dict(), bare), strict=True)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(bare(x), full.forward_features(x))


def test_a_checkpoint_of_another_reduction_width_is_refused_with_the_width_to_build():
    from covpool.models.resnet_isqrt import checkpoint_filter_fn

    wide = timm.create_model("resnet18_isqrt", num_classes=5, reduced_dim=32)
    narrow = timm.create_model("resnet18_isqrt", num_classes=5, reduced_dim=16)
    with pytest.raises(ValueError, match="reduces to 32 channels but the model to 16: build it with reduced_dim=32"):
        checkpoint_filter_fn(wide.state_dict(), narrow)
