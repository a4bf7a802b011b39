"""The fine-tuner's path (issue 23): a run started from a covpool checkpoint for every kind of model, class lists
checked and stored, data.img_size reaching transformers, data checked before any download, the start-up header,
the head's learning rate, and `covpool predict` / `covpool.load_model` / `covpool eval`'s outputs end to end."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from _train_helpers import make_imagefolder, tiny_overrides
from torch import nn

import covpool
from covpool.cli import main
from covpool.layers import heads
from covpool.train import engine
from covpool.train._model import build_model, make_model, param_groups
from covpool.train._optim import make_optimizer
from covpool.train.checkpoint import Checkpoint, with_checksums
from covpool.train.config import ConfigError, config_to_dict, load_config
from covpool.train.config_checks import check_config
from covpool.train.data import ClassListError, open_datasets
from covpool.train.embedded import EMBEDDED_CLASSES

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second OpenMP thread only slows them down


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# (model overrides, data.img_size): each kind of model covpool trains, at sizes that keep a 2x2 map or more
KINDS = {
    "swapped_timm": (["model.name=test_resnet", "model.swap_pooling=true", "model.covpool.reduced_dim=8",
                      "model.covpool.last_stride=1"], 32),
    "swapped_torchvision": (["model.name=torchvision:mobilenet_v3_small", "model.swap_pooling=true",
                             "model.covpool.reduced_dim=8"], 64),
    "registered": (["model.name=resnet18_isqrt", "model.kwargs.reduced_dim=8"], 32),
    "transformer_448": (["model.name=test_vit", "model.swap_pooling=true", "model.covpool.reduced_dim=8"], 448),
}


def _fake_checkpoint(path: Path, overrides: list[str], num_classes: int, class_names=None) -> dict:
    """A covpool checkpoint of the model ``overrides`` describe, as training writes one (config, weights,
    checksums), without training: random weights."""
    cfg = load_config(None, overrides)
    model = build_model(cfg.model, num_classes, img_size=cfg.data.img_size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(with_checksums({"config": config_to_dict(cfg), "state_dict": state, "epoch": 1,
                               "class_names": class_names}), path)
    return state


# -- 1. model.pretrained=<a covpool checkpoint> ------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_own_checkpoint_starts_a_new_run_for_every_kind_of_model(kind, tmp_path):
    """The checkpoint is loaded after the surgery: every weight with the same class count, all but the classifier
    with another; the plain model refuses it with the keys named (it raised RuntimeError from load_state_dict on
    the plain timm model before the swap)."""
    model_over, size = KINDS[kind]
    over = [*model_over, f"data.img_size={size}"]
    ckpt = tmp_path / "best.pt"
    stored = _fake_checkpoint(ckpt, over, num_classes=4)
    cfg = load_config(None, [*over, f"model.pretrained={ckpt}"])
    same = make_model(cfg.model, 4, img_size=size)
    assert same.new == () and same.weights == f"covpool checkpoint {ckpt} (epoch 1)"
    assert all(torch.equal(v, stored[k]) for k, v in same.model.state_dict().items())

    other = make_model(cfg.model, 3, img_size=size)
    fresh = {k for k, v in other.model.state_dict().items() if v.shape != stored[k].shape}
    assert fresh and all(k.rpartition(".")[0] in other.new for k in fresh)  # the classifier, and only it
    assert all(torch.equal(v, stored[k]) for k, v in other.model.state_dict().items() if k not in fresh)

    if kind != "registered":  # the model without its second-order head: the head's keys are named
        plain = load_config(None, [model_over[0], f"data.img_size={size}", f"model.pretrained={ckpt}"])
        with pytest.raises(ConfigError, match=r"do not fit this model \(.*unexpected .*model.swap_pooling: True -> "
                                              r"False"):
            build_model(plain.model, 4, img_size=size)


def test_a_torchvision_weights_file_loads_its_backbone_under_a_new_head(tmp_path):
    """A torchvision state dict (ImageNet's 1000 classes) as model.pretrained of a swapped torchvision model: every
    backbone weight loaded, the classifier new, and the header's modules say which."""
    import torchvision

    source = torchvision.models.mobilenet_v3_small()
    torch.save(source.state_dict(), tmp_path / "mobilenet.pth")
    cfg = load_config(None, ["model.name=torchvision:mobilenet_v3_small", "model.swap_pooling=true",
                             "model.covpool.reduced_dim=8", f"model.pretrained={tmp_path / 'mobilenet.pth'}"])
    built = make_model(cfg.model, 3)
    weights = built.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in source.state_dict().items() if k.startswith("features."))
    assert built.weights == f"file {tmp_path / 'mobilenet.pth'}" and built.new == ("avgpool", "classifier")
    assert weights["classifier.1.weight"].shape == (3, 36)


