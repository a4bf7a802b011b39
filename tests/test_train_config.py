"""covpool.train.config: keys, overrides and their errors."""
from __future__ import annotations

import pytest
from _train_helpers import REPO

from covpool.cli import train_main
from covpool.train.config import ConfigError, TrainConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second OpenMP thread only slows them down


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


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "", "c:\\\\x"])
def test_a_run_name_is_a_folder_name_not_a_path(name):
    """name=../escape wrote the run outside output_dir: a run name names one folder inside it."""
    with pytest.raises(ConfigError, match=r"config key 'name' must be a folder name .*put the path in output_dir"):
        load_config(None, [f"name={name!r}"] if name else ["name=''"])
    with pytest.raises(ConfigError, match="must be a folder name"):
        TrainConfig(name=name)
    assert load_config(None, ["name=cub-2026.05_run 2", "output_dir=../elsewhere/runs"]).name == "cub-2026.05_run 2"
