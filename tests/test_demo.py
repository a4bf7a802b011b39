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


def test_run_demo_tiny(tmp_path, capsys, monkeypatch):
    from covpool.train import _run_folder

    titles = []
    real_plot = _run_folder.plot_curves
    monkeypatch.setattr(_run_folder, "plot_curves", lambda runs, path, title="": titles.append(title) or
                        real_plot(runs, path, title=title))
    rc = run_demo(str(tmp_path), ["progress=false", "epochs=1", "model.name=test_resnet",
                                  "data.img_size=32", "data.batch_size=8",
                                  "data.embedded_train_per_class=2", "data.embedded_val_per_class=1"],
                  seeds=2, backends=False)
    assert rc == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if " mean " in line and " sd " in line]
    assert [line[0] for line in lines] == ["avgpool", "covpool"]
    for line in lines:
        assert 0.0 <= float(line[2].rstrip("%")) <= 100.0 and line[-3] == "s"
    assert "verdict: covpool - avgpool = " in out and "(means of 2 seeds)" in out
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    assert read_rows(tmp_path / "avgpool_seed1" / "metrics.csv")[0]["epoch"] == "1"
    state = torch.load(tmp_path / "covpool_seed0" / "last.pt", weights_only=True)
    assert any(k.startswith("global_pool.") for k in state["state_dict"])  # covariance pooling really in place
    assert state["config"]["seed"] == 0 and torch.load(tmp_path / "covpool_seed1" / "last.pt",
                                                       weights_only=True)["config"]["seed"] == 1
    # curves.png's title names the head and the backend (it named the model only)
    assert titles[:2] == ["avgpool_seed0: test_resnet", "covpool_seed0: test_resnet, head isqrt_cov, backend ns"]


def test_run_heads_demo_tiny(tmp_path, capsys):
    import covpool
    from covpool.demo import heads_demo_config, run_heads_demo

    assert heads_demo_config("bcnn").model.head == "bcnn" and heads_demo_config(None).model.swap_pooling is False
    rc = run_heads_demo(str(tmp_path), ["progress=false", "epochs=1", "model.name=test_resnet",
                                        "data.img_size=32", "data.batch_size=8", "data.embedded_train_per_class=2",
                                        "data.embedded_val_per_class=1"])
    assert rc == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| head")]
    heads = [h for h in covpool.list_heads() if not covpool.get_head(h).tokens_only]
    assert [line.split("|")[1].strip() for line in table] == ["avgpool", *heads]
    widths = {line.split("|")[1].strip(): line.split("|")[6].strip() for line in table}
    assert widths["isqrt_cov"] == "2080" and widths["bcnn"] == "4096" and widths["cbp_ts"] == "8192"  # d = 64
    assert "noise" in out and (tmp_path / "comparison.png").stat().st_size > 1000
    state = torch.load(tmp_path / "cbp_ts" / "last.pt", weights_only=True)
    assert "global_pool.h1" in state["state_dict"]  # the sketch's hashes are in the checkpoint
