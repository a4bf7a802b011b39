"""fast MPN-COV's VGG-16 (``vgg16_isqrt``): the authors' checkpoint layouts, their forward, timm's API.

Key names and shapes come from the authors' code (jiangtaoxie/fast-MPN-COV: ``src/network/mpncovvgg.py`` through
``model_init.py``'s ``Basemodel`` / ``Newmodel``), listed in ``tests/data/fast_mpncov_vgg_keys.json``; the
checkpoints are made from that listing with random values, the convolutions at their real shapes and the
head narrowed (16-channel reduction, 32-wide hidden layers) to stay small. Their forward is written out
below in float64. Inputs are 64×64 (4×4 positions: VGG without its last max pool).
"""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import covpool
from covpool.models.vgg_isqrt import ISqrtVGG

LISTING = json.loads((Path(__file__).parent / "data" / "fast_mpncov_vgg_keys.json").read_text())["keys"]
VGG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)  # without the last pool
SMALL = dict(reduced_dim=16, hidden_dim=32)
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
F64 = torch.float64


def _images(batch=2, size=64, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _shapes(layout="mpncovvgg16_bn", reduced=16, hidden=32, num_classes=5):
    """A listed layout with the head narrowed: reduction 256 → ``reduced``, hidden 4096 → ``hidden``."""
    tri = reduced * (reduced + 1) // 2
    sizes = {256: reduced, 32896: tri, 4096: hidden, 1000: num_classes, 200: num_classes}
    return {key: [sizes.get(s, s) for s in shape] if not key.startswith("features.") else shape
            for key, shape in LISTING[layout]}


def _checkpoint(layout="mpncovvgg16_bn", seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in _shapes(layout, **kwargs).items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(3)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) > 1:
            sd[key] = torch.randn(shape, generator=gen) * math.prod(shape[1:]) ** -0.5
        elif key.endswith("weight"):
            sd[key] = 1 + 0.2 * torch.randn(shape, generator=gen)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=gen)
    return sd


def _load(tmp_path, checkpoint, num_classes=5, **kwargs):
    path = tmp_path / "mpncovvgg16_bn.pth"
    torch.save(checkpoint, path)
    return timm.create_model("vgg16_isqrt", pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(file=str(path)), **{**SMALL, **kwargs})


@torch.no_grad()
def _authors_forward(sd, x, train_seed=None):
    """Basemodel.forward of mpncovvgg16_bn in float64: VGG-16-BN features without the last pool, MPNCOV (1×1 conv
    → BN → ReLU, covariance X·Î·Xᵀ, 5 Newton–Schulz steps, upper triangle), the classifier; in training
    (``train_seed``) batch statistics and the classifier's two dropouts drawn from that seed."""
    F = nn.functional
    sd = {k.replace("features.module.", "features."): v.double() if v.is_floating_point() else v
          for k, v in sd.items()}
    train = train_seed is not None

    def bn(t, p):
        return F.batch_norm(t, sd[p + "running_mean"].clone(), sd[p + "running_var"].clone(), sd[p + "weight"],
                            sd[p + "bias"], train, 0.1, 1e-5)

    t, i = x.double(), 0
    for v in VGG_D:
        if v == "M":
            t, i = F.max_pool2d(t, 2, 2), i + 1
        else:
            t = F.relu(bn(F.conv2d(t, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1),
                          f"features.{i + 1}."))
            i += 3
    t = F.relu(bn(F.conv2d(t, sd["representation.conv_dr_block.0.weight"]), "representation.conv_dr_block.1."))
    B, d = t.shape[:2]
    X = t.reshape(B, d, -1)
    M = X.shape[-1]
    I_hat = (-1.0 / M / M) * torch.ones(M, M, dtype=F64) + (1.0 / M) * torch.eye(M, dtype=F64)
    cov = X @ I_hat @ X.transpose(1, 2)
    I3 = 3.0 * torch.eye(d, dtype=F64).expand(B, d, d)
    normA = (1.0 / 3.0) * (cov * I3).sum(dim=(1, 2))
    A = cov / normA.view(B, 1, 1)
    ZY = 0.5 * (I3 - A)
    Y, Z = A @ ZY, ZY
    for _ in range(1, 5 - 1):
        ZY = 0.5 * (I3 - Z @ Y)
        Y, Z = Y @ ZY, ZY @ Z
    root = 0.5 * Y @ (I3 - Z @ Y) * normA.sqrt().view(B, 1, 1)
    v = root.reshape(B, -1)[:, torch.ones(d, d).triu().reshape(-1).nonzero().squeeze(1)]
    if "classifier.weight" in sd:  # a fine-tuned model: one Linear
        return v @ sd["classifier.weight"].T + sd["classifier.bias"]
    if train:
        torch.manual_seed(train_seed)
    h = F.dropout(F.relu(v @ sd["classifier.0.weight"].T + sd["classifier.0.bias"]), 0.5, train)
    h = F.dropout(F.relu(h @ sd["classifier.3.weight"].T + sd["classifier.3.bias"]), 0.5, train)
    return h @ sd["classifier.6.weight"].T + sd["classifier.6.bias"]


