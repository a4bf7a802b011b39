"""DropCov's ResNets (``resnet{18,34,50,101,152}_dropcov``): the authors' checkpoint layout, their forward, the
reduction width of their released weights, and what timm's API adds on top.

The authors' key names and shapes come from their code (mingzeG/DropCov, ``CNNs/models/ResNet_ACD.py``), listed
in ``tests/data/dropcov_resnet_keys.json``; checkpoints are made from that listing with random values and saved
as their ``main.py`` saves them. Their forward is written out below in float64 (torchvision's ResNet, which
their file copies, then their head). Inputs are 64×64 (4×4 positions after the stride-1 last stage).
"""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

import covpool
from covpool.models.resnet_dropcov import DropCovResNet
from covpool.models.resnet_isqrt import ISqrtResNet

LISTING = json.loads((Path(__file__).parent / "data" / "dropcov_resnet_keys.json").read_text())["keys"]
DEPTHS = (18, 34, 50, 101, 152)
HEAVY = {101, 152}
# Parameters in millions next to the released checkpoints in the authors' README (ResNet-34/50/101 + DropCov).
README_M = {34: 29.6, 50: 32.0, 101: 51.0}
F64 = torch.float64


def _depths(names):
    return [pytest.param(d, marks=pytest.mark.slow) if d in HEAVY else d for d in names]


