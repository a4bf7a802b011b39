"""covpool.train: configs, data, the training loop, checkpoints, resume, torchrun, the demo."""
from __future__ import annotations

import csv
import io
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _train_helpers import REPO, make_cub, make_imagefolder, tiny_overrides

import covpool
from covpool.cli import eval_main, train_main
from covpool.demo import demo_config, run_demo
from covpool.train import checkpoint as ckpt_mod
from covpool.train import engine
from covpool.train._model import build_model, param_groups
from covpool.train.config import ConfigError, config_to_dict, load_config
from covpool.train.data import DatasetNotFoundError, build_datasets, build_loaders, dataset_names, num_classes_of
from covpool.train.embedded import EMBEDDED_CLASSES, EmbeddedTextures, _patch_boxes

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine a second spinning
    OpenMP thread slows every step down instead of speeding it up."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- config ------------------------------------------------------------------------------------------------
def test_unknown_override_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.lrr=0.1"])
    msg = str(err.value)
    assert "'optim.lrr'" in msg and "did you mean 'optim.lr'" in msg
    assert "optim.weight_decay" in msg and "optim.head_lr_mult" in msg


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nmodel:\n  nmae: resnet18\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.nmae' in .*bad.yaml.*model\.name"):
        load_config(path)


def test_unknown_key_on_the_command_line_exits_2(tmp_path, capsys):
    assert train_main(["--config", str(REPO / "configs" / "demo.yaml"), "data.imgsize=32"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'data.imgsize'" in err and "data.img_size" in err


def test_override_values_are_yaml_scalars_with_types_checked():
    cfg = load_config(None, ["optim.lr=1e-4", "epochs=3", "model.pretrained=/w.pth", "data.scale=[0.5, 1.0]",
                             "model.covpool.reduced_dim=64", "clip_grad=null"])
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.epochs == 3 and cfg.model.pretrained == "/w.pth" and cfg.data.scale == [0.5, 1.0]
    assert cfg.model.covpool == {"reduced_dim": 64} and cfg.clip_grad is None
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        load_config(None, ["epochs=two"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["epochs"])


def test_demo_yaml_is_the_demo_average_pooling_run():
    assert config_to_dict(load_config(REPO / "configs" / "demo.yaml")) == config_to_dict(demo_config("avgpool"))
    cov = demo_config("covpool")
    assert cov.model.swap_pooling and cov.model.covpool == {"reduced_dim": 64, "backend": "ns", "last_stride": 1}


# -- embedded data -------------------------------------------------------------------------------------------
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


# -- data sets and their errors --------------------------------------------------------------------------------
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


# -- every shipped config builds its model and data pipeline ------------------------------------------------
def _prepare(path: Path, tmp_path: Path) -> tuple[list[str], bool]:
    """Overrides that make ``path`` buildable here, and whether its data set can be faked locally."""
    data = yaml.safe_load(path.read_text())
    dataset = data["data"]["dataset"]
    over = ["model.pretrained=false", "data.workers=0", "data.batch_size=2", f"output_dir={tmp_path}"]
    if dataset != "embedded":
        over.append("data.img_size=64")
    if data["model"]["name"].startswith("so_vit"):
        over.append("model.kwargs.img_size=64")
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
    model = build_model(cfg.model, num_classes)
    size = cfg.data.img_size
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


# -- training, evaluation, outputs -------------------------------------------------------------------------------
def test_two_step_training_then_eval(tmp_path, capsys):
    over = tiny_overrides(tmp_path, max_steps_per_epoch=2)
    assert train_main(["--config", str(REPO / "configs" / "demo.yaml"), *over]) == 0
    run = tmp_path / "tiny"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "curves.png", "last.pt",
                                                     "metrics.csv"]
    rows = _rows(run / "metrics.csv")
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    loss = float(rows[0]["train_loss"])
    assert math.isfinite(loss) and 0.5 < loss < 5.0  # ~ln(8) at the start on 8 classes
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["global_step"] == 2 and state["epoch"] == 1 and state["step_in_epoch"] == 0
    assert state["config"]["model"]["name"] == "test_resnet" and isinstance(state["rng"][0]["torch"], torch.Tensor)
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "val acc" in out and "best val acc" in out

    assert eval_main(["--checkpoint", str(run / "last.pt")]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("top-1 ")[1].split("%")[0])
    assert acc == pytest.approx(float(rows[0]["val_acc1"]), abs=0.01)
    assert "(16 images)" in out


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, max_steps_per_epoch=1))
    engine.train(cfg)
    with pytest.raises(engine.RunExistsError, match="--resume"):
        engine.train(cfg)
    assert engine.train(cfg, overwrite=True).final["epoch"] == 1


