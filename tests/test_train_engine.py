"""covpool.train.engine, the training loop: training and evaluation end to end, non-finite losses, progress output,
and timm's training switches (gradient accumulation, channels_last, torch.compile, gradient checkpointing,
clipping, layer decay)."""
from __future__ import annotations

import dataclasses
import io
import math
import sys
from pathlib import Path

import pytest
import torch
from _train_helpers import REPO, one_step, read_rows, rel_diff, tiny_overrides, weight_update

from covpool.cli import eval_main, train_main
from covpool.train import _datasets, engine
from covpool.train import checkpoint as ckpt_mod
from covpool.train._model import build_model, param_groups, set_grad_checkpointing
from covpool.train._stop import StopFlag
from covpool.train.config import ConfigError, ModelConfig, load_config
from covpool.train.evaluation import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second OpenMP thread only slows them down


def test_two_step_training_then_eval(tmp_path, capsys):
    over = tiny_overrides(tmp_path, max_steps_per_epoch=2)
    assert train_main(["--config", str(REPO / "configs" / "demo.yaml"), *over]) == 0
    run = tmp_path / "tiny"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "curves.png", "last.pt",
                                                     "metrics.csv"]
    rows = read_rows(run / "metrics.csv")
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
    assert "(16 images, 8 classes)" in out


def test_amp_ema_mixup_clip_and_workers(tmp_path):
    over = tiny_overrides(tmp_path, epochs=2, amp="bf16", ema="true", ema_decay=0.5, mixup=0.8, cutmix=1.0,
                          label_smoothing=0.1, clip_grad=1.0, data__workers=1, model__swap_pooling="true",
                          model__covpool__reduced_dim=16, model__covpool__last_stride=1)
    result = engine.train(load_config(None, over))
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["ema_val_acc1"]) for r in result.history)
    ema = evaluate(tmp_path / "tiny" / "last.pt", use_ema=True)
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


def _wrap_built_model(monkeypatch, wrapper: type, calls: int) -> None:
    """The models the trainer builds come wrapped in ``wrapper(model, calls)``."""
    real = engine.make_model

    def make_model(cfg, n, **kw):
        built = real(cfg, n, **kw)
        return dataclasses.replace(built, model=wrapper(built.model, calls=calls))

    monkeypatch.setattr(engine, "make_model", make_model)


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good(tmp_path, monkeypatch, capsys):
    _wrap_built_model(monkeypatch, _NaNAfter, calls=4)
    over = tiny_overrides(tmp_path, epochs=3)
    rc = train_main(["--config", str(REPO / "configs" / "demo.yaml"), *over])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at epoch 2, step 1 of 3 (global step 4)" in err
    assert str(tmp_path / "tiny" / "last.pt") in err
    state = torch.load(tmp_path / "tiny" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert len(read_rows(tmp_path / "tiny" / "metrics.csv")) == 1


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
    _wrap_built_model(monkeypatch, _InfInputAfter, calls=2)
    over = tiny_overrides(tmp_path, model__swap_pooling="true", model__covpool__reduced_dim=8,
                          model__covpool__backend=backend, model__covpool__last_stride=1)
    with pytest.raises(engine.NonFiniteLossError, match=r"^non-finite .* at epoch 1, step 2 of 3 \(global step 2\)"):
        engine.train(load_config(None, over))


def test_non_finite_loss_before_any_checkpoint(tmp_path, monkeypatch):
    _wrap_built_model(monkeypatch, _NaNAfter, calls=2)
    with pytest.raises(engine.NonFiniteLossError, match=r"epoch 1, step 2 of 3 .*No checkpoint was written yet"):
        engine.train(load_config(None, tiny_overrides(tmp_path)))
    assert not (tmp_path / "tiny" / "last.pt").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_plain_lines_when_output_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    over = tiny_overrides(tmp_path, progress="true", epochs=2, log_interval=2)
    engine.train(load_config(None, over))  # under capsys: stdout and stderr are not terminals
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    lines = [line for line in out.splitlines() if line.startswith("epoch ") and "  step " in line]
    assert [line.split("  ")[:2] for line in lines] == [["epoch 1/2", "step 2/3"], ["epoch 2/2", "step 2/3"]]
    assert all("loss" in line and "img/s" in line and "lr" in line for line in lines)
    # on a terminal: tqdm's redrawing bars, no plain lines
    monkeypatch.setattr(sys, "stderr", _Terminal())
    engine.train(load_config(None, over), overwrite=True)
    assert "\r" in sys.stderr.getvalue() and "step 2/3" not in capsys.readouterr().out


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
                                               model__swap_pooling="true", model__covpool__reduced_dim=8,
                                               model__covpool__last_stride=1))
    for layer_decay in (None, 0.5):
        run_cfg.optim.layer_decay = layer_decay
        trainer = engine._Trainer(run_cfg, None, True)
        try:
            trainer.scheduler.step_update(num_updates=5)
            lrs = _scales(trainer.model, [dict(g, lr_scale=g["lr"] / run_cfg.optim.lr)
                                          for g in trainer.optimizer.param_groups])
            expect = _scales(trainer.model, param_groups(trainer.model, 1e-4, 5.0, layer_decay))
        finally:
            trainer.folder.release()
        # every parameter at lr x its scale, the head at exactly 5x (not 25x: the scale is applied once)
        assert lrs == pytest.approx(expect, rel=1e-12) and lrs["fc.weight"] == pytest.approx(5.0, rel=1e-12)