def _images(batch=2, size=64, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _authors_shapes(depth, width=128, num_classes=7):
    """Their checkpoint's keys and shapes; the reduction at ``width`` channels (their code as committed: 256,
    the released weights: 128) and a ``num_classes`` classifier."""
    shapes = {}
    for key, shape in LISTING[f"resnet{depth}_ACD"]:
        name = key.removeprefix("module.")
        if name.startswith("layer_reduce"):
            shape = [width, *shape[1:]]
        elif name == "fc.weight":
            shape = [num_classes, width * (width + 1) // 2]
        elif name == "fc.bias":
            shape = [num_classes]
        shapes[key] = shape
    return shapes


def _authors_checkpoint(depth, width=128, num_classes=7, seed=0):
    """A main.py checkpoint of resnet{depth}_ACD (DataParallel state dict) with random weights."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in _authors_shapes(depth, width, num_classes).items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(5)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) > 1:
            sd[key] = torch.randn(shape, generator=gen) * math.prod(shape[1:]) ** -0.5
        elif key.endswith("weight"):
            sd[key] = 1 + 0.2 * torch.randn(shape, generator=gen)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=gen)
    return {"epoch": 100, "arch": f"resnet{depth}_ACD", "state_dict": sd, "best_acc1": torch.tensor(76.8),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "params": [0]}]}}


def _load(tmp_path, checkpoint, depth, num_classes=7, **kwargs):
    path = tmp_path / f"resnet{depth}_acd_best.pth.tar"
    torch.save(checkpoint, path)
    return timm.create_model(f"resnet{depth}_dropcov", pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


@torch.no_grad()
def _authors_forward(checkpoint, depth, x, train_seed=None):
    """ResNet_ACD.forward in float64: torchvision's ResNet with layer4 at stride 1, layer_reduce → BN → ReLU,
    in training eca_layer + balance_rate (Dropout2d with the rate as they compute it; its channel mask drawn as
    ``torch.rand(B, C) >= p`` from ``train_seed``), the covariance (mean removed, 1/N), its upper triangle, fc."""
    F = nn.functional
    sd = {k.removeprefix("module."): v.double() if v.is_floating_point() else v
          for k, v in checkpoint["state_dict"].items()}
    train = train_seed is not None
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None).double()
    tv.load_state_dict({**{k: v for k, v in sd.items() if k in tv.state_dict()},
                        "fc.weight": tv.fc.weight, "fc.bias": tv.fc.bias})
    for m in tv.layer4[0].modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
    tv.train(train)
    f = nn.Sequential(*list(tv.children())[:-2])(x.double())
    f = F.relu(F.batch_norm(F.conv2d(f, sd["layer_reduce.weight"]), sd["layer_reduce_bn.running_mean"].clone(),
                            sd["layer_reduce_bn.running_var"].clone(), sd["layer_reduce_bn.weight"],
                            sd["layer_reduce_bn.bias"], train, 0.1, 1e-5))
    B, d = f.shape[:2]

    def cov(t):
        t = t.reshape(B, d, -1)
        t = t - t.mean(-1, keepdim=True)
        return t @ t.transpose(1, 2) / t.shape[-1]

    if train:
        y = f.mean(dim=(2, 3)).unsqueeze(1)                            # (B, 1, d): the channels as a sequence
        y = F.conv1d(y, sd["eca_layer.conv.weight"], padding=1).squeeze(1).softmax(-1)
        f = f * y[:, :, None, None] + f
        rows = cov(f).sum(2)
        rate = (y * rows).sum(1) / (y.norm(dim=1) * rows.norm(dim=1))
        p = float((1 - 10 / math.log2(d) * rate.mean()).clamp(0, 1))
        torch.manual_seed(train_seed)
        keep = (torch.rand(B, d) >= p).double()
        f = f * (keep / (1 - p) if p < 1 else 0 * keep)[:, :, None, None]
    index = torch.ones(d, d).triu().reshape(-1).nonzero().squeeze(1)
    return cov(f).reshape(B, -1)[:, index] @ sd["fc.weight"].T + sd["fc.bias"]


def _assert_loaded(model, checkpoint):
    state = model.state_dict()
    names = {"layer_reduce.": "global_pool.reduce.conv.", "layer_reduce_bn.": "global_pool.reduce.bn.",
             "eca_layer.conv.": "global_pool.drop.conv."}
    loaded = 0
    for key, value in checkpoint["state_dict"].items():
        key = key.removeprefix("module.")
        for old, new in names.items():
            key = new + key[len(old):] if key.startswith(old) else key
        assert torch.equal(state[key], value), key
        loaded += 1
    assert loaded == len(state)


def test_registry_and_the_released_reduction_width():
    assert timm.list_models("resnet*_dropcov") == [f"resnet{d}_dropcov" for d in DEPTHS]
    for depth in DEPTHS:
        with torch.device("meta"):
            model = timm.create_model(f"resnet{depth}_dropcov")
            committed = timm.create_model(f"resnet{depth}_dropcov", reduced_dim=256)
        params = sum(p.numel() for p in model.parameters())
        listed = {k: math.prod(s) for k, s in _authors_shapes(depth, 128, 1000).items()
                  if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        assert params == sum(listed.values())
        # reduced_dim=256 is the code as committed, key for key
        assert sum(p.numel() for p in committed.parameters()) == sum(
            math.prod(s) for k, s in LISTING[f"resnet{depth}_ACD"]
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
        assert model.head_hidden_size == 128 * 129 // 2 and committed.head_hidden_size == 256 * 257 // 2
        if depth in README_M:  # the README's counts fit 128 channels, not the 256 of the code
            assert abs(params / 1e6 - README_M[depth]) < 0.05
            assert abs(sum(p.numel() for p in committed.parameters()) / 1e6 - README_M[depth]) > 20


@pytest.mark.parametrize("depth", [18, 50])
def test_authors_checkpoint_loads_strictly_and_gives_their_logits(tmp_path, depth):
    checkpoint = _authors_checkpoint(depth)
    model = _load(tmp_path, checkpoint, depth)
    assert isinstance(model, DropCovResNet) and model.num_classes == 7
    _assert_loaded(model, checkpoint)
    x = _images(seed=1)
    with torch.no_grad():
        ours = model.double().eval()(x.double())
    reference = _authors_forward(checkpoint, depth, x)
    assert reference.abs().max() > 1e-2
    assert (ours - reference).abs().max() <= 1e-10 * reference.abs().max()


@pytest.mark.parametrize("depth", _depths([34, 101, 152]))
def test_authors_checkpoint_loads_strictly(tmp_path, depth):
    checkpoint = _authors_checkpoint(depth, num_classes=3)
    _assert_loaded(_load(tmp_path, checkpoint, depth, num_classes=3), checkpoint)


def test_training_mode_gives_their_logits_with_the_same_channel_mask(tmp_path):
    checkpoint = _authors_checkpoint(18, seed=2)
    model = _load(tmp_path, checkpoint, 18).double().train()
    x = _images(seed=3)
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            ours = model(x.double())
        reference = _authors_forward(checkpoint, 18, x, train_seed=seed)
        assert (ours - reference).abs().max() <= 1e-10 * reference.abs().max()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x.double()), ours)  # the channel dropout acted in training


def test_the_code_as_committed_loads_with_reduced_dim_256(tmp_path):
    checkpoint = _authors_checkpoint(18, width=256)
    with pytest.raises(ValueError, match="reduces to 256 channels but the model to 128: build it with reduced_dim=256"):
        _load(tmp_path, checkpoint, 18)
    model = _load(tmp_path, checkpoint, 18, reduced_dim=256)
    _assert_loaded(model, checkpoint)
    assert model.fc.in_features == 32896


def test_plain_resnet_checkpoint_loads_the_backbone_only(tmp_path):
    torch.manual_seed(1)
    tv = torchvision.models.resnet34(weights=None).state_dict()
    path = tmp_path / "resnet34.pth"
    torch.save(tv, path)
    torch.manual_seed(0)
    fresh = timm.create_model("resnet34_dropcov", num_classes=10)
    torch.manual_seed(0)
    model = timm.create_model("resnet34_dropcov", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path)))
    state, fresh_state = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tv.items() if not k.startswith("fc."))
    head = [k for k in state if k.startswith(("global_pool.", "fc."))]
    assert "global_pool.drop.conv.weight" in head and all(torch.equal(state[k], fresh_state[k]) for k in head)
    cfg = timm.models.get_pretrained_cfg("resnet34_dropcov.tv_in1k")
    assert cfg.num_classes == 0 and cfg.hf_hub_id == "timm/resnet34.tv_in1k"


def test_pretrained_tags_and_evaluation_transform():
    for depth, top1 in ((34, 76.81), (50, 78.19), (101, 79.51)):
        name = f"resnet{depth}_dropcov"
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.tag == "dropcov_in1k" and cfg.num_classes == 1000 and not (cfg.url or cfg.hf_hub_id)
        assert "drive.google.com" in cfg.notes[0] and f"{top1}% top-1" in cfg.notes[0]
        with pytest.raises(ValueError, match="pretrained_cfg_overlay=dict\\(file=path\\)"):
            timm.create_model(name, pretrained=True)
    for depth in (18, 152):
        with pytest.raises(ValueError, match=f"No released DropCov ResNet-{depth}"):
            timm.create_model(f"resnet{depth}_dropcov", pretrained=True)
    data = timm.data.resolve_data_config(model=timm.create_model("resnet18_dropcov", num_classes=2))
    assert data["input_size"] == (3, 224, 224) and data["crop_pct"] == 0.875 and data["interpolation"] == "bilinear"
    assert data["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and data["std"] == timm.data.IMAGENET_DEFAULT_STD


def test_head_options_and_timm_api():
    torch.manual_seed(0)
    model = timm.create_model("resnet18_dropcov", num_classes=4)
    pool = model.global_pool
    assert isinstance(model, ISqrtResNet) and pool.channel_drop == "adaptive" and pool.normalization == "none"
    assert model.forward_features(_images()).shape == (2, 512, 4, 4)
    assert [f.shape[-1] for f in timm.create_model("resnet18_dropcov", features_only=True)(_images())] == [
        32, 16, 8, 4, 4]
    # official init: no zero-initialised last BatchNorm, Kaiming-normal (fan-out) reduction
    assert all(torch.equal(b.bn2.weight, torch.ones_like(b.bn2.weight)) for b in model.layer1)
    assert pool.reduce.conv.weight.std().item() == pytest.approx((2 / 128) ** 0.5, rel=0.05)
    assert not timm.create_model("resnet18_dropcov", official_init=False).layer1[0].bn2.weight.any()
    with pytest.raises(ValueError, match="head 'dropcov' has no matrix square root; for one, build resnet\\*_isqrt"):
        timm.create_model("resnet18_dropcov", backend="ns")
    with pytest.raises(ValueError, match="no matrix square root whose backend"):
        covpool.set_backend(model, "eig")
    with pytest.raises(ValueError, match="already uses covariance pooling"):
        covpool.swap_pooling(model)
    model.reset_classifier(0, "")
    model.reset_classifier(3)  # the DropCov head comes back, not iSQRT-COV's
    assert model.global_pool.channel_drop == "adaptive" and model.fc.in_features == 8256


def test_one_training_step_on_the_embedded_data():
    from covpool.train import EmbeddedTextures

    data = EmbeddedTextures("train", img_size=32, per_class=1)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor(data.targets)
    torch.manual_seed(0)
    model = timm.create_model("resnet18_dropcov", num_classes=len(data.classes), reduced_dim=32).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert {"fc.weight", "global_pool.reduce.conv.weight", "conv1.weight"} <= changed


def test_eval_forward_under_torch_compile():
    torch.manual_seed(0)
    model = timm.create_model("resnet18_dropcov", num_classes=3, reduced_dim=16).eval()
    x = _images(batch=1, size=32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
