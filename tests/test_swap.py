"""``covpool.swap_pooling`` on timm and torchvision backbones beyond ResNet.

The acceptance list of issue 12, each trained one step at 64×64 (ViTs built with ``img_size=64``) without
pretrained weights, then timm's API checked on the result: ``num_features``, ``head_hidden_size``,
``forward_head(pre_logits=True)``, ``reset_classifier``, layer decay, gradient checkpointing and feature
extraction. Covariance reduced to 16 channels (136 features) to stay fast.
"""
import copy
import io

import pytest
import timm
import timm.optim
import torch
import torchvision
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models._features import FeatureGetterNet, FeatureHookNet
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import covpool
from covpool.layers import CovPool
from covpool.models import SecondOrderNet, TokenCovPool
from covpool.models.resnet_isqrt import ISqrtResNet

IMG = 64
NUM_CLASSES = 200
DIM = 16
COV = DIM * (DIM + 1) // 2
TIMM = {
    "convnext_nano": {}, "efficientnet_b0": {}, "regnety_008": {}, "resnet50d": {},
    "vit_tiny_patch16_224": {"img_size": IMG}, "deit_tiny_patch16_224": {"img_size": IMG},
}
TOKEN_MODELS = {"vit_tiny_patch16_224", "deit_tiny_patch16_224"}
TORCHVISION = ("resnet50", "convnext_tiny", "efficientnet_b0")


def _images(batch=2, seed=0):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _timm(name, num_classes=NUM_CLASSES, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=num_classes, **TIMM.get(name, {}), **kwargs)


def _new_linear(model):
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "fc", None)
    head = head if isinstance(head, nn.Module) else model.classifier
    return head if isinstance(head, nn.Linear) else head[-1]


def _train_step(model, num_classes=NUM_CLASSES, device="cpu"):
    model.train().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    head = _new_linear(model).weight
    before = head.detach().clone()
    out = model(_images().to(device))
    assert out.shape == (2, num_classes)
    loss = nn.functional.cross_entropy(out, torch.tensor([0, num_classes - 1], device=device))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, head)


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_backbone_trains_and_keeps_timm_api(name):
    model = covpool.swap_pooling(_timm(name), reduced_dim=DIM)
    plain = _timm(name)
    assert isinstance(model, ISqrtResNet if name == "resnet50d" else SecondOrderNet)
    token = name in TOKEN_MODELS
    assert model.num_features == plain.num_features
    assert model.head_hidden_size == COV + (plain.num_features if token else 0)
    assert model.num_classes == NUM_CLASSES and model.get_classifier().out_features == NUM_CLASSES
    if not token:
        pool = model.global_pool
        assert isinstance(pool, CovPool) and pool.in_channels == plain.num_features
    else:
        assert isinstance(model.global_pool, TokenCovPool) and model.global_pool.num_prefix_tokens == 1
    _train_step(model)

    model.eval()
    x = _images(batch=1)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == plain.eval().forward_features(x).shape
        assert features.shape[-1 if token else 1] == model.num_features
        pre = model.forward_head(features, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size)
        logits = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), logits, rtol=1e-4, atol=1e-5)
        model.set_grad_checkpointing(False)

        trained_pool = model.global_pool
        model.reset_classifier(0)
        assert model.num_classes == 0 and model.global_pool is trained_pool
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, "")
        unpooled = model(x)
        plain.reset_classifier(0, "")
        assert unpooled.shape == plain.forward_head(plain.forward_features(x), pre_logits=True).shape
        model.reset_classifier(3)
        assert isinstance(model.global_pool, (CovPool, TokenCovPool)) and model(x).shape == (1, 3)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == pre.shape


@pytest.mark.parametrize("name", ["convnext_nano", "vit_tiny_patch16_224", "resnet50d"])
def test_layer_decay_puts_the_new_head_last(name):
    model = covpool.swap_pooling(_timm(name, num_classes=5), reduced_dim=DIM)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(scale) == len(named), "every parameter is in exactly one group"
    first_conv = model.pretrained_cfg["first_conv"]
    assert scale[id(named[f"{first_conv}.weight"])] == min(scale.values()) < 0.7 ** 3
    head = [n for n in named if n.startswith(("global_pool.", "fc."))]
    assert head and all(scale[id(named[n])] == 1.0 for n in head)
    assert len(set(scale.values())) > 3
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    if name in TOKEN_MODELS:
        assert id(named["backbone.pos_embed"]) in no_decay and id(named["backbone.cls_token"]) in no_decay


@pytest.mark.parametrize("name", ["convnext_nano", "efficientnet_b0", "vit_tiny_patch16_224"])
def test_feature_extraction_still_works(name):
    model = covpool.swap_pooling(_timm(name), reduced_dim=DIM).eval()
    plain = _timm(name).eval()  # same seed: the same backbone weights
    x = _images(batch=1)
    with torch.no_grad():
        ours = model.forward_intermediates(x, indices=3, intermediates_only=True)
        theirs = plain.forward_intermediates(x, indices=3, intermediates_only=True)
        assert len(ours) == 3 and all(torch.equal(a, b) for a, b in zip(ours, theirs))
        for cls in (FeatureGetterNet, FeatureHookNet):
            feats = cls(copy.deepcopy(model), out_indices=(1, 2, 3))
            out = feats(x)
            out = list(out.values()) if isinstance(out, dict) else out
            assert len(out) == 3 and all(o.shape[0] == 1 and torch.isfinite(o).all() for o in out)
    assert [f["module"] for f in model.feature_info] == [f"backbone.{f['module']}" for f in plain.feature_info]
    assert all(name in dict(model.named_modules()) for name in (f["module"] for f in model.feature_info))