def test_grad_accumulation_gives_the_gradient_of_one_big_batch(tmp_path):
    """Two batches of 8 accumulated make the update of one batch of 16 (16 training images: one optimizer step
    each). test_vit normalises per sample (LayerNorm, no BatchNorm), so the two gradients are one."""
    vit = dict(model__name="test_vit", model__kwargs="{img_size: 32}", data__embedded_train_per_class=2)
    before, _, _ = one_step(tmp_path, "init", **vit, optim__lr=0.0, data__batch_size=16)
    big, big_loss, _ = one_step(tmp_path, "big", **vit, optim__lr=0.5, data__batch_size=16)
    accum, accum_loss, _ = one_step(tmp_path, "accum", **vit, optim__lr=0.5, data__batch_size=8, grad_accum_steps=2)
    small, _, _ = one_step(tmp_path, "small", **vit, optim__lr=0.5, data__batch_size=8)  # no accumulation: half
    step = weight_update(big, before)
    assert rel_diff(step, step) == 0 and math.sqrt(sum(float(v.pow(2).sum()) for v in step.values())) > 1e-3
    assert rel_diff(weight_update(accum, before), step) < 1e-4  # float32 sums in another order
    assert rel_diff(weight_update(small, before), step) > 1e-2  # the check can tell one batch of 8 from 16
    assert accum_loss == pytest.approx(big_loss, rel=1e-5)
    rows = read_rows(tmp_path / "accum" / "metrics.csv")
    assert float(rows[0]["train_loss"]) == pytest.approx(big_loss, rel=1e-5)


def test_channels_last_trains_like_the_default_layout(tmp_path):
    before, loss, _ = one_step(tmp_path, "nchw")
    after, loss_cl, model = one_step(tmp_path, "nhwc", channels_last="true")
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert loss_cl == pytest.approx(loss, rel=1e-4) and rel_diff(after, before) < 1e-4


def test_compile_trains_one_step_and_rejects_unknown_backends(tmp_path):
    eager, loss, _ = one_step(tmp_path, "eager")
    compiled, loss_c, model = one_step(tmp_path, "compiled", compile="aot_eager")  # no C++ toolchain needed
    assert not hasattr(model, "_orig_mod")  # the checkpointed model is the plain one
    assert loss_c == pytest.approx(loss, rel=1e-4) and rel_diff(compiled, eager) < 1e-4
    state = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in state["state_dict"])
    with pytest.raises(ConfigError, match=r"compile='nope' is not a torch.compile backend.*; valid: .*inductor"):
        engine.train(load_config(None, tiny_overrides(tmp_path, "bad", compile="nope")))


@pytest.mark.slow
def test_compile_true_uses_inductor(tmp_path):
    eager, loss, _ = one_step(tmp_path, "eager")
    compiled, loss_c, _ = one_step(tmp_path, "inductor", compile="true")
    assert loss_c == pytest.approx(loss, rel=1e-3) and rel_diff(compiled, eager) < 1e-3