def test_amp_ema_mixup_clip_and_workers(tmp_path):
    over = tiny_overrides(tmp_path, epochs=2, amp="bf16", ema="true", ema_decay=0.5, mixup=0.8, cutmix=1.0,
                          label_smoothing=0.1, clip_grad=1.0, data__workers=1, model__swap_pooling="true",
                          model__covpool__reduced_dim=16)
    result = engine.train(load_config(None, over))
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["ema_val_acc1"]) for r in result.history)
    ema = engine.evaluate(tmp_path / "tiny" / "last.pt", use_ema=True)
    assert ema["count"] == 16 and ema["acc1"] == pytest.approx(result.history[-1]["ema_val_acc1"])
    # timm reads the checkpoint as it reads its own: the EMA weights with use_ema=True, the model's without
    import timm

    state = torch.load(tmp_path / "tiny" / "last.pt", weights_only=True)
    assert state["arch"] == "test_resnet" and state["args"]["ema"] is True
    model = build_model(result.model and load_config(None, over).model, 8)
    for use_ema, key in ((True, "state_dict_ema"), (False, "state_dict")):
        timm.models.load_checkpoint(model, str(tmp_path / "tiny" / "last.pt"), use_ema=use_ema)
        assert all(torch.equal(v, state[key][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(state["state_dict"][k], v) for k, v in state["state_dict_ema"].items())
    with pytest.raises(ConfigError, match="amp=fp16 needs CUDA"):
        engine.train(load_config(None, tiny_overrides(tmp_path, "fp16", amp="fp16", device="cpu")))


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
        build_model(load_config(None, ["model.name=resnet_nonexistent"]).model, 8)


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


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["state_dict"]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc1", "lr")
    ra, rb = _rows(a / "metrics.csv"), _rows(b / "metrics.csv")
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]


def test_resume_after_an_epoch_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch, then --resume for the second (weights and metrics identical)."""
    extra = dict(epochs=2)
    straight = load_config(None, tiny_overrides(tmp_path, "straight", **extra))
    engine.train(straight)

    saved = []
    real_save = engine.atomic_save

    def keep_first_epoch(state, path):
        if Path(path).name == "last.pt" and state["epoch"] == 1:
            saved.append(real_save(state, tmp_path / "after_epoch_1.pt"))
        return real_save(state, path)

    monkeypatch.setattr(engine, "atomic_save", keep_first_epoch)
    engine.train(load_config(None, tiny_overrides(tmp_path, "scratch", **extra)))
    monkeypatch.setattr(engine, "atomic_save", real_save)
    assert saved, "no checkpoint after epoch 1"
    # resume from the epoch-1 checkpoint through the command line, taking the config from the checkpoint
    rc = train_main(["--resume", str(saved[0]), "name=resumed", f"output_dir={tmp_path}"])
    assert rc == 0
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.parametrize("signame,code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGUSR1", 128 + 10)])
def test_stop_signal_saves_mid_epoch_and_resume_matches(tmp_path, monkeypatch, signame, code):
    """Ctrl-C, SIGTERM or SIGUSR1 at global step 4 (epoch 2, step 1): saved and stopped; resuming gives the
    uninterrupted run."""
    signum = getattr(signal, signame)
    extra = dict(epochs=2, optim__head_lr_mult=3.0, model__swap_pooling="true", model__covpool__reduced_dim=16)
    engine.train(load_config(None, tiny_overrides(tmp_path, "straight", **extra)))

    real_step = engine._Trainer._train_step

    def step_then_interrupt(self, images, target, stop):
        if self.global_step == 3:
            signal.raise_signal(signum)  # what Ctrl-C / torchrun / SLURM do; the handler only sets a flag
        return real_step(self, images, target, stop)

    cfg = load_config(None, tiny_overrides(tmp_path, "interrupted", **extra))
    # Whatever SIGINT did before (a background job or nohup starts with it ignored) must be restored.
    handlers_before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.setattr(engine._Trainer, "_train_step", step_then_interrupt)
    result = engine.train(cfg)
    monkeypatch.setattr(engine._Trainer, "_train_step", real_step)
    assert result.interrupted and len(result.history) == 1
    assert result.stop_signal == signum and result.exit_code == code
    state = torch.load(tmp_path / "interrupted" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 4)
    assert {s: signal.getsignal(s) for s in handlers_before} == handlers_before

    resumed = engine.train(cfg, resume=True)
    assert not resumed.interrupted and [r["epoch"] for r in resumed.history] == [1, 2]
    _assert_same_run(tmp_path / "straight", tmp_path / "interrupted")


class _NaNAfter(torch.nn.Module):
    """Wraps a model; its ``calls``-th training forward returns NaN logits."""

    def __init__(self, inner: torch.nn.Module, calls: int) -> None:
        super().__init__()
        self.inner, self.calls, self.seen = inner, calls, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.seen += 1
            if self.seen == self.calls:
                out = out * float("nan")
        return out


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good(tmp_path, monkeypatch, capsys):
    real_build = engine.build_model
    monkeypatch.setattr(engine, "build_model", lambda cfg, n: _NaNAfter(real_build(cfg, n), calls=4))
    over = tiny_overrides(tmp_path, epochs=3)
    rc = train_main(["--config", str(REPO / "configs" / "demo.yaml"), *over])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at epoch 2, step 1 of 3 (global step 4)" in err
    assert str(tmp_path / "tiny" / "last.pt") in err
    state = torch.load(tmp_path / "tiny" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert len(_rows(tmp_path / "tiny" / "metrics.csv")) == 1


class _InfInputAfter(_NaNAfter):
    """Its ``calls``-th training forward feeds the model infinite pixels (a diverged network's activations)."""

    def forward(self, x):
        if self.training:
            self.seen += 1
            if self.seen == self.calls:
                x = x * float("inf")
        return self.inner(x)


@pytest.mark.parametrize("backend", ["eig", "svd_pade", "ns", "mpa_lya"])
def test_non_finite_features_stop_the_same_way_whatever_the_backend(tmp_path, monkeypatch, backend):
    """eigh/SVD raise LinAlgError on NaN input where the products-only backends return NaN: the run stops
    with the same NonFiniteLossError, naming the step, in both cases."""
    real_build = engine.build_model
    monkeypatch.setattr(engine, "build_model", lambda cfg, n: _InfInputAfter(real_build(cfg, n), calls=2))
    over = tiny_overrides(tmp_path, model__swap_pooling="true", model__covpool__reduced_dim=8,
                          model__covpool__backend=backend)
    with pytest.raises(engine.NonFiniteLossError, match=r"^non-finite .* at epoch 1, step 2 of 3 \(global step 2\)"):
        engine.train(load_config(None, over))


def test_non_finite_loss_before_any_checkpoint(tmp_path, monkeypatch):
    real_build = engine.build_model
    monkeypatch.setattr(engine, "build_model", lambda cfg, n: _NaNAfter(real_build(cfg, n), calls=2))
    with pytest.raises(engine.NonFiniteLossError, match=r"epoch 1, step 2 of 3 .*No checkpoint was written yet"):
        engine.train(load_config(None, tiny_overrides(tmp_path)))
    assert not (tmp_path / "tiny" / "last.pt").exists()


# -- checkpoints -----------------------------------------------------------------------------------------------
def test_atomic_save_leaves_old_file_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_mod.atomic_save({"w": torch.ones(3)}, path)
    assert os.listdir(tmp_path) == ["last.pt"]

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_mod.atomic_save({"w": torch.zeros(3)}, path)
    assert os.listdir(tmp_path) == ["last.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))


def test_full_disk_names_the_file_and_the_cause(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "last.pt"
    ckpt_mod.atomic_save({"w": torch.ones(3)}, path)

    def full_disk(obj, f):  # what torch.save does on ENOSPC: the OSError, then a RuntimeError on cleanup
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            # as torch.save does: the real cause only as the implicit context
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"could not write {path}: No space left on device; the previous file is "
                                      "untouched") as err:
        ckpt_mod.atomic_save({"w": torch.zeros(3)}, path)
    assert err.value.errno == errno.ENOSPC and os.listdir(tmp_path) == ["last.pt"]


def _history_rows():
    return [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.5, "train_acc": 50.0, "val_acc1": 40.0, "lr": 0.1}]


def _bench_rows():
    return [{"variant": v, "d": 8, "batch": 2, "device": "cpu", "root": "sqrt", "fwd+bwd ms": 1.0 + i,
             "fwd+bwd prod-eq": 3.0 + i, "fwd err well-conditioned": 1e-3, "fwd err ill-conditioned": 1e-2}
            for i, v in enumerate(("ns", "eig"))]


@pytest.mark.parametrize("writer", ["checkpoint", "metrics.csv", "curves.png", "bench.csv", "bench.png"])
def test_every_output_is_written_one_atomic_way(tmp_path, monkeypatch, writer):
    """The four writers (checkpoints, metrics.csv, plots, the benchmark's files) share one atomic write: a
    full disk at the fsync leaves the old file whole, no temporary file, and one message naming the file."""
    import errno

    from covpool import bench
    from covpool.train import _io
    from covpool.train._plot import plot_history

    write = {"checkpoint": lambda p: ckpt_mod.atomic_save({"w": torch.ones(3)}, p),
             "metrics.csv": lambda p: engine._write_csv(_history_rows(), p),
             "curves.png": lambda p: plot_history(_history_rows(), p),
             "bench.csv": lambda p: bench.write_csv(_bench_rows(), p),
             "bench.png": lambda p: bench.plot(_bench_rows(), p)}[writer]
    path = tmp_path / "sub" / writer  # the folder is created
    write(path)
    before = path.read_bytes()
    assert len(before) > 20 and os.listdir(path.parent) == [writer]

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io.os, "fsync", full_disk)
    with pytest.raises(OSError, match=rf"could not write {path}: No space left on device; the previous file is "
                                      "untouched") as err:
        write(path)
    assert err.value.errno == errno.ENOSPC
    assert os.listdir(path.parent) == [writer] and path.read_bytes() == before


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    ckpt_mod.atomic_save({"rng": ckpt_mod.rng_state()}, tmp_path / "r.pt")
    first = (random.random(), float(np.random.rand()), torch.rand(2))
    ckpt_mod.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    again = (random.random(), float(np.random.rand()), torch.rand(2))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


# -- scale out -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    over = tiny_overrides(tmp_path, "ddp", epochs=2, model__zca="stem", model__zca_options__group_size=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "covpool",
         "train", "--config", str(REPO / "configs" / "demo.yaml"), *over],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "curves.png", "last.pt",
                                                     "metrics.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # nothing else written anywhere
    # only rank 0 prints: one summary line per epoch, one final table
    assert proc.stdout.count("epoch 1/2  train loss") == 1 and proc.stdout.count("epoch 2/2  train loss") == 1
    assert proc.stdout.count("best val acc") == 1
    state = torch.load(run / "last.pt", weights_only=True)
    # 24 images, 2 processes x batch 8 -> 1 step per epoch; both processes' RNG states are kept
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["global_step"] == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert state["state_dict"]["conv1.1.running_cov"].shape == (2, 8, 8)  # the stem's ZCA layer, 2 groups of 8
    assert len(_rows(run / "metrics.csv")) == 2


