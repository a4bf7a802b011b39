"""covpool.train.data, embedded and the model builder: data sets, their errors, and every shipped config's model and
data pipeline."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _train_helpers import REPO, make_cub, make_imagefolder, tiny_overrides

import covpool
from covpool.cli import train_main
from covpool.train import engine
from covpool.train._model import build_model, param_groups
from covpool.train.config import ConfigError, load_config
from covpool.train.config_checks import check_config
from covpool.train.data import DatasetNotFoundError, build_datasets, build_loaders, dataset_names, num_classes_of
from covpool.train.embedded import EMBEDDED_CLASSES, EmbeddedTextures, _patch_boxes

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second OpenMP thread only slows them down


CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_embedded_is_deterministic_and_seeded():
    a = EmbeddedTextures("train", img_size=16, per_class=4, seed=3)
    b = EmbeddedTextures("train", img_size=16, per_class=4, seed=3)
    c = EmbeddedTextures("train", img_size=16, per_class=4, seed=4)
    assert len(a) == 4 * len(EMBEDDED_CLASSES) and a.images.shape == (32, 3, 16, 16)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    image, label = a[5]
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0 and label == 1
    # grey by default: the three channels are equal, so colour cannot give a class away
    assert torch.equal(a.images[:, 0], a.images[:, 1])


@pytest.mark.parametrize("h,w", [(512, 512), (300, 451), (1000, 400)])
def test_embedded_train_and_val_regions_are_disjoint(h, w):
    import numpy as np

    rng = np.random.default_rng(0)
    long = max(h, w)
    axis = 1 if w >= h else 0  # boxes are (top, left, side, side)
    train = _patch_boxes(h, w, 500, True, rng)
    val = _patch_boxes(h, w, 500, False, rng)
    assert (train[:, axis] + train[:, 2]).max() <= int(0.70 * long) < int(0.75 * long) <= val[:, axis].min()
    assert (val[:, axis] + val[:, 2]).max() <= long
    assert (train[:, 1 - axis] >= 0).all() and (train[:, 1 - axis] + train[:, 2] <= min(h, w)).all()


@pytest.mark.parametrize("name", [n for n in dataset_names() if n != "embedded"])
def test_missing_root_error_names_the_layout(name, tmp_path):
    cfg = load_config(None, [f"data.dataset={name}", f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(DatasetNotFoundError) as err:
        build_datasets(cfg.data)
    msg = str(err.value)
    assert name in msg and "Expected layout" in msg and "nowhere" in msg
    unset = load_config(None, [f"data.dataset={name}"])
    with pytest.raises(DatasetNotFoundError, match="data.root is not set"):
        num_classes_of(unset.data)


@pytest.mark.parametrize("name,expect", [("stanford_cars", "stanford_cars"), ("fgvc_aircraft", "fgvc-aircraft"),
                                         ("flowers102", "flowers-102"), ("oxford_pet", "oxford-iiit-pet"),
                                         ("cifar10", "cifar-10-batches-py")])
def test_empty_root_torchvision_error_is_rewritten(name, expect, tmp_path):
    cfg = load_config(None, [f"data.dataset={name}", f"data.root={tmp_path}"])
    with pytest.raises(DatasetNotFoundError, match=expect):
        build_datasets(cfg.data)


def test_missing_root_on_the_command_line_exits_2(tmp_path, capsys):
    rc = train_main(["--config", str(REPO / "configs" / "cub200_resnet50_isqrt.yaml"), f"data.root={tmp_path / 'x'}",
                     f"output_dir={tmp_path}", "model.pretrained=false"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "image_class_labels.txt" in err and "train_test_split.txt" in err


def test_cub_native_layout_is_read(tmp_path):
    make_cub(tmp_path, classes=3, per_class=4)
    cfg = load_config(None, ["data.dataset=cub200", f"data.root={tmp_path}", "data.img_size=16"])
    train_set, val_set = build_datasets(cfg.data)
    assert len(train_set) == 6 and len(val_set) == 6
    assert sorted(set(train_set.targets)) == [0, 1, 2]
    image, label = train_set[0]
    assert image.shape == (3, 16, 16) and label == 0


def _prepare(path: Path, tmp_path: Path) -> tuple[list[str], bool]:
    """Overrides that make ``path`` buildable here, and whether its data set can be faked locally."""
    data = yaml.safe_load(path.read_text())
    dataset = data["data"]["dataset"]
    over = ["model.pretrained=false", "data.workers=0", "data.batch_size=2", f"output_dir={tmp_path}"]
    if dataset != "embedded":
        over.append("data.img_size=64")
    if dataset == "imagefolder":
        make_imagefolder(tmp_path / "data", classes=3, per_class=2)
        return [*over, f"data.root={tmp_path / 'data'}"], True
    if dataset == "cub200":
        make_cub(tmp_path / "data", classes=3, per_class=2)
        return [*over, f"data.root={tmp_path / 'data'}"], True
    return over, dataset == "embedded"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_model_and_data(path, tmp_path):
    over, local = _prepare(path, tmp_path)
    cfg = load_config(path, over)
    if not local:  # torchvision data sets: no data here, so the error must say what to provide
        with pytest.raises(DatasetNotFoundError, match="Expected layout"):
            num_classes_of(cfg.data)
        num_classes = {"stanford_cars": 196, "fgvc_aircraft": 100, "cifar10": 10}[cfg.data.dataset]
    else:
        num_classes = num_classes_of(cfg.data)
    if cfg.data.dataset == "cub200":
        assert num_classes == 200  # CUB's label space, whatever subset the folder holds
    size = cfg.data.img_size
    model = build_model(cfg.model, num_classes, img_size=size)  # a transformer takes data.img_size as its own
    if local:
        train_set, val_set = build_datasets(cfg.data, model, seed=0)
        train_loader, val_loader = build_loaders(cfg.data, train_set, val_set, seed=0)
        images, labels = next(iter(train_loader))
        assert images.shape == (2, 3, size, size) and labels.shape == (2,)
    else:
        images = torch.randn(2, 3, size, size)
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, num_classes)

    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.head_lr_mult)
    scales = {g["lr_scale"] for g in groups}
    assert scales == ({1.0, cfg.optim.head_lr_mult} if cfg.optim.head_lr_mult != 1.0 else {1.0})
    if cfg.model.name.endswith("_isqrt"):
        assert cfg.optim.head_lr_mult == 5.0 and cfg.data.batch_size == 2 and cfg.optim.lr == pytest.approx(1.2e-3)
        head = {id(p) for g in groups if g["lr_scale"] == 5.0 for p in g["params"]}
        assert id(model.fc.weight) in head
        assert any(id(p) in head for p in model.global_pool.parameters())  # the covariance reduction conv
        assert id(model.conv1.weight) not in head
    if cfg.model.zca == "all":
        zca = [m for m in model.modules() if isinstance(m, covpool.ZCABatchNorm2d)]
        assert len(zca) == 20 and not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
        assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)


def test_pretrained_from_a_local_file(tmp_path):
    import timm

    source = timm.create_model("test_resnet")  # ImageNet's 1000 classes
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    cfg = load_config(None, ["model.name=test_resnet", f"model.pretrained={tmp_path / 'weights.pth'}"])
    model = build_model(cfg.model, 8)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)  # backbone loaded
    assert model.fc.weight.shape == (8, 96)  # classifier re-sized, not loaded
    missing = load_config(None, ["model.name=test_resnet", f"model.pretrained={tmp_path / 'nope.pth'}"])
    with pytest.raises(FileNotFoundError, match="is not a file"):
        build_model(missing.model, 8)
    with pytest.raises(ConfigError, match="not a timm model"):
        check_config(load_config(None, ["model.name=resnet_nonexistent"]))


def test_own_checkpoint_as_pretrained_keeps_its_classifier_when_it_fits(tmp_path):
    import timm

    from covpool.models._common import keep_fitting_classifier

    engine.train(load_config(None, tiny_overrides(tmp_path, max_steps_per_epoch=1)))
    path = tmp_path / "tiny" / "last.pt"
    trained = torch.load(path, weights_only=True)["state_dict"]
    cfg = load_config(None, ["model.name=test_resnet", f"model.pretrained={path}"])
    model = build_model(cfg.model, 8)  # the run's 8 classes: every weight, the classifier included
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    other = build_model(cfg.model, 5)  # another label space: backbone loaded, classifier fresh
    assert other.fc.weight.shape == (5, 96) and torch.equal(other.conv1[0].weight, trained["conv1.0.weight"])
    # the same for a covpool model built by timm directly, with its two classifiers
    so_vit = timm.create_model("so_vit_7", num_classes=5)
    torch.save({"state_dict": so_vit.state_dict()}, tmp_path / "so_vit.pt")
    kwargs = keep_fitting_classifier("so_vit_7", dict(num_classes=5, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "so_vit.pt"))))
    loaded = timm.create_model("so_vit_7", pretrained=True, **kwargs)
    assert all(torch.equal(v, so_vit.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert keep_fitting_classifier("so_vit_7", dict(num_classes=7, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "so_vit.pt"))))["pretrained_cfg_overlay"].get("num_classes") is None
