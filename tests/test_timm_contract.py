"""timm's model contract, checked on every model covpool registers.

Our own re-creation of the checks in timm's ``tests/test_models.py`` (huggingface/pytorch-image-models) that
apply to models without pretrained weights on the hub: forward (with and without gradient checkpointing),
backward, the default-cfg contract (``num_features``, ``head_hidden_size``, ``reset_classifier(0)`` and
``reset_classifier(0, '')``, ``global_pool=''``), ``features_only`` (list, getter and hooks),
``forward_intermediates`` and FX forward/backward with timm's leaf modules. As in timm, a model whose name
matches one of timm's "non-standard" patterns (ViT-like token outputs) gets the token-layout checks; every
other model the spatial ones. Inputs are 64×64 at batch 1–2 (timm uses the cfg size, up to 384) so the
whole file runs in about a minute on a CPU; models built for a fixed input size get ``img_size=64``.

Not covered, as in the issue: TorchScript (deprecated in torch 2.14) and the hub download tests.
"""
import fnmatch
import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import covpool  # noqa: F401  (registers the models)

COVPOOL_MODELS = [n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("covpool.")]
HEAVY = {"resnet101_isqrt", "so_vit_14", "so_vit_19", "resnet101_dropcov", "resnet152_dropcov"}
# Construction options for these checks. vgg16_isqrt's head is narrowed (the contract is the same at any width):
# its first classifier layer, 32 896 × 4096, would otherwise be built and drawn in every test.
CONTRACT_KWARGS = {"vgg16_isqrt": {"reduced_dim": 16, "hidden_dim": 64}}
# SoT and DropCov's transformers are one class: the tiny variants run by default, the larger ones are slow.
HEAVY |= {"sot_small", "sot_base", "deit_small_dropcov", "deit_base_dropcov", "t2t_vit_14_dropcov"}
# The name patterns timm's tests/test_models.py treats as "non-standard" (token outputs, no spatial API),
# as far as they can match a covpool name.
# So-ViT, SoT and DropCov's T2T-ViT-14 are ViTs (token outputs) whose names timm's list does not know: covpool
# files them with them (DropCov's deit_*_dropcov match timm's "deit*").
NON_STD_FILTERS = ("vit_*", "deit*", "cait_*", "eva_*", "beit*", "tiny_vit_*", "test_vit*", "so_vit*", "sot_*",
                   "t2t_vit*")
IMG = 64
NUM_CLASSES = 5


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


def _is_non_std(name):
    return any(fnmatch.fnmatch(name, f) for f in NON_STD_FILTERS)


def _create(name, **kwargs):
    kwargs = {**CONTRACT_KWARGS.get(name, {}), **kwargs}
    if timm.models.get_pretrained_cfg(name).fixed_input_size:
        kwargs.setdefault("img_size", IMG)
    return timm.create_model(name, pretrained=False, **kwargs)


def _images(batch=1, seed=0):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _assert_all_grads(model):
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"parameters with a non-finite gradient: {bad}"


def test_registry_is_covered():
    assert {"resnet18_isqrt", "resnet50_isqrt", "resnet101_isqrt", "so_vit_7", "resnet50_dropcov",
            "vgg16_isqrt"} <= set(COVPOOL_MODELS)