@pytest.mark.slow  # ~10 s: two processes import torch and timm
def test_torchrun_grad_accumulation_makes_the_single_process_big_batch(tmp_path):
    """2 processes x batch 4 x grad_accum_steps 2 take the step of one process with batch 16 (test_vit: no
    BatchNorm; scale [1, 1] and no flips make the augmentation the identity, so the processes' different
    augmentation draws do not matter)."""
    same = dict(model__name="test_vit", model__kwargs="{img_size: 32}", data__embedded_train_per_class=2,
                data__scale="[1.0, 1.0]", data__hflip=0.0, optim__opt="momentum", optim__momentum=0.0,
                optim__weight_decay=0.0, optim__sched="constant", optim__lr=0.5, max_val_steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    over = tiny_overrides(tmp_path, "ddp", **same, data__batch_size=4, grad_accum_steps=2)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "covpool", "train", "--config", "demo", *over], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    engine.train(load_config("demo", tiny_overrides(tmp_path, "one", **same, data__batch_size=16)))
    engine.train(load_config("demo", tiny_overrides(tmp_path, "init", **{**same, "optim__lr": 0.0},
                                                    data__batch_size=16)))
    weights = {name: {k: v.double() for k, v in torch.load(tmp_path / name / "last.pt", weights_only=True)
                      ["state_dict"].items()} for name in ("ddp", "one", "init")}
    assert torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["global_step"] == 1
    step = _update(weights["one"], weights["init"])
    assert _rel(_update(weights["ddp"], weights["init"]), step) < 1e-4


