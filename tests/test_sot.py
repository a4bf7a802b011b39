"""SoT and DropCov's transformers (covpool/models/sot.py) against their authors' checkpoint layouts.

The layouts are ``tests/data/sot_dropcov_release_keys.json``: the key names and shapes of the authors' state
dicts (jiangtaoxie/SoT ``sot_src``, mingzeG/DropCov ``Transformers/src``, built by their code under timm
0.3.4), filled here with random values; their forward is written out below from that code, in float64. timm's
contract on every variant is tests/test_timm_contract.py's. Inputs are 64×64 (4×4 tokens).
"""
import argparse
import json
import math
from pathlib import Path

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from torch import nn

import covpool
from covpool.models.so_vit import sinusoid_pos_embed
from covpool.models.sot import SoT, checkpoint_filter_fn
from covpool.train import EmbeddedTextures

LISTING = json.loads((Path(__file__).parent / "data" / "sot_dropcov_release_keys.json").read_text())["models"]
RELEASE_NAMES = {"sot_tiny": "SoT_Tiny", "sot_small": "SoT_Small", "sot_base": "SoT_Base",
                 "deit_tiny_dropcov": "Deit_drop_Tiny", "deit_small_dropcov": "Deit_drop_Small",
                 "deit_base_dropcov": "Deit_drop_Base", "t2t_vit_14_dropcov": "T2T_ViT_14"}
# (heads of the blocks, heads of the head, d_r, svPN) of the releases' builders.
RELEASE_HEADS = {"sot_tiny": (4, 6, 14, True), "deit_tiny_dropcov": (4, 6, 14, False)}
IMG = 64
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

pytestmark = pytest.mark.usefixtures("one_thread")


