"""covpool.train.config: keys, overrides and their errors."""
from __future__ import annotations

import pytest
from _train_helpers import REPO

from covpool.cli import main, train_main
from covpool.train.config import ConfigError, TrainConfig, config_to_dict, load_config

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


def test_the_schema_lists_every_key_with_its_rules():
    """config_schema() is the public face of the schema: what --help, the checks and the documentation read."""
    import dataclasses

    from covpool.train.config import config_schema

    keys = {k.key: k for k in config_schema()}
    assert len(keys) > 50 and list(keys)[:2] == ["name", "output_dir"]
    assert set(keys) == {k for k in keys if k.split(".")[0] in ("model", "data", "optim") or "." not in k}
    assert keys["optim.lr"].section == "optim" and keys["optim.lr"].type == "float"
    assert keys["optim.lr"].default == 0.01 and keys["optim.lr"].range == ">= 0"
    assert keys["ema_decay"].range == "in [0, 1)" and keys["clip_grad"].range == "> 0 or null"
    assert keys["optim.sched"].values.startswith("cosine | tanh") and keys["optim.lr"].values == ""
    assert keys["model.covpool"].backends == ("backend",) and "mpa_lya" in keys["model.covpool"].values
    defaults = dataclasses.asdict(TrainConfig())
    for name, k in keys.items():
        node = defaults
        for part in name.split("."):
            node = node[part]
        assert node == k.default, name


def test_registry_values_come_from_the_registries_now(monkeypatch, capsys):
    """A backend registered by your own code is among the values --help and the checks know (the lists were
    written into the help strings, and went stale)."""
    import covpool
    from covpool.linalg import _registry
    from covpool.train.config import config_schema
    from covpool.train.config_checks import check_config

    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    covpool.register_backend("config_probe", lambda a, inverse: a, {}, doc="a backend registered by a test")
    assert "config_probe" in next(k for k in config_schema() if k.key == "model.covpool").values
    assert main(["train", "--help"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  model.zca_options "))
    assert "config_probe" in line
    heads = next(k for k in config_schema() if k.key == "model.head")
    assert heads.values == " | ".join(covpool.list_heads())
    check_config(load_config(None, ["model.name=test_resnet", "model.swap_pooling=true", "data.img_size=64",
                                    "model.covpool.reduced_dim=8", "model.covpool.backend=config_probe"]))


def test_the_mixed_precision_modes_are_spelled_once():
    """The config's amp values, its check, covpool bench --amp and the autocast of training and evaluation all
    read covpool.precision.AMP_MODES."""
    import torch

    from covpool.cli._bench import _bench_parser
    from covpool.precision import AMP_MODES, amp_mode
    from covpool.train.config import config_schema

    amp = next(k for k in config_schema() if k.key == "amp")
    assert amp.values == " | ".join(AMP_MODES) == "none | bf16 | fp16"
    assert next(a for a in _bench_parser()._actions if a.dest == "amp").choices == list(AMP_MODES)
    with pytest.raises(ConfigError, match="amp='bf61' is not a mixed-precision mode .*did you mean 'bf16'"):
        amp.choices.check("amp", "bf61")
    with pytest.raises(ValueError, match="unknown mixed-precision mode 'fp8'"):
        amp_mode("fp8")
    with amp_mode("bf16").autocast(torch.device("cpu")):
        assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.bfloat16
    with amp_mode("none").autocast("cpu"):
        assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.float32
    assert [m.name for m in AMP_MODES.values() if m.scaled] == ["fp16"] and amp_mode("fp16").refusal("cuda") is None


def test_a_runs_folder_is_named_in_one_place(tmp_path):
    from pathlib import Path

    cfg = load_config(None, ["name=a", f"output_dir={tmp_path}"])
    assert cfg.run_dir == Path(tmp_path) / "a" and "run_dir" not in config_to_dict(cfg)