# -- the demo --------------------------------------------------------------------------------------------------
def test_run_demo_tiny(tmp_path, capsys):
    rc = run_demo(str(tmp_path), ["progress=false", "epochs=1", "model.name=test_resnet",
                                  "data.img_size=32", "data.batch_size=8",
                                  "data.embedded_train_per_class=2", "data.embedded_val_per_class=1"])
    assert rc == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "val acc" in line and " s" in line and "best" in line]
    assert [line.split()[0] for line in lines] == ["avgpool", "covpool"]
    for line in lines:
        assert 0.0 <= float(line.split("val acc")[1].split("%")[0]) <= 100.0
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    assert _rows(tmp_path / "avgpool" / "metrics.csv")[0]["epoch"] == "1"
    state = torch.load(tmp_path / "covpool" / "last.pt", weights_only=True)
    assert any(k.startswith("global_pool.") for k in state["state_dict"])  # covariance pooling really in place


# -- guarantees after a kill at any moment ---------------------------------------------------------------------
class _Killed(BaseException):
    """Stands for SIGKILL in fault-injection tests: nothing after it runs, no handler sees it."""


def _checkpoint_invariants(run: Path) -> None:
    """What must hold after any kill: last.pt's record of the best epoch is never newer than best.pt."""
    if not (run / "last.pt").exists():
        return
    last = torch.load(run / "last.pt", weights_only=True)
    if last["best_epoch"] > 0:
        best = torch.load(run / "best.pt", weights_only=True)
        assert best["epoch"] >= last["best_epoch"]
        if best["epoch"] == last["best_epoch"]:
            assert best["best_acc1"] == last["best_acc1"]


@pytest.fixture
def straight_run(tmp_path):
    """A 3-epoch run without faults (with a best.pt that is not the last epoch's on this seed)."""
    cfg = load_config(None, tiny_overrides(tmp_path, "straight", epochs=3, optim__lr=0.2))
    result = engine.train(cfg)
    return tmp_path / "straight", result


def test_kill_before_any_save_call_then_resume_gives_the_straight_run(tmp_path, monkeypatch, straight_run):
    """Kill at the k-th checkpoint write (every k), check the files, resume: best.pt, last.pt, metrics.csv
    and the summary equal those of the uninterrupted run."""
    straight, expect = straight_run
    accs = [r["val_acc1"] for r in expect.history]
    bests = sum(1 for i, a in enumerate(accs) if a > max(accs[:i], default=-1.0))
    assert 1 < bests < len(accs)  # best.pt is written more than once and is not the last epoch
    real_save = engine.atomic_save
    for k in range(1, len(accs) + bests + 1):  # before each write of the run
        count = [0]

        def killing_save(state, path, k=k):
            count[0] += 1
            if count[0] == k:
                raise _Killed
            return real_save(state, path)

        cfg = load_config(None, tiny_overrides(tmp_path, f"kill{k}", epochs=3, optim__lr=0.2))
        monkeypatch.setattr(engine, "atomic_save", killing_save)
        try:
            engine.train(cfg)
        except _Killed:
            pass
        monkeypatch.setattr(engine, "atomic_save", real_save)
        run = tmp_path / f"kill{k}"
        _checkpoint_invariants(run)
        result = engine.train(cfg, resume=True) if (run / "last.pt").exists() else engine.train(cfg, overwrite=True)
        assert (result.best_epoch, result.best_acc1) == (expect.best_epoch, expect.best_acc1)
        for name in ("last.pt", "best.pt"):
            a = torch.load(straight / name, weights_only=True)
            b = torch.load(run / name, weights_only=True)
            assert a["epoch"] == b["epoch"] and a["checksum"] == b["checksum"], (k, name)
        assert _same_metrics(run, straight), k


def _same_metrics(a: Path, b: Path) -> bool:
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc1", "lr")
    return [[r[k] for k in keys] for r in _rows(a / "metrics.csv")] == [[r[k] for k in keys]
                                                                      for r in _rows(b / "metrics.csv")]


def test_metrics_csv_short_after_a_kill_is_rewritten_on_resume(tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides(tmp_path, epochs=2, max_steps_per_epoch=1))
    real_write = engine._write_csv

    def kill_at_last_epoch(history, path):
        if len(history) == 2:
            raise _Killed  # after last.pt of the final epoch, before its metrics row
        return real_write(history, path)

    monkeypatch.setattr(engine, "_write_csv", kill_at_last_epoch)
    with pytest.raises(_Killed):
        engine.train(cfg)
    monkeypatch.setattr(engine, "_write_csv", real_write)
    run = tmp_path / "tiny"
    assert len(_rows(run / "metrics.csv")) == 1 and torch.load(run / "last.pt", weights_only=True)["epoch"] == 2
    result = engine.train(cfg, resume=True)  # nothing left to train: only the outputs are brought up to date
    assert len(result.history) == 2 and [r["epoch"] for r in _rows(run / "metrics.csv")] == ["1", "2"]


def test_stale_temp_files_are_removed_and_only_covpools(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, max_steps_per_epoch=1))
    run = tmp_path / "tiny"
    run.mkdir()
    stale = [".last.pt.k3j_x9.tmp", ".best.pt.a1b2c3.tmp", ".metrics.csv.tmp", ".curves.png.zz12.png"]
    kept = [".notes.tmp", "last.pt.tmp", ".other.pt.x.tmp", "mine.png"]
    for name in stale + kept:
        (run / name).write_bytes(b"x" * 10)
    engine.train(cfg)
    left = sorted(p.name for p in run.iterdir())
    assert not set(stale) & set(left) and set(kept) <= set(left)


