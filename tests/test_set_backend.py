"""covpool.set_backend (every covpool layer switches backend, nothing else changes) and model.backend_schedule."""
from __future__ import annotations

import copy
import csv
import logging
import signal

import pytest
import timm
import torch
import torchvision
from _train_helpers import REPO, tiny_overrides
from torch import nn

import covpool
from covpool.cli import main
from covpool.demo import HYBRID_VARIANTS, hybrid_demo_config
from covpool.train import engine, evaluate
from covpool.train._model import build_model
from covpool.train._schedule import (
    BackendSchedule,
    backend_for_epoch,
    checkpoint_epoch,
    describe_backend,
    parse_backend_schedule,
)
from covpool.train.config import ConfigError, load_config

NS = {"name": "ns", "num_iters": 5}


pytestmark = pytest.mark.usefixtures("one_thread")


def _zca_net(backend="ns", zca_backend="eig") -> nn.Module:
    """A small model with both a ZCA whitening layer and covariance pooling."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), covpool.ZCABatchNorm2d(16, group_size=4, backend=zca_backend),
                         nn.ReLU(), covpool.CovPool(16, reduced_dim=8, backend=backend), nn.Linear(36, 5))


# name -> (builder taking a backend spec, input size, the backend it is built with, the one to switch to)
MODELS = {
    "resnet18_isqrt": (lambda b: timm.create_model("resnet18_isqrt", num_classes=5, reduced_dim=16, backend=b),
                       32, NS, "svd_pade"),
    "resnet50_isqrt": (lambda b: timm.create_model("resnet50_isqrt", num_classes=5, backend=b), 64, NS, "svd_pade"),
    "so_vit_7": (lambda b: timm.create_model("so_vit_7", num_classes=5, img_size=32, head="mpa_cov", backend=b), 32,
                 "mpa_lya",
                 {"name": "ns", "num_iters": 3}),
    "torchvision_swapped": (lambda b: covpool.swap_pooling(torchvision.models.resnet18(num_classes=5), reduced_dim=16,
                                                           backend=b), 64, "ns", {"name": "svd_pade", "degree": 4}),
    "zca_net": (lambda b: _zca_net(backend=b, zca_backend=b), 8, "ns", "eig"),
}


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (covpool.CovPool, covpool.ZCABatchNorm1d, covpool.ZCABatchNorm2d)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise_equal(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed


@pytest.mark.parametrize("name", list(MODELS))
def test_switches_every_layer_and_matches_a_model_built_with_the_new_backend(name):
    build, size, old, new = MODELS[name]
    torch.manual_seed(0)
    model = build(old).eval()
    reference = build(new).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before_out, expected = model(x), reference(x)
    # the test can fail: the two backends give visibly different outputs on these weights
    assert (before_out - expected).abs().max() > 1e-4 * expected.abs().max()
    state = _snapshot(model)
    layers = _layers(model)
    assert layers

    previous = covpool.set_backend(model, new)

    assert list(previous) == list(layers)
    assert all(spec == old for spec in previous.values())
    assert all(layer.backend == new for layer in layers.values())
    _assert_bitwise_equal(state, model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec, error, match", [
    ("svd", ValueError, "unknown backend 'svd'; valid backends are: eig"),
    ({"name": "ns", "iters": 3}, TypeError, "unknown option"),
    ({"name": "ns", "num_iters": 0}, ValueError, "num_iters"),
    ({"num_iters": 3}, ValueError, "needs a 'name' key"),
    (3, TypeError, "backend must be a name or a dict"),
])
def test_bad_spec_raises_before_anything_changes(spec, error, match):
    model = _zca_net()
    layers = _layers(model)
    before = {name: layer.backend for name, layer in layers.items()}
    with pytest.raises(error, match=match):
        covpool.set_backend(model, spec)
    assert {name: layer.backend for name, layer in layers.items()} == before


def test_model_without_covpool_layers_raises():
    with pytest.raises(ValueError, match="Sequential has no covpool layer"):
        covpool.set_backend(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), "eig")
    with pytest.raises(TypeError, match="expects an nn.Module"):
        covpool.set_backend("resnet50", "eig")


def test_layers_selects_by_class():
    model = _zca_net(backend="ns", zca_backend="eig")
    previous = covpool.set_backend(model, "svd_pade", layers=covpool.CovPool)
    assert previous == {"3": "ns"}
    assert model[3].backend == "svd_pade" and model[1].backend == "eig"
    assert covpool.set_backend(model, "ns", layers=(covpool.ZCABatchNorm1d, covpool.ZCABatchNorm2d)) == {"1": "eig"}
    assert model[1].backend == "ns"
    with pytest.raises(TypeError, match="covpool layer classes"):
        covpool.set_backend(model, "eig", layers=nn.BatchNorm2d)
    with pytest.raises(TypeError, match="covpool layer classes"):
        covpool.set_backend(model, "eig", layers=covpool.SoViTHead)  # its square root is its CovPool's
    assert model[3].backend == "svd_pade" and model[1].backend == "ns"


def test_dict_spec_is_copied_per_layer_and_previous_specs_restore():
    model = _zca_net(backend="ns", zca_backend="eig").eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        original = model(x)
    spec = {"name": "svd_pade", "degree": [4, 4]}
    previous = covpool.set_backend(model, spec)
    spec["degree"][0] = 9
    assert model[1].backend == model[3].backend == {"name": "svd_pade", "degree": [4, 4]}
    assert model[1].backend is not model[3].backend
    for name, old in previous.items():
        covpool.set_backend(model.get_submodule(name), old)
    assert (model[1].backend, model[3].backend) == ("eig", "ns")
    with torch.no_grad():
        torch.testing.assert_close(model(x), original, rtol=0, atol=0)


def test_a_single_layer_is_its_own_model():
    pool = covpool.CovPool(8, reduced_dim=4)
    assert covpool.set_backend(pool, "eig") == {"": "ns"}
    assert pool.backend == "eig"


def test_compiled_model_recompiles_for_the_new_backend():
    torch.manual_seed(0)
    model = _zca_net(backend="ns", zca_backend="eig").eval()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        before = compiled(x)
        torch.testing.assert_close(before, reference(x))
        previous = covpool.set_backend(compiled, {"name": "ns", "num_iters": 1}, layers=covpool.CovPool)
        assert previous == {"3": "ns"}  # the bare model's names, not "_orig_mod.3"
        covpool.set_backend(reference, {"name": "ns", "num_iters": 1}, layers=covpool.CovPool)
        expected = reference(x)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    # a stale compiled graph would have returned `before`: one NS iteration is far from five
    assert (expected - before).abs().max() > 1e-3


def test_wrapped_models_are_unwrapped(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process; DDP needs a fresh one here")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _zca_net()
        ddp = nn.parallel.DistributedDataParallel(model)
        assert covpool.set_backend(ddp, "svd_taylor") == {"1": "eig", "3": "ns"}
        assert model[1].backend == model[3].backend == "svd_taylor"
    finally:
        dist.destroy_process_group()
    dp = nn.DataParallel(model)
    assert covpool.set_backend(dp, "eig", layers=covpool.CovPool) == {"3": "svd_taylor"}
    assert model[3].backend == "eig"


# -- model.backend_schedule in covpool train ---------------------------------------------------------------------

HYBRID = "[[0, ns], [1, {name: svd_pade, degree: 4}]]"


def test_schedule_parses_and_picks_the_epoch_backend():
    schedule = parse_backend_schedule([[0, "ns"], [10, {"name": "svd_pade", "degree": [4, 4]}], [30, "eig"]], 50)
    assert [backend_for_epoch(schedule, e) for e in (0, 9)] == ["ns", "ns"]
    assert backend_for_epoch(schedule, 10) == {"name": "svd_pade", "degree": [4, 4]}
    assert [backend_for_epoch(schedule, e) for e in (29, 30, 99)][1:] == ["eig", "eig"]
    assert backend_for_epoch((), 3) is None and parse_backend_schedule(None) == () == parse_backend_schedule([])
    assert describe_backend(schedule[1][1]) == "svd_pade(degree=[4, 4])"
    cfg = load_config(None, [f"model.backend_schedule={HYBRID}"])
    assert parse_backend_schedule(cfg.model.backend_schedule) == ((0, "ns"), (1, {"name": "svd_pade", "degree": 4}))


@pytest.mark.parametrize("raw, match", [
    ("ns", r"must be a list of \[start_epoch, backend\] pairs"),
    ([[0, "ns", 3]], r"backend_schedule\[0\] must be a \[start_epoch, backend\] pair"),
    ([[1, "ns"]], "must start at epoch 0"),
    ([[0, "ns"], [5, "eig"], [5, "svd_pade"]], "start epochs must increase, got 5 after 5"),
    ([[0, "ns"], [-1, "eig"]], r"backend_schedule\[1\]: the start epoch must be an integer >= 0, got -1"),
    ([[0, "ns"], [2.5, "eig"]], "integer >= 0, got 2.5"),
    ([[0, "ns"], [3, "svd"]], r"backend_schedule\[1\]: unknown backend 'svd'; valid backends are"),
    ([[0, {"name": "ns", "iters": 2}]], r"backend_schedule\[0\]: backend 'ns' got unknown option"),
    ([[0, {"num_iters": 2}]], "needs a 'name' key"),
])
def test_bad_schedules_are_config_errors(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_backend_schedule(raw, 10)


def test_a_switch_past_the_last_epoch_warns():
    with pytest.warns(UserWarning, match="switch.* at epoch 10 never happen in a run of 10 epochs"):
        parse_backend_schedule([[0, "ns"], [10, "eig"]], 10)


def test_checkpoint_epoch():
    assert checkpoint_epoch({"epoch": 2, "step_in_epoch": 0}) == 1  # saved after two complete epochs
    assert checkpoint_epoch({"epoch": 1, "step_in_epoch": 2}) == 1  # saved mid-way through the second
    assert checkpoint_epoch({"epoch": 0, "step_in_epoch": 0}) == 0


def _hybrid(tmp_path, name, schedule=HYBRID):
    # covariance pooling on test_resnet's last stage at stride 1: 2x2 positions at 32x32, 8x8 covariance
    return load_config(None, tiny_overrides(tmp_path, name, epochs=2, model__swap_pooling="true",
                                            model__covpool__reduced_dim=8, model__covpool__last_stride=1,
                                            model__backend_schedule=schedule))


@pytest.fixture
def record_backends(monkeypatch):
    """Every training step's (epoch, backend the CovPool layer holds while the step runs)."""
    seen = []
    real_step = engine._Trainer._train_step

    def step(self, images, target, stop):
        pool = self.model.global_pool
        seen.append((self.progress.epoch, pool.backend))
        return real_step(self, images, target, stop)

    monkeypatch.setattr(engine._Trainer, "_train_step", step)
    return seen


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_schedule_switches_at_the_configured_epoch_and_records_it(tmp_path, record_backends, capsys):
    result = engine.train(_hybrid(tmp_path, "hybrid"))
    pade = {"name": "svd_pade", "degree": 4}
    assert record_backends == [(0, "ns")] * 3 + [(1, pade)] * 3
    assert result.model.global_pool.backend == pade
    assert [r["backend"] for r in result.history] == ["ns", "svd_pade(degree=4)"]
    assert [r["backend"] for r in _csv(tmp_path / "hybrid" / "metrics.csv")] == ["ns", "svd_pade(degree=4)"]
    out = capsys.readouterr().out
    assert "epoch 1/2: square-root backend ns (model.backend_schedule)" in out
    assert "epoch 2/2: square-root backend ns -> svd_pade(degree=4) (model.backend_schedule)" in out
    # covpool eval of the checkpoint uses the backend of the epoch it was saved in
    metrics = evaluate(tmp_path / "hybrid" / "last.pt")
    assert metrics["loss"] == pytest.approx(result.history[-1]["val_loss"], rel=1e-6, abs=1e-9)