def _assert_loaded(model, sd):
    state = model.state_dict()
    names = {"representation.conv_dr_block.0.": "global_pool.reduce.conv.",
             "representation.conv_dr_block.1.": "global_pool.reduce.bn.", "classifier.0.": "pre_logits.fc1.",
             "classifier.3.": "pre_logits.fc2.", "classifier.6.": "head.fc.", "classifier.": "head.fc.",
             "features.module.": "features."}
    for key, value in sd.items():
        for old, new in names.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        assert torch.equal(state[key], value), key
    assert len(sd) == len(state)


def test_the_release_layout_and_its_file_size():
    with torch.device("meta"):
        model = timm.create_model("vgg16_isqrt")
        finetuned = timm.create_model("vgg16_isqrt", hidden_dim=0, drop_rate=0.0, num_classes=200)
    release = dict(LISTING["mpncovvgg16_bn"])
    params = sum(math.prod(s) for k, s in release.items() if not k.endswith(BUFFERS))
    assert sum(p.numel() for p in model.parameters()) == params == 170_479_144
    assert model.head_hidden_size == 4096 and model.global_pool.out_features == 32896
    # float32 values and int64 counters of that layout: the 650.4 MB of the authors' download page
    size = sum(math.prod(s) * (8 if k.endswith("num_batches_tracked") else 4) for k, s in release.items())
    assert round(size / 2**20, 1) == 650.4
    tuned = dict(LISTING["mpncovvgg16_bn_finetuned_200"])
    assert sum(p.numel() for p in finetuned.parameters()) == sum(
        math.prod(s) for k, s in tuned.items() if not k.endswith(BUFFERS))
    assert finetuned.head_hidden_size == 32896 and finetuned.get_classifier().weight.shape == (200, 32896)


def test_release_checkpoint_loads_strictly_and_gives_their_logits(tmp_path):
    sd = _checkpoint()
    model = _load(tmp_path, sd)
    assert isinstance(model, ISqrtVGG)
    _assert_loaded(model, sd)
    model.double()
    x = _images(seed=1)
    with torch.no_grad():
        ours = model.eval()(x.double())
        reference = _authors_forward(sd, x)
        assert reference.abs().max() > 1e-2
        assert (ours - reference).abs().max() <= 1e-10 * reference.abs().max()
        model.train()
        torch.manual_seed(5)
        ours = model(x.double())
        reference = _authors_forward(sd, x, train_seed=5)
        assert (ours - reference).abs().max() <= 1e-10 * reference.abs().max()
        torch.manual_seed(6)
        assert not torch.allclose(model(x.double()), ours)  # the dropouts act in training


def test_fine_tuning_layout(tmp_path):
    # Their fine-tuning (model_init.Newmodel, no representation argument): one Linear on the covariance.
    tuned = _checkpoint("mpncovvgg16_bn_finetuned_200", seed=1)
    main_py = {"epoch": 40, "arch": "mpncovvgg16_bn", "state_dict": tuned, "best_prec1": 87.0, "optimizer": {}}
    model = _load(tmp_path, main_py, hidden_dim=0, drop_rate=0.0)
    _assert_loaded(model, tuned)
    x = _images(seed=2)
    with torch.no_grad():
        ours = model.double().eval()(x.double())
    reference = _authors_forward(tuned, x)
    assert (ours - reference).abs().max() <= 1e-10 * reference.abs().max()
    with pytest.raises(ValueError, match="build it with hidden_dim=0"):
        _load(tmp_path, main_py)

    # The ImageNet release into that layout: convolutions and reduction load, the classifier stays fresh.
    release = _checkpoint()
    torch.manual_seed(0)
    fresh = timm.create_model("vgg16_isqrt", num_classes=5, **{**SMALL, "hidden_dim": 0})
    torch.manual_seed(0)
    model = _load(tmp_path, release, hidden_dim=0)
    state = model.state_dict()
    assert torch.equal(state["features.40.weight"], release["features.module.40.weight"])
    assert torch.equal(state["global_pool.reduce.bn.running_var"],
                       release["representation.conv_dr_block.1.running_var"])
    assert torch.equal(state["head.fc.weight"], fresh.state_dict()["head.fc.weight"])
    assert not any(k.startswith("pre_logits.") for k in state)


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_plain_vgg_checkpoint_loads_the_convolutions_only(tmp_path, source):
    convs = {k.replace("features.module.", "features."): v for k, v in _checkpoint(seed=3).items()
             if k.startswith("features.")}
    if source == "torchvision":  # vgg16_bn: features.N and a 25 088-input classifier (shapes shrunk: dropped anyway)
        head = {"classifier.0.weight": torch.ones(8, 49), "classifier.6.weight": torch.ones(1000, 8)}
    else:  # timm's vgg16_bn: the classifier as 7×7 and 1×1 convolutions
        head = {"pre_logits.fc1.weight": torch.ones(8, 512, 7, 7), "head.fc.weight": torch.ones(1000, 8)}
    path = tmp_path / "vgg16_bn.pth"
    torch.save({**convs, **head}, path)
    torch.manual_seed(0)
    fresh = timm.create_model("vgg16_isqrt", num_classes=5, **SMALL)
    torch.manual_seed(0)
    model = timm.create_model("vgg16_isqrt", pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    state, fresh_state = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(state[k], v) for k, v in convs.items())
    assert all(torch.equal(v, fresh_state[k]) for k, v in state.items() if not k.startswith("features."))