@pytest.mark.parametrize("name", ["convnext_nano", "vit_tiny_patch16_224"])
def test_fx_trace_and_pickle(name, tmp_path):
    model = covpool.swap_pooling(_timm(name, num_classes=4), reduced_dim=DIM).eval()
    x = _images(batch=1)
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                  tracer_kwargs=tracer_kwargs)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(next(iter(fx(x).values())), expected)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(x), expected)
        torch.save(model.state_dict(), tmp_path / "sd.pth")
        other = covpool.swap_pooling(_timm(name, num_classes=4), reduced_dim=DIM).eval()
        other.load_state_dict(torch.load(tmp_path / "sd.pth", weights_only=True))
        assert torch.equal(other(x), expected)


def test_token_head_skips_prefix_tokens():
    model = covpool.swap_pooling(_timm("vit_tiny_patch16_224", num_classes=3, reg_tokens=4), reduced_dim=DIM)
    assert model.backbone.num_prefix_tokens == 5
    pool = copy.deepcopy(model.global_pool).double().eval()
    assert pool.num_prefix_tokens == 5 and pool.use_class_token
    tokens = torch.randn(2, 5 + 16, 192, dtype=torch.float64)
    out = pool(tokens)
    torch.testing.assert_close(out[:, :192], tokens[:, 0])
    torch.testing.assert_close(out[:, 192:], pool.pool(tokens[:, 5:]))
    changed = tokens.clone()
    changed[:, 1:5] += 10.0
    torch.testing.assert_close(pool(changed), out, rtol=0, atol=0)
    _train_step(model, 3)

    no_cls = covpool.swap_pooling(_timm("vit_tiny_patch16_224", num_classes=3, class_token=False,
                                        global_pool="avg"), reduced_dim=DIM)
    assert not no_cls.global_pool.use_class_token and no_cls.head_hidden_size == COV
    _train_step(no_cls, 3)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_backbone_trains(name, device):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)
    had_dropout = any(isinstance(m, nn.Dropout) for m in getattr(model, "classifier", nn.Identity()).modules())
    same = covpool.swap_pooling(model, reduced_dim=DIM)
    assert same is model and isinstance(model.avgpool, CovPool)
    head = model.fc if name == "resnet50" else model.classifier
    linear = _new_linear(model)
    assert (linear.in_features, linear.out_features) == (COV, NUM_CLASSES)
    assert any(isinstance(m, nn.Dropout) for m in head.modules()) == had_dropout
    _train_step(model, device=device)


def test_defaults_are_the_papers():
    model = covpool.swap_pooling(_timm("convnext_nano", num_classes=5))
    assert model.global_pool.reduced_dim == 256 and model.global_pool.backend == "ns"
    assert model.head_hidden_size == 256 * 257 // 2 and model.fc.in_features == 32896


def test_errors_say_why_and_leave_the_model_alone():
    with pytest.raises(TypeError, match="missing forward_features"):
        covpool.swap_pooling(nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1)))
    with pytest.raises(TypeError, match="not a global average pooling"):
        covpool.swap_pooling(torchvision.models.vgg11(weights=None))
    with pytest.raises(TypeError, match="nn.Module"):
        covpool.swap_pooling("resnet18")
    model = _timm("convnext_nano", num_classes=5)
    head = model.head
    with pytest.raises(ValueError, match="last_stride applies to ResNets"):
        covpool.swap_pooling(model, last_stride=1)
    with pytest.raises(ValueError, match="reduced_dim"):
        covpool.swap_pooling(model, reduced_dim=0)
    with pytest.raises(ValueError, match="token models"):
        covpool.swap_pooling(model, use_class_token=True)
    vit = _timm("vit_tiny_patch16_224")
    for value in ("false", 0, None):  # "false" is truthy: it was taken as True
        with pytest.raises(ValueError, match=f"use_class_token must be True or False, got {value!r}"):
            covpool.swap_pooling(vit, use_class_token=value)
    assert isinstance(vit.head, nn.Linear)
    assert model.head is head and model.num_classes == 5 and model(_images()).shape == (2, 5)
    swapped = covpool.swap_pooling(model)
    with pytest.raises(ValueError, match="already uses covariance pooling"):
        covpool.swap_pooling(swapped)
    with pytest.raises(ValueError, match="unpooled features have no classifier"):
        swapped.reset_classifier(3, "")
    with pytest.raises(ValueError, match="global_pool='avg' is not supported"):
        swapped.reset_classifier(3, "avg")
    distilled = covpool.swap_pooling(_timm("deit_tiny_distilled_patch16_224", img_size=IMG), reduced_dim=DIM)
    with pytest.raises(ValueError, match="distilled"):
        distilled(_images())


def test_last_stride_applies_to_resnet_like_timm_models_that_are_not_timm_resnets():
    # legacy_seresnet18 (timm's SENet class) has a ResNet's layer4 but goes through the generic wrapper
    model = covpool.swap_pooling(timm.create_model("legacy_seresnet18", num_classes=3), last_stride=1,
                                 reduced_dim=8).eval()
    with torch.no_grad():
        maps = model.backbone.forward_features(torch.randn(1, 3, 64, 64))
    assert maps.shape[-2:] == (4, 4)  # stride 16 instead of 32


def test_second_order_net_refuses_a_backbone_without_timms_hooks():
    # It used to fail later, on the first hook called (AttributeError), or wrap a module it cannot run.
    with pytest.raises(TypeError, match="no forward_features, forward_head, reset_classifier"):
        SecondOrderNet(nn.Conv2d(3, 8, 3), "maps", in_channels=8, num_classes=2, pool_options={"reduced_dim": 4})
