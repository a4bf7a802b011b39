"""The run folder: one run at a time (the lock), no silent overwrite, temporaries of killed writes removed, and the
summary files brought up to date on resume."""
from __future__ import annotations

import os

import pytest
import torch
from _train_helpers import REPO, Killed, read_rows, tiny_overrides

from covpool.cli import train_main
from covpool.train import RunExistsError, RunLockedError, _run_folder, engine
from covpool.train.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second OpenMP thread only slows them down


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, max_steps_per_epoch=1))
    engine.train(cfg)
    with pytest.raises(RunExistsError, match="--resume"):
        engine.train(cfg)
    assert engine.train(cfg, overwrite=True).final["epoch"] == 1


def test_metrics_csv_short_after_a_kill_is_rewritten_on_resume(tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides(tmp_path, epochs=2, max_steps_per_epoch=1))
    real_write = _run_folder.write_metrics

    def kill_at_last_epoch(history, path):
        if len(history) == 2:
            raise Killed  # after last.pt of the final epoch, before its metrics row
        return real_write(history, path)

    monkeypatch.setattr(_run_folder, "write_metrics", kill_at_last_epoch)
    with pytest.raises(Killed):
        engine.train(cfg)
    monkeypatch.setattr(_run_folder, "write_metrics", real_write)
    run = tmp_path / "tiny"
    assert len(read_rows(run / "metrics.csv")) == 1 and torch.load(run / "last.pt", weights_only=True)["epoch"] == 2
    result = engine.train(cfg, resume=True)  # nothing left to train: only the outputs are brought up to date
    assert len(result.history) == 2 and [r["epoch"] for r in read_rows(run / "metrics.csv")] == ["1", "2"]


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


def test_a_second_run_in_the_same_folder_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, capsys):
    cfg = load_config(None, tiny_overrides(tmp_path, max_steps_per_epoch=1))
    run = tmp_path / "tiny"
    holder = _run_folder.RunLock(run)  # what a live concurrent run holds
    assert holder.acquire() is None
    with pytest.raises(RunLockedError, match=rf"{run} is in use by a run in progress \(pid {os.getpid()} on "):
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


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = _run_folder.RunLock(tmp_path / "run")
    with pytest.warns(UserWarning, match=r"cannot lock .*\.lock .*No locks available"):
        assert lock.acquire() is None
    lock.release()
    assert not (tmp_path / "run" / ".lock").exists()


def test_config_yaml_is_written_atomically(tmp_path, monkeypatch):
    """config.yaml was the one file of a run folder written in place: a failed write (here fsync's ENOSPC)
    now names the file and leaves the previous one whole."""
    import errno

    import yaml

    from covpool.train._dist import DistContext

    folder = _run_folder.RunFolder(tmp_path / "run", DistContext(0, 1, 0, torch.device("cpu")))
    folder.path.mkdir()
    folder.write_config({"name": "run", "epochs": 1})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=r"could not write .*config\.yaml: No space left on device"):
        folder.write_config({"name": "run", "epochs": 2})
    assert yaml.safe_load((folder.path / "config.yaml").read_text()) == {"name": "run", "epochs": 1}
    assert sorted(p.name for p in folder.path.iterdir()) == ["config.yaml"]


def test_the_abort_message_maps_last_pt_rather_than_reading_its_weights(tmp_path, monkeypatch):
    """saved_work (the message of an abort or a failed collective) reads three counters: it maps the
    checkpoint (torch.load(mmap=True)), so only the pages of the small entries are read, not every weight."""
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"epoch": 2, "step_in_epoch": 3, "global_step": 11, "state_dict": {"w": torch.zeros(1000)}},
               run / "last.pt")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs) or real_load(*args, **kwargs))
    assert _run_folder.saved_work(run) == f"{run / 'last.pt'} holds epoch 2, step 3 (global step 11); continue " \
                                          "with --resume"
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]
    (run / "last.pt").write_bytes(b"not a checkpoint")
    assert _run_folder.saved_work(run).endswith("holds the last saved state; continue with --resume")