def test_a_new_class_count_reinitialises_the_classifier_and_the_header_says_so(tmp_path, caplog):
    """Started from a 5-class checkpoint on the 8 embedded classes: backbone and head loaded, fc new, and the
    start-up header lists model, parameters, head, weights, data, device and the lr of each group."""
    over = tiny_overrides(tmp_path, max_steps_per_epoch=1, max_val_steps=1, model__swap_pooling="true",
                          model__covpool__reduced_dim=8, model__covpool__last_stride=1, optim__head_lr_mult=5.0)
    ckpt = tmp_path / "five.pt"
    stored = _fake_checkpoint(ckpt, over, num_classes=5)
    with caplog.at_level(logging.INFO, logger="covpool"):
        result = engine.train(load_config(None, [*over, f"model.pretrained={ckpt}"]))
    lines = [r.getMessage() for r in caplog.records]
    total = sum(p.numel() for p in result.model.parameters())
    assert lines[0] == (f"model: test_resnet (ISqrtResNet), {total / 1e6:.2f}M parameters ({total / 1e6:.2f}M "
                        "trainable); second-order head 'isqrt_cov' (model.swap_pooling), square-root backend ns")
    assert lines[1] == f"weights: covpool checkpoint {ckpt} (epoch 1); new (re-initialised): fc"
    assert lines[2] == "data: embedded: 8 classes; train 24 images, val 16 images; input 32x32"
    assert lines[3] == "device: cpu, amp none; 1 epoch of 1 step, 8 images per step (batch 8 x 1 process)"
    assert lines[4].startswith("optimizer: sgd, cosine schedule, weight decay 0.0001; lr per parameter group: ")
    assert "backbone 0.05" in lines[4] and "head 0.25" in lines[4]
    saved = torch.load(tmp_path / "tiny" / "last.pt", weights_only=True)
    assert saved["class_names"] == [name for name, _ in EMBEDDED_CLASSES]
    assert saved["state_dict"]["fc.weight"].shape == (8, stored["fc.weight"].shape[1])


# -- 2. class lists -----------------------------------------------------------------------------------------------
def _imagefolder(root: Path, train: list[str], val: list[str]) -> Path:
    make_imagefolder(root, classes=max(len(train), len(val)), per_class=2)
    for split, names in (("train", train), ("val", val)):
        for folder in sorted((root / split).iterdir()):
            index = int(folder.name.removeprefix("class"))
            if index >= len(names):
                for f in folder.iterdir():
                    f.unlink()
                folder.rmdir()
            else:
                folder.rename(folder.with_name(names[index]))
    return root


@pytest.mark.parametrize("val, words", [(["ant", "bee"], "missing 'cat'"),
                                        (["ant", "bee", "cat", "dog"], "extra 'dog'"),
                                        (["ant", "bee", "cow"], "missing 'cat'; extra 'cow'")])