# -- corrupt and foreign checkpoints ------------------------------------------------------------------------
def test_corrupt_or_foreign_checkpoints_name_the_file_and_the_problem(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, max_steps_per_epoch=1))
    engine.train(cfg)
    good = tmp_path / "tiny" / "last.pt"
    state = torch.load(good, weights_only=True)
    cases = {"empty.pt": (b"", r"is empty \(0 bytes\)"),
             "text.pt": (b"epoch 3, not a checkpoint\n" * 4, "is not a readable PyTorch file"),
             "truncated.pt": (good.read_bytes()[: good.stat().st_size // 2], "is not a readable PyTorch file")}
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save(state["state_dict"], tmp_path / "plain.pt")
    cases["plain.pt"] = (None, r"is a plain state_dict \(\d+ tensors.*model.pretrained=")
    torch.save({"epoch": 3, "net": state["state_dict"]}, tmp_path / "foreign.pt")
    cases["foreign.pt"] = (None, r"lacks covpool's keys state_dict, config \(it has 'epoch', 'net'\)")
    tampered = dict(state, state_dict={k: v.clone() for k, v in state["state_dict"].items()})
    tampered["state_dict"]["fc.weight"][0, 0] += 1e-3
    torch.save(tampered, tmp_path / "tampered.pt")
    cases["tampered.pt"] = (None, r"damaged: its 'state_dict' weights do not match the checksum")
    for name, (_, match) in cases.items():
        with pytest.raises(ckpt_mod.CheckpointError, match=match) as err:
            ckpt_mod.load_checkpoint(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
        if name != "plain.pt":
            assert "best.pt" in str(err.value) and "--resume-from" in str(err.value)
    # a flipped bit in the stored weights: torch reads the file happily, the checksum does not match
    raw = bytearray(good.read_bytes())
    weight = state["state_dict"]["fc.weight"].numpy().tobytes()
    at = bytes(raw).find(weight[:64])
    assert at > 0
    raw[at + 5] ^= 0x10
    (tmp_path / "bitrot.pt").write_bytes(bytes(raw))
    with pytest.raises(ckpt_mod.CheckpointError, match=r"bitrot.pt.* is damaged: .* do not match the checksum"):
        ckpt_mod.load_checkpoint(tmp_path / "bitrot.pt")
    # resuming from or evaluating a damaged file stops with the same message
    good.write_bytes(b"")
    with pytest.raises(ckpt_mod.CheckpointError, match="is empty"):
        engine.train(cfg, resume=True)
    assert eval_main(["--checkpoint", str(tmp_path / "text.pt")]) == 2


def test_checkpoints_of_covpool_0_1_still_load(tmp_path):
    w = {"fc.weight": torch.ones(2, 3)}
    torch.save({"model": w, "ema": None, "config": {"epochs": 1}}, tmp_path / "old.pt")
    ckpt = ckpt_mod.load_checkpoint(tmp_path / "old.pt")
    assert torch.equal(ckpt["state_dict"]["fc.weight"], w["fc.weight"]) and ckpt["state_dict_ema"] is None


def test_first_ctrl_c_during_set_up_stops_cleanly_and_second_aborts_truthfully(tmp_path, monkeypatch):
    real_build = engine.build_datasets
    presses = [1]

    def build_with_ctrl_c(*args, **kwargs):
        for _ in range(presses[0]):
            signal.raise_signal(signal.SIGINT)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(engine, "build_datasets", build_with_ctrl_c)
    cfg = load_config(None, tiny_overrides(tmp_path, max_steps_per_epoch=1))
    result = engine.train(cfg)  # one Ctrl-C while setting up: nothing trained, nothing written, no abort
    assert result.interrupted and result.exit_code == 130 and result.history == []
    assert not (tmp_path / "tiny" / "last.pt").exists()
    presses[0] = 2
    with pytest.raises(engine.TrainingAborted, match="during set-up; no checkpoint was written") as err:
        engine.train(cfg)
    assert "last.pt" not in str(err.value)

    monkeypatch.setattr(engine, "build_datasets", real_build)
    engine.train(cfg, overwrite=True)
    presses[0] = 2
    monkeypatch.setattr(engine, "build_datasets", build_with_ctrl_c)
    with pytest.raises(engine.TrainingAborted, match=r"last.pt holds epoch 1, step 0 \(global step 1\)"):
        engine.train(cfg, resume=True)


# -- resuming with a changed config ----------------------------------------------------------------------------
def test_resume_with_more_epochs_and_a_lower_lr_rebuilds_the_schedule(tmp_path, capsys):
    """epochs=1 then --resume with epochs=3 optim.lr=0.02: epochs 2-3 run on the schedule of a fresh 3-epoch
    run at lr 0.02 (not at lr 0 where the 1-epoch cosine ended), and the log says so."""
    fresh = engine.train(load_config(None, tiny_overrides(tmp_path, "fresh", epochs=3, optim__lr=0.02)))
    engine.train(load_config(None, tiny_overrides(tmp_path, epochs=1)))
    assert torch.load(tmp_path / "tiny" / "last.pt", weights_only=True)["history"][0]["lr"] == 0.0
    capsys.readouterr()
    resumed = engine.train(load_config(None, tiny_overrides(tmp_path, epochs=3, optim__lr=0.02)), resume=True)
    lrs = [r["lr"] for r in resumed.history]
    assert lrs[0] == 0.0 and lrs[1:] == pytest.approx([r["lr"] for r in fresh.history[1:]], rel=1e-12)
    assert lrs[1] > 0.004  # cosine at 2/3 of the way: 0.02 * (1 + cos(2pi/3)) / 2 = 0.005
    out = capsys.readouterr().out
    assert "resume: config changed: epochs: 1 -> 3, optim.lr: 0.05 -> 0.02; optimizer hyper-parameters and " \
           "scheduler rebuilt from the new config, continuing at global step 3 of 9" in out


def test_resume_refuses_changes_it_cannot_honour(tmp_path):
    engine.train(load_config(None, tiny_overrides(tmp_path, max_steps_per_epoch=1)))
    changed = tiny_overrides(tmp_path, max_steps_per_epoch=1, model__name="resnet10t", data__embedded_val_per_class=3,
                             optim__opt="adamw")
    with pytest.raises(ConfigError) as err:
        engine.train(load_config(None, changed), resume=True)
    msg = str(err.value)
    assert "cannot resume with a different model.name, data.embedded_val_per_class, optim.opt" in msg
    assert "model.name: 'test_resnet' -> 'resnet10t'" in msg and "model.pretrained=<checkpoint>" in msg
    # a checkpoint written before a config key existed resumes as if it had the default value
    from covpool.train.config import TrainConfig

    old = config_to_dict(TrainConfig())
    del old["model"]["zca"], old["max_val_steps"]
    assert engine._check_resume_config(old, config_to_dict(TrainConfig())) == {}
    # a backend schedule leaves the weights as they are: a resume may change it, and the change is listed
    hybrid = TrainConfig()
    hybrid.model.backend_schedule = [[0, "ns"], [1, "svd_pade"]]
    assert engine._check_resume_config(config_to_dict(TrainConfig()), config_to_dict(hybrid)) == {
        "model.backend_schedule": (None, [[0, "ns"], [1, "svd_pade"]])}
    # what a resume may change freely: a (local or hub) pretrained source is not even read
    free = tiny_overrides(tmp_path, epochs=2, max_steps_per_epoch=1, model__pretrained=str(tmp_path / "gone.pth"))
    assert [r["epoch"] for r in engine.train(load_config(None, free), resume=True).history] == [1, 2]


# -- one run per folder -------------------------------------------------------------------------------------
def test_a_second_run_in_the_same_folder_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, capsys):
    cfg = load_config(None, tiny_overrides(tmp_path, max_steps_per_epoch=1))
    run = tmp_path / "tiny"
    holder = engine._RunLock(run)  # what a live concurrent run holds
    assert holder.acquire() is None
    with pytest.raises(engine.RunLockedError, match=rf"{run} is in use by a run in progress \(pid {os.getpid()} on "):
        engine.train(cfg)
    assert train_main(["--config", str(REPO / "configs" / "demo.yaml"),
                       *tiny_overrides(tmp_path, max_steps_per_epoch=1)]) == 2
    assert "is in use by a run in progress" in capsys.readouterr().err
    assert not (run / "last.pt").exists()
    holder.release()
    # a run killed with -9 leaves the file but not the lock (the kernel drops it): taken over, with a note
    (run / ".lock").write_text("pid 4194999 on some-host")
    assert engine.train(cfg).final["epoch"] == 1
    assert "locked by pid 4194999 on some-host, which has ended" in capsys.readouterr().out
    assert not (run / ".lock").exists()


_FROZEN_RANK = """
import sys, time
from covpool.train import engine
from covpool.train.config import load_config

real_step = engine._Trainer._train_step
reached = []

def step(self, images, target, stop):
    if self.global_step == 1:
        reached.append(time.perf_counter())
        if self.ctx.rank == 1:
            time.sleep(float(sys.argv[1]))  # a frozen process (deadlocked data loader, hung file system, ...)
    return real_step(self, images, target, stop)

engine._Trainer._train_step = step
try:
    engine.train(load_config(None, sys.argv[2:]))
except engine.DistributedFailure as err:
    print(f"waited {time.perf_counter() - reached[0]:.1f} s; DistributedFailure:", err, flush=True)
    sys.exit(3)
"""


def test_dist_timeout_plumbing(monkeypatch):
    from covpool.train import _dist

    monkeypatch.delenv("COVPOOL_DIST_TIMEOUT", raising=False)
    assert _dist.dist_timeout_s() == 600.0 and _dist.dist_timeout_s(30) == 30.0
    monkeypatch.setenv("COVPOOL_DIST_TIMEOUT", "45")
    assert _dist.dist_timeout_s() == 45.0 and _dist.dist_timeout_s(5) == 5.0  # the config wins
    for bad in (0, -1, float("inf"), "soon"):
        with pytest.raises(ValueError, match="dist_timeout must be a positive number of seconds"):
            _dist.dist_timeout_s(bad)
    monkeypatch.setenv("COVPOOL_DIST_TIMEOUT", "0")
    with pytest.raises(ValueError, match="COVPOOL_DIST_TIMEOUT must be a positive"):
        _dist.dist_timeout_s()
    assert _dist.is_collective_failure(RuntimeError("[gloo/unbound_buffer.cc:78] Timed out waiting 2000ms for recv"))
    assert not _dist.is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.mark.slow  # ~25 s: two processes import torch and timm
def test_a_frozen_rank_ends_a_ddp_job_within_dist_timeout(tmp_path):
    """Two gloo processes, rank 1 frozen for 10 s at its second step, COVPOOL_DIST_TIMEOUT=2: rank 0 stops
    after ~2 s with a message naming rank 1 and the last checkpoint, instead of torch's 30 minutes."""
    import re
    import socket

    script = tmp_path / "frozen.py"
    script.write_text(_FROZEN_RANK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    over = tiny_overrides(tmp_path, "ddp", epochs=3, data__embedded_train_per_class=4, device="cpu")
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "COVPOOL_DIST_TIMEOUT": "2"}
        procs.append(subprocess.Popen([sys.executable, str(script), "10", *over], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out0, _ = procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=120)
    assert procs[0].returncode == 3, out0[-3000:]
    assert "rank 0 of 2: a collective operation failed within dist_timeout=2 s" in out0
    assert "rank 1 is frozen or died" in out0 and "no checkpoint was written" in out0.lower()
    waited = float(re.search(r"waited ([\d.]+) s", out0).group(1))
    assert 1.5 < waited < 8  # the timeout, not the frozen process, ended the wait


# -- progress output -------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_plain_lines_when_output_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    over = tiny_overrides(tmp_path, progress="true", epochs=2, log_interval=2)
    engine.train(load_config(None, over))  # under capsys: stdout and stderr are not terminals
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    lines = [line for line in out.splitlines() if "step" in line]
    assert [line.split("  ")[:2] for line in lines] == [["epoch 1/2", "step 2/3"], ["epoch 2/2", "step 2/3"]]
    assert all("loss" in line and "img/s" in line and "lr" in line for line in lines)
    # on a terminal: tqdm's redrawing bars, no plain lines
    monkeypatch.setattr(sys, "stderr", _Terminal())
    engine.train(load_config(None, over), overwrite=True)
    assert "\r" in sys.stderr.getvalue() and "step 2/3" not in capsys.readouterr().out


# -- layer-wise learning-rate decay ------------------------------------------------------------------------------
def _scales(model, groups) -> dict[str, float]:
    by_id = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def test_layer_decay_combines_with_head_lr_mult(tmp_path):
    cfg = load_config(None, ["model.name=test_resnet", "model.swap_pooling=true", "model.covpool.reduced_dim=8"])
    model = build_model(cfg.model, 8)
    plain = _scales(model, param_groups(model, 1e-4, 5.0))
    assert _scales(model, param_groups(model, 1e-4, 5.0, layer_decay=1.0)) == pytest.approx(plain, rel=1e-12)
    decayed = _scales(model, param_groups(model, 1e-4, 5.0, layer_decay=0.5))
    from timm.models import group_parameters

    layers = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    top = max(layers.values())
    for name, scale in decayed.items():
        expect = 0.5 ** (top - layers.get(name, top)) * (5.0 if plain[name] == 5.0 else 1.0)
        assert scale == pytest.approx(expect, rel=1e-12), name
    assert decayed["fc.weight"] == 5.0 and decayed["conv1.0.weight"] == pytest.approx(0.5 ** top)
    assert any(k.startswith("global_pool.") and v == 5.0 for k, v in decayed.items())  # covariance head too
    with pytest.raises(ConfigError, match=r"'optim.layer_decay' must be in \(0, 1\]"):
        load_config(None, ["optim.layer_decay=1.5"])
    # the training loop reads optim.layer_decay and hands it to timm's optimizer
    run_cfg = load_config(None, tiny_overrides(tmp_path, optim__head_lr_mult=5.0, optim__sched="constant",
                                               model__swap_pooling="true", model__covpool__reduced_dim=8))
    for layer_decay in (None, 0.5):
        run_cfg.optim.layer_decay = layer_decay
        trainer = engine._Trainer(run_cfg, None, True)
        try:
            trainer.scheduler.step_update(num_updates=5)
            lrs = _scales(trainer.model, [dict(g, lr_scale=g["lr"] / run_cfg.optim.lr)
                                          for g in trainer.optimizer.param_groups])
            expect = _scales(trainer.model, param_groups(trainer.model, 1e-4, 5.0, layer_decay))
        finally:
            trainer.lock.release()
        # every parameter at lr x its scale, the head at exactly 5x (not 25x: the scale is applied once)
        assert lrs == pytest.approx(expect, rel=1e-12) and lrs["fc.weight"] == pytest.approx(5.0, rel=1e-12)


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = engine._RunLock(tmp_path / "run")
    with pytest.warns(UserWarning, match=r"cannot lock .*\.lock .*No locks available"):
        assert lock.acquire() is None
    lock.release()
    assert not (tmp_path / "run" / ".lock").exists()


# -- timm's training switches: gradient accumulation, channels_last, torch.compile, gradient checkpointing ------
def _one_step(tmp_path, name, **extra):
    """Parameters (float64 copies; not the BatchNorm statistics) and train loss after one optimizer step of a
    tiny run, and the model."""
    extra = {"max_steps_per_epoch": 1, "max_val_steps": 1, "optim__opt": "momentum", "optim__momentum": 0.0,
             "optim__weight_decay": 0.0,
             "optim__sched": "constant", **extra}
    result = engine.train(load_config(None, tiny_overrides(tmp_path, name, **extra)))
    weights = {k: v.detach().double().clone() for k, v in result.model.named_parameters()}
    return weights, result.history[0]["train_loss"], result.model


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in a)
    return math.sqrt(num / max(den, 1e-300))


def _update(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def test_grad_accumulation_gives_the_gradient_of_one_big_batch(tmp_path):
    """Two batches of 8 accumulated make the update of one batch of 16 (16 training images: one optimizer step
    each). test_vit normalises per sample (LayerNorm, no BatchNorm), so the two gradients are one."""
    vit = dict(model__name="test_vit", model__kwargs="{img_size: 32}", data__embedded_train_per_class=2)
    before, _, _ = _one_step(tmp_path, "init", **vit, optim__lr=0.0, data__batch_size=16)
    big, big_loss, _ = _one_step(tmp_path, "big", **vit, optim__lr=0.5, data__batch_size=16)
    accum, accum_loss, _ = _one_step(tmp_path, "accum", **vit, optim__lr=0.5, data__batch_size=8, grad_accum_steps=2)
    small, _, _ = _one_step(tmp_path, "small", **vit, optim__lr=0.5, data__batch_size=8)  # no accumulation: half
    step = _update(big, before)
    assert _rel(step, step) == 0 and math.sqrt(sum(float(v.pow(2).sum()) for v in step.values())) > 1e-3
    assert _rel(_update(accum, before), step) < 1e-4  # float32 sums in another order
    assert _rel(_update(small, before), step) > 1e-2  # the check can tell one batch of 8 from 16
    assert accum_loss == pytest.approx(big_loss, rel=1e-5)
    rows = _rows(tmp_path / "accum" / "metrics.csv")
    assert float(rows[0]["train_loss"]) == pytest.approx(big_loss, rel=1e-5)


def test_grad_accumulation_counts_optimizer_steps_and_resumes(tmp_path, monkeypatch):
    """grad_accum_steps=2 over 3 batches per epoch: 2 optimizer steps (the last one takes 1 batch, as timm);
    the schedule and the checkpoint count optimizer steps, and a stop between two of them resumes exactly."""
    over = dict(epochs=2, grad_accum_steps=2)  # 24 training images, batches of 8: 3 batches per epoch
    engine.train(load_config(None, tiny_overrides(tmp_path, "straight", **over)))
    state = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (2, 4)

    real_step, sizes = engine._Trainer._train_step, []

    def step_then_interrupt(self, images, target, stop):
        sizes.append(len(images))
        if self.global_step == 2:  # the first step of epoch 2
            signal.raise_signal(signal.SIGINT)
        return real_step(self, images, target, stop)

    cfg = load_config(None, tiny_overrides(tmp_path, "interrupted", **over))
    monkeypatch.setattr(engine._Trainer, "_train_step", step_then_interrupt)
    assert engine.train(cfg).interrupted
    monkeypatch.setattr(engine._Trainer, "_train_step", real_step)
    state = torch.load(tmp_path / "interrupted" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 3)
    assert sizes == [2, 1, 2]
    changed = load_config(None, tiny_overrides(tmp_path, "interrupted", **{**over, "grad_accum_steps": 1}))
    with pytest.raises(ConfigError, match=r"cannot resume mid-epoch \(step 1\) with grad_accum_steps 2 -> 1"):
        engine.train(changed, resume=True)
    smaller = load_config(None, tiny_overrides(tmp_path, "interrupted", **{**over, "data.batch_size": 4}))
    with pytest.raises(ConfigError, match=r"cannot resume mid-epoch \(step 1\) with data.batch_size 8 -> 4"):
        engine.train(smaller, resume=True)
    engine.train(cfg, resume=True)
    _assert_same_run(tmp_path / "straight", tmp_path / "interrupted")


def test_channels_last_trains_like_the_default_layout(tmp_path):
    before, loss, _ = _one_step(tmp_path, "nchw")
    after, loss_cl, model = _one_step(tmp_path, "nhwc", channels_last="true")
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert loss_cl == pytest.approx(loss, rel=1e-4) and _rel(after, before) < 1e-4


def test_compile_trains_one_step_and_rejects_unknown_backends(tmp_path):
    eager, loss, _ = _one_step(tmp_path, "eager")
    compiled, loss_c, model = _one_step(tmp_path, "compiled", compile="aot_eager")  # no C++ toolchain needed
    assert not hasattr(model, "_orig_mod")  # the checkpointed model is the plain one
    assert loss_c == pytest.approx(loss, rel=1e-4) and _rel(compiled, eager) < 1e-4
    state = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in state["state_dict"])
    with pytest.raises(ConfigError, match=r"compile='nope' is not a torch.compile backend; .*inductor"):
        engine.train(load_config(None, tiny_overrides(tmp_path, "bad", compile="nope")))


@pytest.mark.slow
def test_compile_true_uses_inductor(tmp_path):
    eager, loss, _ = _one_step(tmp_path, "eager")
    compiled, loss_c, _ = _one_step(tmp_path, "inductor", compile="true")
    assert loss_c == pytest.approx(loss, rel=1e-3) and _rel(compiled, eager) < 1e-3


def test_grad_checkpointing_trains_like_storing_activations(tmp_path):
    # the parameters only: the recomputed forward updates BatchNorm's running statistics a second time
    plain, loss, _ = _one_step(tmp_path, "plain")
    ckpt, loss_ckpt, model = _one_step(tmp_path, "ckpt", model__grad_checkpointing="true")
    assert model.grad_checkpointing is True
    assert loss_ckpt == pytest.approx(loss, rel=1e-5) and _rel(ckpt, plain) < 1e-5
    with pytest.raises(ConfigError, match="Linear.*has no set_grad_checkpointing"):
        engine._set_grad_checkpointing(torch.nn.Linear(2, 2), "mine")


def test_clip_mode_value_bounds_every_element_of_the_update(tmp_path):
    lr, clip = 0.05, 1e-3
    before, _, _ = _one_step(tmp_path, "init", optim__lr=0.0)
    free, _, _ = _one_step(tmp_path, "free", optim__lr=lr)
    after, _, _ = _one_step(tmp_path, "clipped", optim__lr=lr, clip_grad=clip, clip_mode="value")
    biggest = {name: max(float(v.abs().max()) for v in _update(w, before).values())
               for name, w in (("free", free), ("clipped", after))}
    assert biggest["free"] > 10 * lr * clip  # so the clip is active
    # float32 weights near 1 round each update to ~1e-7, 0.2 % of lr * clip
    assert 0.5 * lr * clip < biggest["clipped"] <= lr * clip * (1 + 1e-2)
    with pytest.raises(ConfigError, match="clip_mode must be one of norm, value, agc, got 'max'"):
        engine.train(load_config(None, tiny_overrides(tmp_path, "bad", clip_mode="max")))


def test_a_frozen_head_trains_the_backbone(tmp_path):
    """optim.head_lr_mult=0 (its range allows it): the head keeps its weights, the backbone trains, and the
    logged rate is the backbone's (it divided by the head's zero scale)."""
    over = tiny_overrides(tmp_path, optim__head_lr_mult=0, optim__sched="constant", model__swap_pooling="true",
                          model__covpool__reduced_dim=8)
    trainer = engine._Trainer(load_config(None, over), None, True)
    try:
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        with engine._StopFlag().installed() as stop:
            result = trainer.run(stop)
    finally:
        trainer.lock.release()
    after = dict(trainer.model.named_parameters())
    assert torch.equal(after["fc.weight"], before["fc.weight"])
    assert not torch.equal(after["conv1.0.weight"], before["conv1.0.weight"])
    assert result.history[0]["lr"] == pytest.approx(0.05, rel=1e-12)
