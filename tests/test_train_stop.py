"""The stop protocol: Ctrl-C, SIGTERM and SIGUSR1 save and stop (and resume gives the uninterrupted run); Ctrl-C
during set-up; a second Ctrl-C aborts naming the saved work."""
from __future__ import annotations

import signal

import pytest
import torch
from _train_helpers import assert_same_run, tiny_overrides

from covpool.train import TrainingAborted, engine
from covpool.train.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second OpenMP thread only slows them down


@pytest.mark.parametrize("signame,code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGUSR1", 128 + 10)])
def test_stop_signal_saves_mid_epoch_and_resume_matches(tmp_path, monkeypatch, signame, code):
    """Ctrl-C, SIGTERM or SIGUSR1 at global step 4 (epoch 2, step 1): saved and stopped; resuming gives the
    uninterrupted run."""
    signum = getattr(signal, signame)
    extra = dict(epochs=2, optim__head_lr_mult=3.0, model__swap_pooling="true", model__covpool__reduced_dim=16,
                 model__covpool__last_stride=1)
    engine.train(load_config(None, tiny_overrides(tmp_path, "straight", **extra)))

    real_step = engine._Trainer._train_step

    def step_then_interrupt(self, images, target, stop):
        if self.progress.global_step == 3:
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
    assert_same_run(tmp_path / "straight", tmp_path / "interrupted")


def test_first_ctrl_c_during_set_up_stops_cleanly_and_second_aborts_truthfully(tmp_path, monkeypatch):
    real_build = engine.open_datasets
    presses = [1]

    def build_with_ctrl_c(*args, **kwargs):
        for _ in range(presses[0]):
            signal.raise_signal(signal.SIGINT)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(engine, "open_datasets", build_with_ctrl_c)
    cfg = load_config(None, tiny_overrides(tmp_path, max_steps_per_epoch=1))
    result = engine.train(cfg)  # one Ctrl-C while setting up: nothing trained, nothing written, no abort
    assert result.interrupted and result.exit_code == 130 and result.history == []
    assert not (tmp_path / "tiny" / "last.pt").exists()
    presses[0] = 2
    with pytest.raises(TrainingAborted, match="during set-up; no checkpoint was written") as err:
        engine.train(cfg)
    assert "last.pt" not in str(err.value)

    monkeypatch.setattr(engine, "open_datasets", real_build)
    engine.train(cfg, overwrite=True)
    presses[0] = 2
    monkeypatch.setattr(engine, "open_datasets", build_with_ctrl_c)
    with pytest.raises(TrainingAborted, match=r"last.pt holds epoch 1, step 0 \(global step 1\)"):
        engine.train(cfg, resume=True)
