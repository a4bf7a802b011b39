"""covpool demo: its configs are the shipped demo config, and a tiny demo runs end to end."""
from __future__ import annotations

import pytest
import torch
from _train_helpers import REPO, read_rows

from covpool.demo import demo_config, run_demo
from covpool.train.config import config_diff, config_to_dict, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second OpenMP thread only slows them down


def test_demo_runs_are_the_shipped_demo_config_and_their_variant(tmp_path, monkeypatch):
    """configs/demo.yaml is the one copy of the demo's settings: the average-pooling run is that file, the
    covariance-pooling run that file plus its variant's keys, whatever folder the demo runs from."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("epochs: 99\n")  # a local file named like the shipped config is not read
    shipped = load_config(REPO / "configs" / "demo.yaml")
    assert config_to_dict(shipped) == config_to_dict(demo_config("avgpool"))
    cov = demo_config("covpool", output_dir="elsewhere", extra=["epochs=2"])
    assert [key for key, _, _ in config_diff(shipped, cov)] == [
        "name", "output_dir", "epochs", "model.swap_pooling", "model.covpool.reduced_dim", "model.covpool.backend",
        "model.covpool.last_stride"]
    assert cov.model.covpool == {"reduced_dim": 64, "backend": "ns", "last_stride": 1} and cov.epochs == 2


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
    assert read_rows(tmp_path / "avgpool" / "metrics.csv")[0]["epoch"] == "1"
    state = torch.load(tmp_path / "covpool" / "last.pt", weights_only=True)
    assert any(k.startswith("global_pool.") for k in state["state_dict"])  # covariance pooling really in place