def test_pretrained_tags_and_evaluation_transform():
    cfg = timm.models.get_pretrained_cfg("vgg16_isqrt")
    assert cfg.tag == "mpncov_in1k" and cfg.num_classes == 1000 and not (cfg.url or cfg.hf_hub_id)
    assert "1oD2QydL8VvK2Zu6Ba5Xe3gFq3to8JsrN" in cfg.notes[0] and "76.02% top-1" in cfg.notes[0]
    assert cfg.input_size == (3, 224, 224) and cfg.crop_pct == 0.875 and cfg.interpolation == "bilinear"
    assert cfg.pool_size == (14, 14) and cfg.first_conv == "features.0" and cfg.classifier == "head.fc"
    with pytest.raises(ValueError, match="pretrained_cfg_overlay=dict\\(file=path\\)"):
        timm.create_model("vgg16_isqrt", pretrained=True)
    backbone = timm.models.get_pretrained_cfg("vgg16_isqrt.tv_in1k")
    assert backbone.num_classes == 0 and backbone.hf_hub_id == "timm/vgg16_bn.tv_in1k"


def test_head_api_and_options():
    torch.manual_seed(0)
    model = timm.create_model("vgg16_isqrt", num_classes=4, **SMALL).eval()
    x = _images()
    assert model.forward_features(x).shape == (2, 512, 4, 4) and model.global_pool.backend == {"name": "ns",
                                                                                                 "num_iters": 5}
    assert [f.shape[-1] for f in timm.create_model("vgg16_isqrt", features_only=True, **SMALL)(x)] == [64, 32, 16, 8, 4]
    with torch.no_grad():
        logits = model(x)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pre.shape == (2, 32) and logits.shape == (2, 4)

    # gradient checkpointing (timm's VGG has none): same output and gradients
    model.train()
    torch.manual_seed(1)
    model(x).square().sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    torch.manual_seed(1)
    model(x).square().sum().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-6)

    model.eval()
    previous = covpool.set_backend(model, "eig")
    assert previous == {"global_pool": {"name": "ns", "num_iters": 5}}
    with torch.no_grad():
        assert not torch.allclose(model(x), logits, rtol=1e-3)  # five NS steps are far from the exact root

    model.reset_classifier(0, "")
    assert model(x).shape == (2, 512, 4, 4) and model.head_hidden_size == 512
    for indices, shape in ((1, (2, 512, 4, 4)), ([2], (2, 256, 16, 16))):  # timm's pruning drops the head too
        pruned = timm.create_model("vgg16_isqrt", num_classes=4, **SMALL).eval()
        pruned.prune_intermediate_layers(indices)
        with torch.no_grad():
            assert pruned(x).shape == shape and pruned.num_classes == 0
    model.reset_classifier(3)
    assert isinstance(model.pre_logits, nn.Sequential) and model(x).shape == (2, 3)
    assert model.global_pool.backend == {"name": "ns", "num_iters": 5}
    for bad, match in (({"output_stride": 32}, "output_stride=32"), ({"global_pool": "avg"}, "global_pool='avg'"),
                       ({"hidden_dim": -1}, "hidden_dim must be an integer >= 0")):
        with pytest.raises(ValueError, match=match):
            timm.create_model("vgg16_isqrt", **SMALL | bad)


def test_a_checkpoint_of_another_reduction_width_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reduces to 16 channels but the model to 8: build it with reduced_dim=16"):
        _load(tmp_path, _checkpoint(), reduced_dim=8)


def test_one_training_step_on_the_embedded_data():
    from covpool.train import EmbeddedTextures

    data = EmbeddedTextures("train", img_size=32, per_class=1)
    images = torch.stack([data[i][0] for i in range(len(data))])
    torch.manual_seed(0)
    model = timm.create_model("vgg16_isqrt", num_classes=len(data.classes), **SMALL).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(images), torch.tensor(data.targets))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert {"head.fc.weight", "pre_logits.fc1.weight", "global_pool.reduce.conv.weight", "features.0.weight"} <= changed