def test_imagefolder_splits_with_other_classes_are_one_error_line_before_training(val, words, tmp_path, capsys):
    """A class missing from val/ used to shift every label silently (the run "succeeded" at 33%); an extra one
    ended in `IndexError: Target 5 is out of bounds` after a whole epoch."""
    root = _imagefolder(tmp_path / "data", ["ant", "bee", "cat"], val)
    over = [f"output_dir={tmp_path}", "data.dataset=imagefolder", f"data.root={root}", "data.img_size=32",
            "model.name=test_resnet", "progress=false", "data.workers=0"]
    assert main(["train", "--config", "demo", *over]) == 2
    line = one_error_line(capsys)
    assert "the class lists of imagefolder val/ against train/" in line and words in line
    assert not list(tmp_path.glob("avgpool/*.*"))  # refused before anything was written


def test_checkpoints_store_class_names_and_eval_refuses_other_classes(tmp_path, capsys):
    root = _imagefolder(tmp_path / "data", ["ant", "bee", "cat"], ["ant", "bee", "cat"])
    over = [f"output_dir={tmp_path}", "name=run", "data.dataset=imagefolder", f"data.root={root}", "data.img_size=32",
            "model.name=test_resnet", "progress=false", "data.workers=0", "data.batch_size=3", "epochs=1"]
    assert main(["train", "--config", "demo", *over]) == 0
    ckpt = Checkpoint.read(tmp_path / "run" / "last.pt")
    assert ckpt.class_names == ["ant", "bee", "cat"]
    other = _imagefolder(tmp_path / "other", ["ant", "bee", "cow"], ["ant", "bee", "cow"])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt.path), f"data.root={other}"]) == 2
    line = one_error_line(capsys)
    assert f"the class lists of the checkpoint {ckpt.path}" in line and "missing 'cat'; extra 'cow'" in line


def test_every_data_set_kind_checks_its_splits_class_lists(tmp_path, monkeypatch):
    """The check is the data set's class list per split, whatever the kind: a CUB label outside classes.txt, or a
    torchvision data set whose splits disagree, is refused too."""
    from _train_helpers import make_cub

    root = make_cub(tmp_path / "cub", classes=3, per_class=2)
    cfg = load_config(None, ["data.dataset=cub200", f"data.root={root}"])
    assert open_datasets(cfg.data).classes == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    labels = root / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace(" 3\n", " 4\n"))
    with pytest.raises(ClassListError, match="label 3 but only 3 classes are named"):
        open_datasets(cfg.data)
    from covpool.train import _datasets

    class Fake(torch.utils.data.Dataset):
        def __init__(self, train):
            self.classes = ["a", "b"] if train else ["a", "c"]
            self.targets = [0, 1]

        def __len__(self):
            return 2

    specs = _datasets.specs()
    monkeypatch.setattr(_datasets, "specs", lambda: {**specs, "cifar10": _datasets.Spec(
        lambda c, split, tf, seed: Fake(split == "train"), 10, val_is_test=True)})
    with pytest.raises(ClassListError, match="cifar10 val against train .*missing 'b'; extra 'c'"):
        open_datasets(load_config(None, ["data.dataset=cifar10", f"data.root={tmp_path}"]).data)


# -- 3. data.img_size reaches transformers -----------------------------------------------------------------------
def test_img_size_reaches_fixed_size_models_or_the_dry_run_refuses_it():
    """so_vit_7 and timm's ViTs are built at data.img_size (So-ViT at 32 px and a ViT at 64 px ended in a
    traceback after set-up); a model.kwargs.img_size that disagrees is one ConfigError from the dry run."""
    for name, size in (("so_vit_7", 32), ("vit_tiny_patch16_224", 64)):
        cfg = load_config(None, [f"model.name={name}", f"data.img_size={size}"])
        check_config(cfg)
        model = build_model(cfg.model, 10, img_size=size).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 3, size, size)).shape == (2, 10)
    fixed = load_config(None, ["model.name=vit_tiny_patch16_224", "data.img_size=64", "model.kwargs.img_size=224"])
    with pytest.raises(ConfigError, match=r"model.name='vit_tiny_patch16_224' cannot take data.img_size=64 inputs: "
                                          r"Input height \(64\) doesn't match model \(224\); change model.kwargs"):
        check_config(fixed)