def _release_state_dict(name, num_classes=5, seed=0, noise=0.0):
    """The authors' state dict of ``name`` with random values (BatchNorm/LayerNorm statistics randomised) and
    ``num_classes`` classifier rows."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in LISTING[RELEASE_NAMES[name]].items():
        if key.startswith("classifier.") and key.endswith(("_fc.weight", "_fc.bias")):
            shape = [num_classes, *shape[1:]]
        if key == "pos_embed":
            value = sinusoid_pos_embed(shape[1], shape[2])
        elif key.endswith("num_batches_tracked"):
            value = torch.tensor(7)
        elif key.endswith("running_var"):
            value = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("running_mean") or key.endswith("bias"):
            value = 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1 and key != "classifier.representation.norm.weight":  # BatchNorm / LayerNorm scales
            value = 1 + 0.2 * torch.randn(shape, generator=gen)
        elif key == "cls_token":
            value = 0.02 * torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) * (math.prod(shape[1:]) if len(shape) > 1 else 1) ** -0.5
        if noise and value.is_floating_point() and key != "pos_embed":
            value = value + noise * torch.randn(value.shape, generator=gen)
        sd[key] = value
    return sd


def _save_training_checkpoint(path, ema, raw):
    # What the releases' main.py saves (timm 0.3.4's CheckpointSaver, EMA always on): both state dicts, the
    # argparse Namespace, the optimizer and the AMP scaler.
    torch.save({"epoch": 299, "arch": "SoT_Tiny", "state_dict": raw, "optimizer": {"state": {}, "param_groups": []},
                "version": 2, "args": argparse.Namespace(model="SoT_Tiny", model_ema=True),
                "amp_scaler": {"scale": 65536.0}, "state_dict_ema": ema, "metric": 80.0}, path)


def _release_forward(sd, x, name, train=False):
    """The authors' forward (SoT's ``SoT`` / DropCov's ``Vit``, their visual tokens, ``ViTBlock`` and
    ``Classifier``), written out in float64; in training, BatchNorm on batch statistics and DropCov's masks drawn
    as their code draws them."""
    block_heads, heads, width, svpn = RELEASE_HEADS[name]
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    x = x.double()

    def bn(t, p):
        return F.batch_norm(t, sd[p + "running_mean"].clone(), sd[p + "running_var"].clone(), sd[p + "weight"],
                            sd[p + "bias"], train, 0.1, 1e-5)

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + "weight"], sd[p + "bias"], 1e-5)

    tok = "visual_tokens.tokens."
    t = F.max_pool2d(F.conv2d(x, sd[tok + "stem.0.weight"], sd[tok + "stem.0.bias"], padding=1), 3, 2, 1)
    for block in (0, 2, 4):  # timm 0.3.4's DenseBlock: its "norm" layers are plain ReLUs
        features = [t]
        for layer in range(1, 7):
            p = f"{tok}stage.{block}.denselayer{layer}."
            h = F.conv2d(F.relu(torch.cat(features, 1)), sd[p + "conv1.weight"])
            features.append(F.conv2d(F.relu(h), sd[p + "conv2.weight"], padding=1))
        p = f"{tok}stage.{block + 1}."  # their DenseTransition: BatchNorm, 1×1 conv, 2×2 average pool
        t = F.avg_pool2d(F.conv2d(bn(torch.cat(features, 1), p + "norm."), sd[p + "conv.weight"]), 2)
    t = F.conv2d(t, sd[tok + "transition.weight"], sd[tok + "transition.bias"]).flatten(2).transpose(1, 2)
    b, n, c = t.shape
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], 1) + sinusoid_pos_embed(n + 1, c).double()
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        qkv = (ln(t, p + "norm1.") @ sd[p + "attn.qkv.weight"].T).reshape(b, n + 1, 3, block_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(b, n + 1, c)
        t = t + h @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = F.gelu(ln(t, p + "norm2.") @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        t = t + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    t = ln(t, "norm.")
    rep = "classifier.representation."
    wr = sd[rep + "wr.weight"]
    qk = (t[:, 1:] @ wr.T).reshape(b, n, wr.shape[0] // (heads * width), heads, width).permute(2, 0, 3, 1, 4)
    q, k = qk[0].reshape(b * heads, n, width), qk[1].reshape(b * heads, n, width)
    if not svpn and train:  # DropCov: Dropout2d(0.2) of a (B·h, N, d_r) mask of ones, then Dropout(0.5)
        with pytest.warns(UserWarning, match="dropout2d"):
            mask = F.dropout2d(torch.ones(b * heads, n, width, dtype=q.dtype), 0.2, True)
        q, k = q * mask, k * mask
    q, k = q - q.mean((1, 2), keepdim=True), k - k.mean((1, 2), keepdim=True)  # one mean per head
    p = q.transpose(1, 2) @ k / n
    if svpn:  # their svPN: one power iteration from norm.weight, top singular value to the power ½
        v0 = sd[rep + "norm.weight"].view(1, width, 1).expand(b * heads, width, 1)
        u = F.normalize(p @ v0, dim=1)
        v = F.normalize(p.transpose(1, 2) @ u, dim=1)
        s = u.transpose(1, 2) @ p @ v
        p = u @ s.sqrt() @ v.transpose(1, 2) + (p - u @ s @ v.transpose(1, 2)) / (s.sqrt() + 1e-5)
    elif train:
        p = F.dropout(p, 0.5, True)
    feats = p.reshape(b, -1)
    return (t[:, 0] @ sd["classifier.cls_fc.weight"].T + sd["classifier.cls_fc.bias"]
            + feats @ sd["classifier.visual_fc.weight"].T + sd["classifier.visual_fc.bias"])


def _images(batch=2, size=IMG, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_registered_names():
    assert timm.list_models("sot_*") == ["sot_base", "sot_small", "sot_tiny"]
    assert set(RELEASE_NAMES) <= set(timm.list_models())
    assert all(isinstance(timm.create_model(n, img_size=IMG, num_classes=2), SoT) for n in ("sot_tiny",
                                                                                          "deit_tiny_dropcov"))


@pytest.mark.parametrize("name", list(RELEASE_NAMES))
def test_release_layout_loads_strictly_and_counts_the_releases_parameters(name):
    listing = LISTING[RELEASE_NAMES[name]]
    with torch.device("meta"):
        model = timm.create_model(name)
        release = {k: torch.empty(s) for k, s in listing.items()}
    state = checkpoint_filter_fn({"state_dict_ema": release, "state_dict": {}}, model)
    model.load_state_dict(state, strict=True)  # every key of theirs has a home, every one of ours is filled
    assert len(model.state_dict()) == len(listing)

    # Parameters: the release's trainable ones (its sinusoid table is a frozen parameter there, a buffer here),
    # less DropCov's unused third block of projection rows (h·d_r·C), which the filter drops.
    trainable = sum(math.prod(s) for k, s in listing.items() if not k.endswith(_BN_BUFFERS) and k != "pos_embed")
    wr = listing["classifier.representation.wr.weight"]
    unused = wr[0] // 3 * wr[1] if name.endswith("_dropcov") else 0
    assert wr[0] == (3 if name.endswith("_dropcov") else 2) * model.head.pool.proj.out_features // 2
    assert _params(model) == trainable - unused
    assert ("classifier.representation.norm.weight" in listing) == name.startswith("sot_")


def test_release_parameter_counts():
    # At 1000 classes, in millions: SoT's README says 7.7 / 26.9 / 76.8 (Tiny's and Small's are below what
    # their code builds, 7.98 / 27.01), DropCov's 25.6 (DeiT-S, with the unused rows) and 24.9 (T2T-ViT-14).
    expected = {"sot_tiny": 7_983_550, "sot_small": 27_010_856, "sot_base": 76_774_966,
                "deit_tiny_dropcov": 7_983_536, "deit_small_dropcov": 25_531_280,
                "deit_base_dropcov": 93_500_816, "t2t_vit_14_dropcov": 24_943_760}
    with torch.device("meta"):
        assert {n: _params(timm.create_model(n)) for n in expected} == expected


@pytest.mark.parametrize("name", list(RELEASE_HEADS))
def test_release_checkpoint_gives_the_authors_logits(tmp_path, name):
    ema = _release_state_dict(name)
    path = tmp_path / f"{name}.pth.tar"
    _save_training_checkpoint(path, ema, _release_state_dict(name, noise=0.05))
    # as a user writes it: the file's 5-way classifiers are kept because they fit num_classes=5
    model = timm.create_model(name, pretrained=True, img_size=IMG, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path))).double()
    x = _images(seed=5)
    with torch.no_grad():
        out = model.eval()(x.double())
        reference = _release_forward(ema, x, name)  # the EMA weights, as the authors' evaluation loads them
        assert reference.abs().max() > 0.1
        assert (out - reference).abs().max() <= 1e-10 * reference.abs().max()

        # Training mode: BatchNorm on the batch and, in DropCov, the same token mask and feature dropout.
        torch.manual_seed(3)
        out = model.train()(x.double())
        torch.manual_seed(3)
        reference = _release_forward(ema, x, name, train=True)
        assert (out - reference).abs().max() <= 1e-10 * reference.abs().max()
        if name.endswith("_dropcov"):
            assert not torch.allclose(model(x.double()), out)  # another draw

    # The raw (non-EMA) weights load when given: the checkpoint's own entry as a state dict.
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(path, weights_only=True)["state_dict"]
    other = timm.create_model(name, pretrained=True, img_size=IMG, num_classes=5,
                              pretrained_cfg_overlay=dict(state_dict=raw, num_classes=5))
    assert torch.equal(other.head.fc_cov.weight, raw["classifier.visual_fc.weight"])
    assert torch.equal(model.head.fc_cov.weight, ema["classifier.visual_fc.weight"].double())


def test_training_config_starts_from_the_authors_checkpoint(tmp_path):
    # `covpool train model.pretrained=FILE` with a file their main.py saved (which pickles its argparse
    # Namespace): the classifier-size probe used to refuse the file before the model could load it.
    from covpool.train._model import build_model
    from covpool.train.config import load_config

    ema = _release_state_dict("deit_tiny_dropcov")
    path = tmp_path / "Deit_drop_Tiny.pth.tar"
    _save_training_checkpoint(path, ema, ema)
    cfg = load_config(None, ["model.name=deit_tiny_dropcov", f"model.pretrained={path}", "model.kwargs.img_size=64"])
    model = build_model(cfg.model, 5)
    assert torch.equal(model.head.fc_cov.weight, ema["classifier.visual_fc.weight"])
    assert torch.equal(model.head.pool.proj.weight, ema["classifier.representation.wr.weight"][:2 * 6 * 14])


def test_checkpoint_of_the_other_head_kind_raises():
    with torch.device("meta"):
        sot = {k: torch.empty(s) for k, s in LISTING["SoT_Tiny"].items()}
        dropcov = {k: torch.empty(s) for k, s in LISTING["Deit_drop_Tiny"].items()}
        with pytest.raises(ValueError, match="has svPN \\(SoT\\) but the model was built with normalization='none'"):
            checkpoint_filter_fn(sot, timm.create_model("deit_tiny_dropcov"))
        with pytest.raises(ValueError, match="has no svPN .* built with normalization='svpn'"):
            checkpoint_filter_fn(dropcov, timm.create_model("sot_tiny"))
        headless = checkpoint_filter_fn(sot, timm.create_model("sot_tiny", num_classes=0, global_pool=""))
    assert not any(k.startswith(("head.", "classifier.")) for k in headless)


def test_releases_configuration_and_pretrained_tags():
    model = timm.create_model("sot_small", img_size=IMG, num_classes=3)
    pool = model.head.pool
    assert (pool.reduced_dim, pool.centering, pool.normalization, pool.token_drop) == ((6, 24), "scalar", "svpn", 0)
    assert model.head.head_drop.p == 0.5 and len(model.blocks) == 14 and model.blocks[0].mlp.fc1.out_features == 1344
    assert model.head_hidden_size == 384 + 6 * 24 * 24 and model.num_features == 384
    base = timm.create_model("deit_base_dropcov", img_size=IMG, num_classes=3)
    pool = base.head.pool
    assert (pool.reduced_dim, pool.normalization, pool.token_drop, pool.v0) == ((12, 24), "none", 0.2, None)
    assert base.head.head_drop.p == 0.5  # their head hard-codes 0.5; the builder's 0.7 never reaches it
    # timm 0.3.4's dense layers: ReLU where timm 1.0 puts BatchNorm + ReLU
    layer = model.patch_embed.backbone.stage[0].denselayer1
    assert [type(m) for m in layer.children()] == [nn.ReLU, nn.Conv2d, nn.ReLU, nn.Conv2d]

    released = {n for n in RELEASE_NAMES if timm.models.get_pretrained_cfg(n).tag == "in1k"}
    assert released == {"deit_small_dropcov", "t2t_vit_14_dropcov"}  # the others' tag is "untrained"
    for name in RELEASE_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert (cfg.input_size, cfg.crop_pct, cfg.interpolation, cfg.num_classes) == ((3, 224, 224), 0.875,
                                                                                      "bicubic", 1000)
        assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.classifier == ("head.fc_cls", "head.fc_cov")
        assert not cfg.url and cfg.first_conv == "patch_embed.backbone.conv"
    with pytest.raises(ValueError, match="82.4% top-1.*drive.google.com/file/d/1Ziw9dRvainxIQlq_9htZ58inr6nRsPmx.*"
                                         "pretrained_cfg_overlay=dict\\(file=path\\)"):
        timm.create_model("deit_small_dropcov", pretrained=True)
    with pytest.raises(ValueError, match="No released weights .*'Coming soon'.*80.3%"):
        timm.create_model("sot_tiny", pretrained=True)


def test_token_grid_and_input_sizes():
    model = timm.create_model("deit_tiny_dropcov", img_size=100, num_classes=2)
    assert model.patch_embed.grid_size == (6, 6) and model.pos_embed.shape == (1, 37, 240)
    assert model(_images(size=100)).shape == (2, 2)
    with pytest.raises(ValueError, match="img_size"):
        model(_images())
    assert timm.create_model("sot_tiny", img_size=224, num_classes=0, global_pool="").patch_embed.grid_size == (14, 14)
    assert timm.create_model("sot_tiny", img_size=15, num_classes=2)(_images(size=15)).shape == (2, 2)
    with pytest.raises(ValueError, match="at least 15 pixels"):
        timm.create_model("sot_tiny", img_size=14)


@pytest.mark.parametrize("name", list(RELEASE_HEADS))
def test_one_training_step_on_the_embedded_data(name):
    data = EmbeddedTextures("train", img_size=32, per_class=1)
    images, labels = (torch.utils.data.default_collate([data[i] for i in range(len(data))]))
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, num_classes=len(data.classes))
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert {"head.fc_cov.weight", "head.pool.proj.weight", "patch_embed.backbone.conv.weight",
            "patch_embed.backbone.stage.5.norm.running_mean"} <= changed
    assert "pos_embed" not in changed  # the fixed sinusoid


def test_set_backend_says_the_head_has_no_square_root():
    model = timm.create_model("sot_tiny", img_size=32, num_classes=2)
    assert model.head.backend is None
    with pytest.raises(ValueError, match="SoT / DropCov head .* has no matrix square root"):
        covpool.set_backend(model, "ns")