@pytest.mark.parametrize("name", _params(COVPOOL_MODELS))
def test_forward_and_grad_checkpointing(name, device):
    torch.manual_seed(0)
    model = _create(name).eval().to(device)
    x = _images().to(device)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()
    model.set_grad_checkpointing()
    with torch.no_grad():
        again = model(x)
    torch.testing.assert_close(again, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", _params(COVPOOL_MODELS))
def test_backward(name, device):
    torch.manual_seed(0)
    model = _create(name, num_classes=NUM_CLASSES).train().to(device)
    out = model(_images(batch=2).to(device))
    assert out.shape == (2, NUM_CLASSES)
    out.mean().backward()
    _assert_all_grads(model)


@pytest.mark.parametrize("name", _params(COVPOOL_MODELS))
def test_default_cfg_contract(name):
    torch.manual_seed(0)
    model = _create(name, num_classes=NUM_CLASSES).eval()
    assert model.num_classes == NUM_CLASSES and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.pretrained_cfg
    state = model.state_dict()
    for key in ("first_conv", "classifier"):
        names = (cfg[key],) if isinstance(cfg[key], str) else cfg[key]
        assert all(f"{n}.weight" in state for n in names), f"{key} {names} not among the parameters"
    x = _images()
    with torch.no_grad():
        features = model.forward_features(x)
        pre = model.forward_head(features, pre_logits=True)
        if _is_non_std(name):
            assert features.shape[-1 if features.ndim == 3 else 1] == model.num_features
        else:
            fmt = getattr(model, "output_fmt", "NCHW")
            assert features.ndim == 4, f"forward_features must be unpooled (B, C, H, W), got {tuple(features.shape)}"
            assert features.shape[get_channel_dim(fmt)] == model.num_features
            # timm checks the cfg's pool_size at the cfg's input size; here both are scaled to IMG.
            reduction = model.feature_info[-1]["reduction"]
            assert tuple(s * reduction for s in cfg["pool_size"]) == tuple(cfg["input_size"][1:])
            spatial = tuple(features.shape[a] for a in get_spatial_dim(fmt))
            assert spatial == (math.ceil(IMG / reduction),) * 2
        assert pre.shape == (1, model.head_hidden_size)

        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre.shape
        torch.testing.assert_close(pooled, pre)

        model.reset_classifier(0, "")  # unpooled: the feature map, or every token
        assert model(x).shape == features.shape
        unpooled = _create(name, num_classes=0, global_pool="").eval()
        assert unpooled(x).shape == features.shape

        model.reset_classifier(3)
        assert model.num_classes == 3 and model(x).shape == (1, 3)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == pre.shape


@pytest.mark.parametrize("name", _params(COVPOOL_MODELS))
def test_device_and_dtype_kwargs(name):
    model = _create(name, device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}


def _check_feature_maps(outputs, channels, reductions, batch=1):
    assert len(outputs) == len(channels) == len(reductions)
    for c, r, o in zip(channels, reductions, outputs):
        assert o.shape[0] == batch and o.shape[1] == c
        assert all(s <= math.ceil(IMG / r) + 1 for s in o.shape[2:])
        assert torch.isfinite(o).all()


def _feature_cases():
    # Token models give NCHW feature maps through their getter (forward_intermediates), as timm's ViTs do;
    # hooks and FX would return the blocks' raw tokens.
    return [(name, cls) for name in COVPOOL_MODELS
            for cls in ((None, "getter") if _is_non_std(name) else (None, "getter", "hook", "fx"))]


@pytest.mark.parametrize("name, feature_cls", [
    pytest.param(*case, marks=pytest.mark.slow) if case[0] in HEAVY else case for case in _feature_cases()])
def test_features_only(name, feature_cls):
    kwargs = {} if feature_cls is None else {"feature_cls": feature_cls}
    model = _create(name, features_only=True, **kwargs).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    with torch.no_grad():
        _check_feature_maps(model(_images()), channels, reductions)


@pytest.mark.parametrize("name", _params(COVPOOL_MODELS))
def test_forward_intermediates(name):
    model = _create(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    x = _images()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        _check_feature_maps(intermediates, info.channels(), info.reduction())
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(only) == 2 and all(torch.equal(a, b) for a, b in zip(only, intermediates[-2:]))
        model.set_grad_checkpointing()
        again, _ = model.forward_intermediates(x, output_fmt="NCHW")
    torch.testing.assert_close(again, final, rtol=1e-4, atol=1e-5)


def _fx_model(model, train=False):
    # As timm's tests: trace with timm's leaf modules and return the node(s) feeding the graph's output.
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return = [train_nodes[-1]]
    if train:
        graph_nodes = list(reversed(NodePathTracer(**tracer_kwargs).trace(model).nodes))
        names = [n.name for n in graph_nodes]
        train_return = [train_nodes[-names.index(n.name)] for n in graph_nodes[0]._input_nodes]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", _params(COVPOOL_MODELS))
def test_fx_forward(name):
    torch.manual_seed(0)
    model = _create(name).eval()
    x = _images()
    with torch.inference_mode():
        out = model(x)
        fx_out = torch.cat(tuple(_fx_model(model)(x).values()))
    assert torch.equal(fx_out, out)


@pytest.mark.parametrize("name", _params(COVPOOL_MODELS))
def test_fx_backward(name):
    torch.manual_seed(0)
    model = _fx_model(_create(name, num_classes=NUM_CLASSES).train(), train=True)
    out = torch.cat(tuple(model(_images(batch=2)).values()))
    assert out.shape == (2, NUM_CLASSES)
    out.mean().backward()
    _assert_all_grads(model)