def test_grad_checkpointing_trains_like_storing_activations(tmp_path):
    # the parameters only: the recomputed forward updates BatchNorm's running statistics a second time
    plain, loss, _ = one_step(tmp_path, "plain")
    ckpt, loss_ckpt, model = one_step(tmp_path, "ckpt", model__grad_checkpointing="true")
    assert model.grad_checkpointing is True
    assert loss_ckpt == pytest.approx(loss, rel=1e-5) and rel_diff(ckpt, plain) < 1e-5
    with pytest.raises(ConfigError, match="Linear.*has no set_grad_checkpointing"):
        set_grad_checkpointing(torch.nn.Linear(2, 2), ModelConfig(name="mine", grad_checkpointing=True))


def test_clip_mode_value_bounds_every_element_of_the_update(tmp_path):
    lr, clip = 0.05, 1e-3
    before, _, _ = one_step(tmp_path, "init", optim__lr=0.0)
    free, _, _ = one_step(tmp_path, "free", optim__lr=lr)
    after, _, _ = one_step(tmp_path, "clipped", optim__lr=lr, clip_grad=clip, clip_mode="value")
    biggest = {name: max(float(v.abs().max()) for v in weight_update(w, before).values())
               for name, w in (("free", free), ("clipped", after))}
    assert biggest["free"] > 10 * lr * clip  # so the clip is active
    # float32 weights near 1 round each update to ~1e-7, 0.2 % of lr * clip
    assert 0.5 * lr * clip < biggest["clipped"] <= lr * clip * (1 + 1e-2)
    with pytest.raises(ConfigError, match=r"clip_mode='max' is not a clipping mode .*; valid: norm, value, agc$"):
        engine.train(load_config(None, tiny_overrides(tmp_path, "bad", clip_mode="max")))


def test_a_frozen_head_trains_the_backbone(tmp_path):
    """optim.head_lr_mult=0 (its range allows it): the head keeps its weights, the backbone trains, and the
    logged rate is the backbone's (it divided by the head's zero scale)."""
    over = tiny_overrides(tmp_path, optim__head_lr_mult=0, optim__sched="constant", model__swap_pooling="true",
                          model__covpool__reduced_dim=8, model__covpool__last_stride=1)
    trainer = engine._Trainer(load_config(None, over), None, True)
    try:
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        with StopFlag().installed() as stop:
            result = trainer.run(stop)
    finally:
        trainer.folder.release()
    after = dict(trainer.model.named_parameters())
    assert torch.equal(after["fc.weight"], before["fc.weight"])
    assert not torch.equal(after["conv1.0.weight"], before["conv1.0.weight"])
    assert result.history[0]["lr"] == pytest.approx(0.05, rel=1e-12)


def test_each_command_reads_its_checkpoint_once_and_eval_builds_only_the_validation_set(tmp_path, monkeypatch):
    """covpool eval and covpool train --resume-from / --resume read (and hash) the checkpoint once; eval builds
    the model and the validation set, not the training set."""
    engine.train(load_config(None, tiny_overrides(tmp_path, max_steps_per_epoch=1)))
    last = tmp_path / "tiny" / "last.pt"
    reads, splits = [], []
    real_load, real_textures = ckpt_mod.load_checkpoint, _datasets.EmbeddedTextures
    monkeypatch.setattr(ckpt_mod, "load_checkpoint", lambda path, *a, **k: reads.append(Path(path)) or
                        real_load(path, *a, **k))
    monkeypatch.setattr(_datasets, "EmbeddedTextures",
                        lambda split, **k: splits.append(split) or real_textures(split, **k))
    assert eval_main(["--checkpoint", str(last)]) == 0
    assert reads == [last] and splits == ["val"]
    reads.clear()
    assert train_main(["--resume-from", str(last), "epochs=2"]) == 0
    assert reads == [last]
    reads.clear()
    assert train_main(["--config", "demo", *tiny_overrides(tmp_path, epochs=3, max_steps_per_epoch=1), "--resume"]) == 0
    assert reads == [last] and torch.load(last, weights_only=True)["epoch"] == 3