def test_the_448_transformer_config_builds_at_448():
    cfg = load_config("cub200_vit_base_isqrt_448")
    assert cfg.data.img_size == 448 and "img_size" not in cfg.model.kwargs and cfg.model.swap_pooling
    check_config(cfg)
    with torch.device("meta"):
        model = build_model(cfg.model, 200, for_checkpoint=True, img_size=cfg.data.img_size)
    assert model.backbone.patch_embed.grid_size == (28, 28) and model.backbone.pos_embed.shape == (1, 785, 768)


# -- 4. data before weights; covpool's offline message ----------------------------------------------------------
@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The Hugging Face hub unreachable, as with HF_HUB_OFFLINE=1 and an empty cache."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_wrong_layout_fails_before_any_download(offline_hub, tmp_path, capsys):
    """A config with hub weights and an ImageFolder tree where CUB is expected: the layout error, at once (it
    spent 50-70 s in hub retries and ended with the hub's message)."""
    root = make_imagefolder(tmp_path / "data", classes=2, per_class=1)
    assert main(["train", "--config", "cub200_resnet50_isqrt", f"data.root={root}", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err  # the error line, then the layout expected
    assert err.startswith("error: data set 'cub200'") and "lacks images.txt" in err and "Traceback" not in err


def test_unreachable_hub_keeps_covpools_offline_advice(offline_hub, tmp_path, capsys):
    over = tiny_overrides(tmp_path, model__pretrained="true")
    assert main(["train", "--config", "demo", *over]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: could not fetch pretrained weights for 'test_resnet' (LocalEntryNotFoundError")
    assert "download them elsewhere and pass model.pretrained=/path/to/file.safetensors" in line


# -- 12. the head's learning rate; sizes the model cannot use ---------------------------------------------------
@pytest.mark.parametrize("head", ["sot", "isqrt_cov"])
def test_head_lr_mult_reaches_every_parameter_of_the_second_order_head(head):
    """With model.head=sot the SoT pooling's own parameters (proj.weight, v0) trained at the backbone's rate."""
    cfg = load_config(None, ["model.name=test_vit", "model.swap_pooling=true", f"model.head={head}",
                             "data.img_size=64"])
    model = build_model(cfg.model, 5, img_size=64)
    scale = {id(p): g["lr_scale"] for g in param_groups(model, 1e-4, 5.0) for p in g["params"]}
    for name, p in model.named_parameters():
        assert scale[id(p)] == (5.0 if name.startswith(("global_pool.", "fc.")) else 1.0), name
    if head == "sot":
        names = {n for n, _ in model.named_parameters()}
        assert {"global_pool.pool.proj.weight", "global_pool.pool.v0"} <= names


class _ScaledMean(nn.Module):
    """A user's pooling with a parameter of its own: each channel's mean over the positions, times a learned
    scale (maps ``(B, C, H, W)`` or tokens ``(B, N, C)``)."""

    def __init__(self, in_channels):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(in_channels))
        self.out_features = in_channels

    def forward(self, x):
        return (x.flatten(2).mean(-1) if x.dim() == 4 else x.mean(1)) * self.scale


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "torchvision:resnet18"])
def test_head_lr_mult_reaches_the_pooling_of_a_registered_head(name, monkeypatch):
    """A head added with covpool.register_head, named in a config: its pooling's parameters train at head_lr_mult
    times the rate, as the classifier's do (a list of covpool's own pooling classes left them at the backbone's
    rate), whichever route swap_pooling takes (timm's ResNet re-classed, another timm model wrapped, torchvision's
    avgpool)."""
    monkeypatch.setattr(heads, "_HEADS", dict(heads._HEADS))
    covpool.register_head("scaled_mean", _ScaledMean, paper="a user's head")
    cfg = load_config(None, [f"model.name={name}", "model.swap_pooling=true", "model.head=scaled_mean",
                             "data.img_size=32", "optim.lr=0.01", "optim.head_lr_mult=5"])
    check_config(cfg)
    model = build_model(cfg.model, 3, img_size=32)
    pool = "avgpool" if name.startswith("torchvision:") else "global_pool"
    assert type(model.get_submodule(pool)) is _ScaledMean
    lr = {id(p): g["lr"] for g in make_optimizer(model, cfg.optim).param_groups for p in g["params"]}
    for key, p in model.named_parameters():
        assert lr[id(p)] == pytest.approx(0.05 if key.startswith((f"{pool}.", "fc.")) else 0.01, rel=1e-12), key
    assert lr[id(model.get_submodule(pool).scale)] == pytest.approx(0.05, rel=1e-12)


def test_a_one_by_one_map_is_refused_for_centred_heads_only():
    """resnet18 at 32 px ends in a 1x1 map: the centred covariance of one position is 0 for every image."""
    base = ["model.name=resnet18", "model.swap_pooling=true", "data.img_size=32"]
    with pytest.raises(ConfigError, match="ends in a 1x1 feature map"):
        check_config(load_config(None, base))
    check_config(load_config(None, [*base, "model.head=bcnn"]))  # x xᵀ of one position still tells images apart
    check_config(load_config(None, [*base, "model.cifar_stem=true"]))  # 4x4


# -- 5. covpool predict, covpool.load_model and covpool eval, end to end ------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_predict_and_load_model_end_to_end(kind, tmp_path, capsys):
    """Train one step, then rebuild the model from its checkpoint alone and predict the validation images: the
    predictions are the trained model's, with the class names."""
    model_over, size = KINDS[kind]
    root = make_imagefolder(tmp_path / "data", classes=2, per_class=2)
    over = [f"output_dir={tmp_path}", "name=run", "epochs=1", "progress=false", "data.dataset=imagefolder",
            f"data.root={root}", f"data.img_size={size}", "data.batch_size=2", "data.workers=0",
            "max_steps_per_epoch=1", "max_val_steps=1", *model_over]
    result = engine.train(load_config("demo", over))
    last = tmp_path / "run" / "last.pt"

    model = covpool.load_model(last)
    assert not model.training and model.pretrained_cfg["label_names"] == ("class0", "class1")
    trained = result.model.eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(images), trained(images), rtol=1e-5, atol=1e-5)

    csv_path = tmp_path / "predictions.csv"
    assert main(["predict", "--checkpoint", str(last), str(root / "val"), str(root / "train" / "class1" / "0.jpg"),
                 "--top-k", "2", "--batch-size", "3", "--out", str(csv_path), "--device", "cpu"]) == 0
    rows = _rows(csv_path)
    assert [Path(r["image"]).name for r in rows] == ["0.jpg", "1.jpg", "0.jpg", "1.jpg", "0.jpg"]
    from covpool.train.data import image_transform
    from covpool.train.inference import model_config

    transform = image_transform(model_config(Checkpoint.read(last)).data, model)
    from PIL import Image

    with torch.no_grad():
        probs = model(torch.stack([transform(Image.open(r["image"]).convert("RGB")) for r in rows])).softmax(-1)
    for row, p in zip(rows, probs):
        best = int(p.argmax())
        assert row["class_1"] == f"class{best}" and {row["class_1"], row["class_2"]} == {"class0", "class1"}
        assert float(row["probability_1"]) == pytest.approx(float(p[best]), abs=1e-5)
        assert float(row["probability_1"]) + float(row["probability_2"]) == pytest.approx(1.0, abs=1e-5)
    out = capsys.readouterr().out
    assert f"wrote 5 predictions to {csv_path}" in out and str(root / "val" / "class0" / "0.jpg") + ": class" in out


