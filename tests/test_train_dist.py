"""Runs under torchrun: two gloo processes, gradient accumulation across them, and a frozen rank ending the job."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_helpers import REPO, read_rows, rel_diff, tiny_overrides, weight_update

from covpool.train import DistributedFailure, _dist, _run_folder, engine
from covpool.train.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second OpenMP thread only slows them down


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
    assert len(read_rows(run / "metrics.csv")) == 2
    # resumed by one process for a third epoch: 3 steps of 8 images on the 3-epoch schedule of one process, so the
    # schedule continues at step 2 x 3 = 6 (not at the two processes' step 2) and ends at the cosine's end
    with pytest.warns(UserWarning, match="written by 2 processes, this run has 1"):
        resumed = engine.train(load_config(None, [*over, "epochs=3"]), resume=True)
    assert [r["lr"] for r in resumed.history][-1] == 0.0
    assert torch.load(run / "last.pt", weights_only=True)["global_step"] == 9


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
    step = weight_update(weights["one"], weights["init"])
    assert rel_diff(weight_update(weights["ddp"], weights["init"]), step) < 1e-4


_FROZEN_RANK = """
import sys, time
from covpool.train import DistributedFailure, engine
from covpool.train.config import load_config

real_step = engine._Trainer._train_step
reached = []

def step(self, images, target, stop):
    if self.progress.global_step == 1:
        reached.append(time.perf_counter())
        if self.ctx.rank == 1:
            time.sleep(float(sys.argv[1]))  # a frozen process (deadlocked data loader, hung file system, ...)
    return real_step(self, images, target, stop)

engine._Trainer._train_step = step
try:
    engine.train(load_config(None, sys.argv[2:]))
except DistributedFailure as err:
    print(f"waited {time.perf_counter() - reached[0]:.1f} s; DistributedFailure:", err, flush=True)
    sys.exit(3)
"""


def test_dist_timeout_plumbing(monkeypatch):

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


def test_a_failure_message_names_the_run_folder_as_it_is(tmp_path, monkeypatch):
    """The saved-work sentence is quoted as is: the abort message said `Runs/ddp/last.pt` for `runs/ddp`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = Path("runs") / "ddp"
    run.mkdir(parents=True)
    torch.save({"epoch": 1, "step_in_epoch": 2, "global_step": 5}, run / "last.pt")
    err = _dist.collective_failure(RuntimeError("[gloo] Timed out waiting 2000ms\nmore"), 2.0,
                                   _run_folder.saved_work(run))
    assert isinstance(err, DistributedFailure)
    assert str(err).startswith("rank 0 of 2: a collective operation failed within dist_timeout=2 s ([gloo] Timed out "
                               "waiting 2000ms); rank 1 is frozen or died (see its log); runs/ddp/last.pt holds "
                               "epoch 1, step 2 (global step 5); continue with --resume. If steps")
