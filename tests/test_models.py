"""covpool's timm models (iSQRT-COV ResNets, So-ViT) and ``swap_pooling``.

Parametrised over the models covpool registers with timm. Inputs are 64×64 with batch 2 to stay fast on
CPU; So-ViT is built for that size (``img_size=64``: a 4×4 token grid).
"""
import copy

import pytest
import timm
import timm.optim
import torch
import torchvision
from torch import nn

import covpool
from covpool.layers import CovPool
from covpool.models.resnet_isqrt import ISqrtResNet

MODELS = timm.list_models(["*_isqrt", "so_vit*"])
IMG = 64

# Xie et al., So-ViT (arXiv:2104.10935), parameters at 1000 classes in millions.
SO_VIT_PUBLISHED_M = {"so_vit_7": 5.6, "so_vit_10": 7.2, "so_vit_14": 24.7, "so_vit_19": 43.9}
# Ours differ by < 0.1 M (see the notes: learned position embedding, full rather than cross covariance).
PARAM_RTOL = 0.01
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
    assert timm.list_models("*_isqrt") == ["resnet18_isqrt", "resnet50_isqrt", "resnet101_isqrt"]
    assert "swap_pooling" in covpool.__all__ and covpool.swap_pooling is covpool.models.swap_pooling


@pytest.mark.parametrize("name", MODELS)
def test_param_count(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = _params(model)
    if name in SO_VIT_PUBLISHED_M:
        assert count == pytest.approx(SO_VIT_PUBLISHED_M[name] * 1e6, rel=PARAM_RTOL)
    else:
        # timm's ResNet without its classifier + 1×1 reduction to 256 with BN + linear on 32 896 features.
        with torch.device("meta"):
            plain = timm.create_model(name.removesuffix("_isqrt"), num_classes=0)
        channels = plain.num_features
        assert model.head_hidden_size == 32896 and model.num_features == channels
        assert count == _params(plain) + channels * 256 + 2 * 256 + 32896 * 1000 + 1000


@pytest.mark.parametrize("name", _mark_heavy(MODELS))
def test_forward_backward_and_classifier(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **_size_kwargs(name))
    state = model.state_dict()
    classifiers = model.pretrained_cfg["classifier"]
    classifiers = (classifiers,) if isinstance(classifiers, str) else classifiers
    for classifier in classifiers:
        assert f"{classifier}.weight" in state and f"{classifier}.bias" in state
    assert f"{model.pretrained_cfg['first_conv']}.weight" in state

    x = _images()
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
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("resnet18_isqrt", global_pool="avg")
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)
    features = timm.create_model("resnet18_isqrt", features_only=True)(_images())
    assert [f.shape[-1] for f in features] == [IMG // 2, IMG // 4, IMG // 8, IMG // 16, IMG // 16]


def test_pretrained_cfgs_point_at_timm_resnet_weights():
    # No hub in the tests: only check where pretrained=True would load the backbone from.
    for name in timm.list_models("*_isqrt"):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id == f"timm/{name.removesuffix('_isqrt')}.tv_in1k" and cfg.classifier == "fc"
    assert timm.models.get_pretrained_cfg("so_vit_7").classifier == ("head.fc_cls", "head.fc_cov")


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


def test_so_vit_other_img_size(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("so_vit_7", img_size=160, num_classes=5)
    assert model.patch_embed.grid_size == (10, 10) and model.pos_embed.shape == (1, 101, 256)
    assert model(_images(size=160)).shape == (2, 5)
    odd = timm.create_model("so_vit_7", img_size=100, num_classes=5)
    assert odd(_images(size=100)).shape == (2, 5)
    with pytest.raises(ValueError, match="img_size"):
        odd(_images(size=96))

    path = tmp_path / "so_vit_7_224.pth"
    source = timm.create_model("so_vit_7", num_classes=5)
    torch.save(source.state_dict(), path)
    resized = timm.create_model("so_vit_7", img_size=160, num_classes=5, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path), num_classes=5))
    assert resized.pos_embed.shape == (1, 101, 256)
    assert torch.equal(resized.pos_embed[:, 0], source.pos_embed[:, 0])
    assert torch.equal(resized.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert torch.equal(resized.head.fc_cov.weight, source.head.fc_cov.weight)

    dynamic = timm.create_model("so_vit_7", img_size=IMG, num_classes=5, dynamic_img_size=True)
    assert dynamic(_images(size=96)).shape == (2, 5)


def test_so_vit_timm_conventions():
    torch.manual_seed(0)
    model = timm.create_model("so_vit_7", img_size=IMG, num_classes=5)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))

    x = _images()
    reference = model(x)
    model.set_grad_checkpointing(True)
    checkpointed = model(x)
    assert torch.allclose(reference, checkpointed, atol=1e-5)
    checkpointed.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="avg")


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