def test_eval_writes_per_class_accuracy_confusion_and_predictions_for_a_test_split(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "data", classes=3, per_class=2)
    make_imagefolder(tmp_path / "t", classes=3, per_class=3)
    (tmp_path / "t" / "val").rename(root / "test")
    over = [f"output_dir={tmp_path}", "name=run", "epochs=1", "progress=false", "data.dataset=imagefolder",
            f"data.root={root}", "data.img_size=32", "data.batch_size=3", "data.workers=0", "model.name=test_resnet"]
    engine.train(load_config("demo", over))
    last = tmp_path / "run" / "last.pt"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(last), "--split", "test"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "run" / "eval_last_test"
    predictions = _rows(folder / "predictions.csv")
    assert len(predictions) == 9 and all(r["image"].startswith(str(root / "test")) for r in predictions)
    per_class, confusion = _rows(folder / "per_class.csv"), _rows(folder / "confusion.csv")
    for label, row in enumerate(per_class):
        mine = [r for r in predictions if int(r["label"]) == label]
        correct = sum(r["predicted"] == r["label"] for r in mine)
        assert (row["class"], int(row["images"]), int(row["correct"])) == (f"class{label}", len(mine), correct)
        assert float(row["accuracy"]) == pytest.approx(100.0 * correct / len(mine))
        assert [int(confusion[label][f"class{p}"]) for p in range(3)] == [
            sum(int(r["predicted"]) == p for r in mine) for p in range(3)]
    assert (folder / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    acc = 100.0 * sum(r["correct"] == "1" for r in predictions) / 9
    mean = sum(float(r["accuracy"]) for r in per_class) / 3
    assert "test loss" in out and f"top-1 {acc:.2f}%" in out and f"mean per-class {mean:.2f}%" in out
    assert main(["eval", "--checkpoint", str(last), "--split", "tset"]) == 2
    assert "has no 'tset' split; its splits: train, val, test" in one_error_line(capsys)
    assert main(["eval", "--checkpoint", str(last), "--out", str(folder / "confusion.png" / "x")]) == 2
    assert f"--out {folder / 'confusion.png' / 'x'}: cannot create that folder" in one_error_line(capsys)


def test_predict_mistakes_are_one_error_line(tmp_path, capsys):
    over = ["model.name=test_resnet", "data.img_size=32"]
    ckpt = tmp_path / "last.pt"
    _fake_checkpoint(ckpt, over, num_classes=8, class_names=[name for name, _ in EMBEDDED_CLASSES])
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    for argv, message in (([str(tmp_path / "nope.jpg")], "is neither an image file nor a folder"),
                          ([str(tmp_path / "empty")], "no image in"),
                          ([str(tmp_path / "bad.jpg")], f"cannot read {tmp_path / 'bad.jpg'}: cannot identify image"),
                          ([str(tmp_path), "--top-k", "0"], "--top-k must be at least 1"),
                          ([str(tmp_path), "--device", "cuda:7"] if torch.cuda.device_count() < 8 else [], "cuda"),
                          ([str(tmp_path), "--device", "tpu"], "--device 'tpu' is not a device"),
                          ([str(tmp_path), "--device", "meta"], "--device meta: covpool predict runs on cpu or cuda"),
                          ([str(tmp_path), "--out", str(tmp_path / "bad.jpg" / "p.csv")],
                           f"--out {tmp_path / 'bad.jpg'}: cannot create that folder")):
        if not argv:
            continue
        assert main(["predict", "--checkpoint", str(ckpt), *argv]) == 2, argv
        assert message in one_error_line(capsys)
    assert main(["predict", "--checkpoint", str(tmp_path / "missing.pt"), str(tmp_path)]) == 2
    assert "not found" in one_error_line(capsys)


def test_load_model_is_offered_at_top_level_without_importing_the_training_tools():
    """covpool.load_model is covpool.train's, loaded on first use: `import covpool` imports nothing of the
    application (tests/test_api.py's import graph), and `from covpool import *` does not load it."""
    from covpool.train import inference

    assert covpool.load_model is inference.load_model and "load_model" in dir(covpool)
    assert "load_model" not in covpool.__all__
    with pytest.raises(AttributeError, match="no attribute 'load_modle'"):
        covpool.load_modle  # noqa: B018
