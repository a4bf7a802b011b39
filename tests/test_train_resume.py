"""The resume policy and checkpoints: a resumed run equals the uninterrupted one (after an epoch, a kill at any
checkpoint write, a stop between accumulated steps), changes a resume honours or refuses, and damaged,
foreign or old checkpoint files."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from _train_helpers import Killed, assert_same_run, read_rows, tiny_overrides

from covpool.cli import eval_main, train_main
from covpool.train import _run_folder, engine
from covpool.train import checkpoint as ckpt_mod
from covpool.train._resume import check_resume_config, resume_progress
from covpool.train.config import ConfigError, config_to_dict, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second OpenMP thread only slows them down


def test_resume_after_an_epoch_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch, then --resume for the second (weights and metrics identical)."""
    extra = dict(epochs=2)
    straight = load_config(None, tiny_overrides(tmp_path, "straight", **extra))
    engine.train(straight)

    saved = []
    real_save = _run_folder.atomic_save

    def keep_first_epoch(state, path):
        if Path(path).name == "last.pt" and state["epoch"] == 1:
            saved.append(real_save(state, tmp_path / "after_epoch_1.pt"))
        return real_save(state, path)

    monkeypatch.setattr(_run_folder, "atomic_save", keep_first_epoch)
    engine.train(load_config(None, tiny_overrides(tmp_path, "scratch", **extra)))
    monkeypatch.setattr(_run_folder, "atomic_save", real_save)
    assert saved, "no checkpoint after epoch 1"
    # resume from the epoch-1 checkpoint through the command line, taking the config from the checkpoint
    rc = train_main(["--resume", str(saved[0]), "name=resumed", f"output_dir={tmp_path}"])
    assert rc == 0
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    ckpt_mod.atomic_save({"rng": ckpt_mod.rng_state()}, tmp_path / "r.pt")
    first = (random.random(), float(np.random.rand()), torch.rand(2))
    ckpt_mod.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    again = (random.random(), float(np.random.rand()), torch.rand(2))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


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
    real_save = _run_folder.atomic_save
    for k in range(1, len(accs) + bests + 1):  # before each write of the run
        count = [0]

        def killing_save(state, path, k=k):
            count[0] += 1
            if count[0] == k:
                raise Killed
            return real_save(state, path)

        cfg = load_config(None, tiny_overrides(tmp_path, f"kill{k}", epochs=3, optim__lr=0.2))
        monkeypatch.setattr(_run_folder, "atomic_save", killing_save)
        try:
            engine.train(cfg)
        except Killed:
            pass
        monkeypatch.setattr(_run_folder, "atomic_save", real_save)
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
    return [[r[k] for k in keys] for r in read_rows(a / "metrics.csv")] == [[r[k] for k in keys]
                                                                      for r in read_rows(b / "metrics.csv")]


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
    assert check_resume_config(old, config_to_dict(TrainConfig())) == {}
    # a backend schedule leaves the weights as they are: a resume may change it, and the change is listed
    hybrid = TrainConfig()
    hybrid.model.backend_schedule = [[0, "ns"], [1, "svd_pade"]]
    assert check_resume_config(config_to_dict(TrainConfig()), config_to_dict(hybrid)) == {
        "model.backend_schedule": (None, [[0, "ns"], [1, "svd_pade"]])}
    # what a resume may change freely: a (local or hub) pretrained source is not even read
    free = tiny_overrides(tmp_path, epochs=2, max_steps_per_epoch=1, model__pretrained=str(tmp_path / "gone.pth"))
    assert [r["epoch"] for r in engine.train(load_config(None, free), resume=True).history] == [1, 2]


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
        if self.progress.global_step == 2:  # the first step of epoch 2
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
    assert_same_run(tmp_path / "straight", tmp_path / "interrupted")


def _state(epoch: int, step: int, global_step: int, world_size: int) -> dict:
    return {"epoch": epoch, "step_in_epoch": step, "global_step": global_step, "partial": [2.0, 3.0, 8.0],
            "history": [], "best_acc1": -1.0, "best_epoch": 0, "world_size": world_size}


def test_the_position_of_another_number_of_processes_is_mapped_exactly_or_refused():
    """The schedule's position is epoch x this run's steps per epoch + the step in the epoch; a mid-epoch
    step of n processes is n·k batches of all processes together (their shards interleave), so it maps to
    n·k / m steps of m processes when that is whole, and is refused when it is not."""
    same = resume_progress(_state(2, 1, 7, 1), {}, world_size=1, steps_per_epoch=3)
    assert (same.epoch, same.step_in_epoch, same.global_step) == (2, 1, 7)  # unchanged: 2 x 3 + 1
    assert (same.loss_sum, same.correct, same.count) == (2.0, 3.0, 8.0)
    fewer = resume_progress(_state(1, 0, 3, 2), {}, world_size=1, steps_per_epoch=6)
    assert (fewer.step_in_epoch, fewer.global_step) == (0, 6)  # the 2-process run's 3 steps were one epoch
    mid = resume_progress(_state(1, 1, 4, 2), {}, world_size=1, steps_per_epoch=6)
    assert (mid.step_in_epoch, mid.global_step) == (2, 8)  # 2 batches done: 2 steps of one process
    more = resume_progress(_state(1, 2, 8, 1), {}, world_size=2, steps_per_epoch=3)
    assert (more.step_in_epoch, more.global_step) == (1, 4)
    with pytest.raises(ConfigError, match=r"cannot resume mid-epoch \(step 1 of 1 processes\) with 2 processes: "
                                          r"the 1 batches .* are not a whole number of steps of 2 processes"):
        resume_progress(_state(1, 1, 4, 1), {}, world_size=2, steps_per_epoch=3)
    with pytest.raises(ConfigError, match=r"cannot resume mid-epoch \(step 1\) with data.batch_size 8 -> 4"):
        resume_progress(_state(1, 1, 4, 1), {"data.batch_size": (8, 4)}, world_size=1, steps_per_epoch=3)


def test_a_checkpoint_of_two_processes_resumes_in_one_on_the_new_schedule(tmp_path):
    """What 2 processes x batch 4 write after epoch 1 of 24 images (3 steps of 8 images; made here by relabelling
    a one-process run of batch 8, which takes the same steps), resumed by one process of batch 4 for a second
    epoch: the schedule continues at step 6 of 12 and ends at the cosine's end (lr 0), not at step 9 of 12."""
    engine.train(load_config(None, tiny_overrides(tmp_path, "two", epochs=1)))
    path = tmp_path / "two" / "last.pt"
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["global_step"], state["world_size"]) == (1, 3, 1)
    state["world_size"], state["rng"] = 2, state["rng"] * 2
    state["config"]["data"]["batch_size"] = 4
    torch.save(state, path)
    with pytest.warns(UserWarning, match="written by 2 processes, this run has 1"):
        resumed = engine.train(load_config(None, tiny_overrides(tmp_path, "two", epochs=2, data__batch_size=4)),
                               resume=True)
    assert resumed.history[-1]["lr"] == 0.0  # cosine to 0 over the 2 epochs of the new run
    final = torch.load(path, weights_only=True)
    assert (final["epoch"], final["global_step"], final["world_size"]) == (2, 12, 1)