def test_without_a_schedule_the_fixed_backend_is_recorded(tmp_path):
    result = engine.train(_hybrid(tmp_path, "fixed", schedule="null"))
    assert [r["backend"] for r in result.history] == ["ns", "ns"]


def test_schedule_on_a_model_without_covariance_pooling_is_a_config_error(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "plain", epochs=2, model__backend_schedule=HYBRID))
    with pytest.raises(ConfigError, match="needs covariance pooling in the model"):
        engine.train(cfg)


def test_resume_mid_epoch_after_the_switch_continues_with_the_new_backend(tmp_path, monkeypatch, record_backends):
    straight = engine.train(_hybrid(tmp_path, "straight"))
    fixed = engine.train(_hybrid(tmp_path, "ns_only", schedule="[[0, ns]]"))
    # the switch matters: the hybrid run's weights differ from an NS-only run's
    assert any(not torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(),
                                                     fixed.model.state_dict().values()))
    record_backends.clear()

    real_step = engine._Trainer._train_step  # the recording step

    def step_then_interrupt(self, images, target, stop):
        if self.progress.global_step == 4:  # epoch index 1 (the second, svd_pade), after its first step
            signal.raise_signal(signal.SIGINT)
        return real_step(self, images, target, stop)

    cfg = _hybrid(tmp_path, "interrupted")
    monkeypatch.setattr(engine._Trainer, "_train_step", step_then_interrupt)
    assert engine.train(cfg).interrupted
    state = torch.load(tmp_path / "interrupted" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    record_backends.clear()
    resumed = engine.train(cfg, resume=True)  # a fresh model, built with covpool.backend = ns
    pade = {"name": "svd_pade", "degree": 4}
    assert record_backends == [(1, pade)]
    assert resumed.model.global_pool.backend == pade
    a = straight.model.state_dict()
    b = torch.load(tmp_path / "interrupted" / "last.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    keys = ("epoch", "train_loss", "val_loss", "val_acc1", "backend")
    rows = _csv(tmp_path / "straight" / "metrics.csv"), _csv(tmp_path / "interrupted" / "metrics.csv")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]


def test_shipped_hybrid_config_switches_to_svd_pade_after_ten_epochs(caplog):
    cfg = load_config(REPO / "configs" / "cub200_resnet50_hybrid.yaml", ["model.pretrained=false"])
    schedule = BackendSchedule.from_config(cfg)
    model = build_model(cfg.model, 200)
    with caplog.at_level(logging.INFO, logger="covpool"):  # the switch is a log line of covpool's
        assert schedule.apply(0, [model]) == {"name": "ns", "num_iters": 5} == model.global_pool.backend
        assert schedule.apply(9, [model]) == {"name": "ns", "num_iters": 5}
        assert schedule.apply(10, [model]) == "svd_pade" == model.global_pool.backend
    assert "epoch 11/50: square-root backend ns(num_iters=5) -> svd_pade" in caplog.text


def test_hybrid_demo_trains_the_three_variants_with_the_same_budget(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown variant 'svd'"):
        hybrid_demo_config("svd")
    with pytest.raises(ValueError, match="switch must be a positive number of epochs"):
        hybrid_demo_config("hybrid", switch=0)
    tiny = ["epochs=2", "data.img_size=32", "data.embedded_train_per_class=2", "data.embedded_val_per_class=1",
            "data.batch_size=8", "max_steps_per_epoch=1", "model.covpool.reduced_dim=8"]
    assert main(["demo", "--hybrid", "--output-dir", str(tmp_path), "--no-progress", "--switch", "1", *tiny]) == 0
    out = capsys.readouterr().out
    result = out[out.index("== result"):]
    assert all(f"  {v} " in result for v in HYBRID_VARIANTS)
    backends = {v: [r["backend"] for r in _csv(tmp_path / v / "metrics.csv")] for v in HYBRID_VARIANTS}
    assert backends == {"ns": ["ns", "ns"], "svd_pade": ["svd_pade", "svd_pade"], "hybrid": ["ns", "svd_pade"]}
    assert (tmp_path / "comparison.png").is_file()


def test_released_so_vit_head_has_no_backend_and_says_so():
    model = timm.create_model("so_vit_7", num_classes=5, img_size=32)  # head="svpn", the release
    assert model.head.backend is None
    with pytest.raises(ValueError, match=r"So-ViT svPN head normalises by svPN .* no matrix square root, so there "
                                         r"is no backend to choose.*head='mpa_cov' for so_vit_\* models"):
        covpool.set_backend(model, "ns")


def test_a_sot_head_has_no_backend_and_the_message_does_not_send_back_to_swap_pooling():
    model = covpool.swap_pooling(timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32), head="sot",
                                 reduced_dim=(2, 4))
    with pytest.raises(ValueError, match=r"its SoT / DropCov head \(head='sot'\) normalises by svPN") as err:
        covpool.set_backend(model, "ns")
    assert "swap_pooling(model)" not in str(err.value)
    mpa = timm.create_model("so_vit_7", num_classes=5, img_size=32, head="mpa_cov")
    assert covpool.set_backend(mpa, "ns") == {"head.pool": "mpa_lya"} and mpa.head.backend == "ns"
