"""The command line: ``covpool train | eval`` argument handling, config files and overrides, error lines.

No test here trains: ``covpool.train.engine.train`` is replaced by a recorder, so these check what the
command line hands to the library, and that every input mistake is one ``error:`` line with exit status 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import covpool
from covpool.cli import main
from covpool.train import engine, evaluation
from covpool.train.checkpoint import with_checksums
from covpool.train.config import ConfigError, ConfigNotFoundError, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runs(monkeypatch):
    """Calls of ``engine.train`` made by the command line, recorded instead of run."""
    calls = []

    def fake_train(cfg, resume=None, overwrite=False, **kwargs):
        calls.append(SimpleNamespace(cfg=cfg, resume=resume, overwrite=overwrite))
        return SimpleNamespace(interrupted=False, exit_code=0)

    monkeypatch.setattr(engine, "train", fake_train)
    return calls


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: base\nepochs: 5\noptim:\n  lr: 0.1\n")
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- overrides and flags in any order -----------------------------------------------------------------------
def test_overrides_before_between_and_after_flags(runs, config):
    assert main(["train", "--config", str(config), "epochs=1", "--overwrite", "name=x", "optim.lr=0.5"]) == 0
    (call,) = runs
    assert call.cfg.epochs == 1 and call.cfg.name == "x" and call.cfg.optim.lr == 0.5
    assert call.overwrite is True and not call.resume
    assert main(["train", "epochs=2", "--config", str(config)]) == 0
    assert runs[1].cfg.epochs == 2 and runs[1].cfg.name == "base"


def test_resume_flag_never_takes_an_override_as_checkpoint(runs, config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "epochs=2").write_text("a file named like an override is still an override")
    assert main(["train", "--config", str(config), "--resume", "epochs=2"]) == 0
    assert runs[0].resume is True and runs[0].cfg.epochs == 2
    assert main(["train", "--resume", "epochs=3", "--config", str(config)]) == 0
    assert runs[1].resume is True and runs[1].cfg.epochs == 3


def _checkpoint(tmp_path: Path, name: str = "last.pt") -> Path:
    path = tmp_path / name
    config = config_to_dict(load_config(None, ["name=stored", "epochs=4"]))
    torch.save(with_checksums({"config": config, "state_dict": {"w": torch.zeros(2)}}), path)
    return path


def test_resume_from_checkpoint_takes_its_config_with_overrides(runs, tmp_path):
    ckpt = _checkpoint(tmp_path)
    assert main(["train", "--resume-from", str(ckpt), "epochs=6"]) == 0
    # the checkpoint read for its config is the one handed on to continue (read once)
    assert runs[0].resume.path == ckpt and runs[0].resume.state["config"]["name"] == "stored"
    assert runs[0].cfg.name == "stored" and runs[0].cfg.epochs == 6
    # 0.1.0's spelling, `--resume CKPT`, still means the same when CKPT is a checkpoint file
    assert main(["train", "--resume", str(ckpt), "epochs=7"]) == 0
    assert runs[1].resume.path == ckpt and runs[1].cfg.epochs == 7


def test_resume_from_with_a_config_uses_the_config(runs, config, tmp_path):
    ckpt = _checkpoint(tmp_path, "other.pt")
    assert main(["train", "--config", str(config), "--resume-from", str(ckpt)]) == 0
    assert runs[0].resume == str(ckpt) and runs[0].cfg.name == "base"


@pytest.mark.parametrize("argv, message", [
    (["--resume"], "give --config too"),
    ([], "--config is required"),
    (["--config", "{config}", "--resume", "--overwrite"], "not allowed with"),
    (["--config", "{config}", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--config", "{config}", "epochs"], "overrides look like key=value"),
    (["--config", "{config}", "--resume", "runs/x"], "overrides look like key=value"),
    (["--resume-from", "{tmp}/missing.pt"], "missing.pt' not found"),
])
def test_command_line_mistakes_are_one_error_line(runs, capsys, config, tmp_path, argv, message):
    argv = [a.format(config=config, tmp=tmp_path) for a in argv]
    assert main(["train", *argv]) == 2
    assert message in one_error_line(capsys)
    assert not runs


# -- config mistakes: one `error:` line, status 2 -------------------------------------------------------------
@pytest.mark.parametrize("text, overrides, message", [
    ("epochs: 2\nmodel:\n  nmae: resnet18\n", [], "unknown config key 'model.nmae'"),
    ("epochs: 2\n", ["optim.lrr=0.1"], "unknown config key 'optim.lrr' (command-line override)"),
    ("epochs: two\n", [], "'epochs' must be int"),
    ("epochs: 2\n", ["epochs=2.5"], "'epochs' must be int"),
    ("epochs: [2\n", [], "is not valid YAML"),
    ("epochs: 1\noptim: {lr: 0.1}\nepochs: 2\n", [], "found the key 'epochs' twice at line 3"),
    ("- epochs: 2\n- name: x\n", [], "its top level is a list"),
    ("just a string\n", [], "its top level is a str"),
    ("- epochs: 2\n", ["epochs=3"], "its top level is a list"),
    ("model: 3\n", [], "section 'model'"),
    ("epochs: 2\n", ["epochs.x=1"], "'epochs' is not a section"),
    ("epochs: 2\n", ["data.scale=[0.5"], "the value is not valid YAML"),
    ("epochs: 2\n", ["=3"], "look like key=value"),
    ("epochs: 2\n", ["model=resnet18"], "section 'model'"),
    ("epochs: 2\n", ["model.covpool=3"], "'model.covpool' must be dict"),
])
def test_config_mistakes_are_one_error_line(runs, capsys, tmp_path, text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), *overrides]) == 2
    line = one_error_line(capsys)
    assert message in line, line
    assert not runs


def test_unreadable_config_files_are_one_error_line(runs, capsys, tmp_path):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml' not found" in one_error_line(capsys)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert main(["train", "--config", str(latin1)]) == 2
    assert "latin1.yaml' is not UTF-8" in one_error_line(capsys)
    (tmp_path / "mine.yaml").write_text("epochs: 1\n")
    assert main(["train", "--config", str(tmp_path)]) == 2  # a folder: said so, with the configs it holds
    assert f"config {str(tmp_path)!r} is a folder, not a config file (it holds latin1.yaml, mine.yaml)" in \
        one_error_line(capsys)


def test_top_level_list_error_names_the_file(tmp_path):
    path = tmp_path / "listed.yaml"
    path.write_text("- name: a\n- name: b\n")
    with pytest.raises(ConfigError, match=r"listed\.yaml.*mapping.*top level is a list"):
        load_config(path)


def test_missing_config_is_both_config_and_file_not_found_error(tmp_path):
    with pytest.raises(ConfigNotFoundError) as err:
        load_config(tmp_path / "missing.yaml")
    assert isinstance(err.value, ConfigError) and isinstance(err.value, FileNotFoundError)


def test_config_mistake_in_a_real_process_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "covpool", "train", "--config", str(bad), "epochs=1", "--overwrite"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "top level is a list" in lines[0], out.stderr


# -- run-time errors -----------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to simulate a full disk")
def test_full_disk_reports_the_real_os_error(monkeypatch, capsys, config):
    def train_on_full_disk(cfg, resume=None, overwrite=False, **kwargs):
        with open("/dev/full", "wb") as f:  # torch.save raises "unexpected pos ..." from the real ENOSPC
            torch.save({"w": torch.zeros(100_000)}, f)

    monkeypatch.setattr(engine, "train", train_on_full_disk)
    assert main(["train", "--config", str(config)]) == 1
    assert "No space left on device" in one_error_line(capsys)


def test_covpool_errors_are_lines_and_foreign_errors_keep_their_traceback(monkeypatch, capsys, config):
    def non_finite(cfg, **kwargs):
        raise engine.NonFiniteLossError("non-finite loss at step 3")

    monkeypatch.setattr(engine, "train", non_finite)
    assert main(["train", "--config", str(config)]) == 1
    assert one_error_line(capsys) == "error: non-finite loss at step 3"

    def bug(cfg, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(engine, "train", bug)
    with pytest.raises(ZeroDivisionError):
        main(["train", "--config", str(config)])


def test_ctrl_c_during_set_up_does_not_name_a_missing_checkpoint(monkeypatch, capsys, config, tmp_path):
    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train", interrupted)
    assert main(["train", "--config", str(config), f"output_dir={tmp_path}"]) == 130
    line = one_error_line(capsys)
    assert "no checkpoint was written" in line and "last.pt" not in line


# -- covpool itself ------------------------------------------------------------------------------------------
def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"covpool {covpool.__version__}"
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--resume-from" in out and "optim.lr" in out


def _console_script() -> str:
    """The ``covpool`` console script's target as pyproject.toml declares it (``module:function``)."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("\n[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    (line,) = [line for line in section.splitlines() if line.startswith("covpool =")]
    return line.split("=", 1)[1].strip().strip('"')


def test_help_and_version_answer_without_importing_torch():
    """`covpool --help` / `--version` took 5-16 s because the console script imported the package (torch,
    timm); its entry point now answers both before any of that is imported."""
    module, function = _console_script().split(":")
    code = (f"import sys; from {module} import {function} as main\n"
            "for argv in ([], ['--help'], ['-h'], ['--version'], ['-V']):\n"
            "    assert main(argv) == 0\n"
            "print(sorted(m for m in ('torch', 'timm', 'covpool') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "[]" and f"covpool {covpool.__version__}" in lines and "commands:" in lines


def test_the_console_script_and_main_give_the_same_answers(capsys):
    import _covpool_cli
    from covpool import cli

    assert list(cli.RUNNERS) == list(_covpool_cli.COMMANDS)  # every command has a runner and a help, in one order
    assert main(["--help"]) == 0
    assert capsys.readouterr().out == _covpool_cli.usage() + "\n"
    assert _covpool_cli.version() == covpool.__version__
    monkeypatched = []
    real = cli.main
    try:
        cli.main = lambda argv: monkeypatched.append(argv) or 7
        assert _covpool_cli.main(["bench", "--quick"]) == 7 and monkeypatched == [["bench", "--quick"]]
    finally:
        cli.main = real


_SPHINX = ("``", ":func:", ":mod:", ":class:", ":data:", ":meth:")


@pytest.mark.parametrize("argv", [["bench", "--help"], ["demo", "--help"], ["demo", "--heads", "--help"],
                                  ["demo", "--hybrid", "--help"], ["--help"]])
def test_help_texts_are_plain_and_complete(capsys, argv):
    """No Sphinx markup in what argparse prints, and each paragraph of the description ends a sentence
    (`bench --help` was the first line of a docstring, cut after "and, with")."""
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert not [mark for mark in _SPHINX if mark in out], out
    if argv[-1] == "--help" and len(argv) > 1:
        description = out.split("\n\n", 1)[1].split("\npositional arguments:", 1)[0].split("\noptions:", 1)[0]
        paragraphs = [p for p in description.split("\n\n") if p.strip()]
        assert paragraphs and all(p.rstrip()[-1] in ".:)" for p in paragraphs), description


def test_list_configs_shows_each_configs_whole_first_paragraph(capsys):
    from covpool.cli._train import _config_summary
    from covpool.train.config import shipped_configs

    text = "# A config whose description\n# runs over two lines.\n#   covpool train --config x\nname: x\n"
    assert _config_summary(text) == "A config whose description runs over two lines."
    assert main(["train", "--list-configs"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, path in shipped_configs().items():
        about = _config_summary(path.read_text())
        assert about.endswith((".", ")")) and f"{name} {about}" in out  # cifar10_resnet18_zca was cut mid-sentence


# -- covpool bench / covpool demo: every mistake one `error:` line, exit 2, before anything is measured -------
def _bench_mistakes(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    out = str(tmp_path / "out")
    return [
        (["--models", "resnet18", "--device", "tpu"], "--device 'tpu' is not a device torch knows"),
        (["--quick", "--device", "tpu"], "--device 'tpu' is not a device torch knows"),
        (["--models", "resnet18", "--device", "cuda"], "torch sees no CUDA device"),
        (["--quick", "--device", "cuda:1"], "torch sees no CUDA device"),
        (["--models", "resnet18_isqrt", "--out", out], "resnet18_isqrt is one of covpool's own models"),
        (["--models", "so_vit_7", "--out", out], "so_vit_7 is one of covpool's own models"),
        (["--models", "resnet18", "--out", str(a_file / "x")], f"--out {a_file / 'x'}: cannot create that folder"),
        (["--quick", "--out", str(a_file)], f"--out {a_file}: cannot create that folder"),
        (["--models", "resnet18", "--img-size", "16", "--batch", "1", "--steps", "1", "--out", out],
         "resnet18 cannot take a training step on a batch of 1 at 16x16"),
        (["--models", "resnet18", "--inverse"], "--inverse belongs to the backend benchmark"),
        (["--models", "resnet18", "--dims", "64"], "--dims belongs to the backend benchmark"),
        (["--quick", "--amp", "bf16"], "--amp applies to --models only"),
        (["--models", "resnet5O"], "unknown timm model(s) ['resnet5O']"),
        (["--quick", "--backends", "nope"], "unknown variant(s) ['nope']"),
        (["--models", "resnet18", "--batch", "0"], "--batch must be at least 1"),
    ]


def test_bench_mistakes_are_one_error_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    wrong = []
    for argv, message in _bench_mistakes(tmp_path):
        rc = main(["bench", *argv])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        if not (rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
                and "| " not in captured.out):  # nothing measured
            wrong.append((argv, rc, captured.err[-500:]))
    assert not wrong, "\n".join(map(str, wrong))
    assert not (tmp_path / "out" / "models.csv").exists()


@pytest.fixture
def demo_runs(monkeypatch):
    """Calls of ``covpool.train.train`` made by the demo, recorded instead of trained: each returns a result
    whose final validation accuracy is ``accuracy[(name, seed)]`` (default 50), or an interrupted one."""
    import covpool.train
    from covpool import demo

    calls, accuracy, interrupt = [], {}, set()

    def fake_train(cfg, resume=None, overwrite=False, **kwargs):
        calls.append(cfg)
        key = (cfg.name.split("_seed")[0], cfg.seed)
        acc = accuracy.get(key, 50.0)
        row = {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "train_acc": acc, "val_acc1": acc,
               "train_img_per_s": 10.0}
        stopped = key in interrupt
        return SimpleNamespace(history=[] if stopped else [row], final={} if stopped else row, best_acc1=acc,
                               best_epoch=1, interrupted=stopped, exit_code=143 if stopped else 0,
                               run_dir=cfg.run_dir,
                               model=SimpleNamespace(head_hidden_size=8, num_features=8))

    monkeypatch.setattr(covpool.train, "train", fake_train)
    monkeypatch.setattr(demo, "compare_backends", lambda: print("(backend table)"))
    return SimpleNamespace(calls=calls, accuracy=accuracy, interrupt=interrupt)


def test_demo_mistakes_are_one_error_line_before_anything_runs(capsys, demo_runs, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    out = ["--output-dir", str(tmp_path / "runs")]
    table = [
        ([*out, "optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
        ([*out, "epochs=0"], "config key 'epochs' must be >= 1, got 0"),
        (["--output-dir", str(a_file / "runs")], f"--output-dir {a_file / 'runs'}: cannot create that folder"),
        (["--heads", *out, "model.head=sot"], "model.head=sot pools transformer tokens"),
        (["--heads", *out, "model.head=bcnnn"], "bcnn"),
        ([*out, "model.covpool.backend=eigg"], "eig"),
        (["--hybrid", *out, "epochs=0"], "config key 'epochs' must be >= 1"),
        (["--hybrid", "--switch", "0", *out], "--switch must be at least 1"),
        (["--seeds", "0", *out], "--seeds must be at least 1"),
        (["--skip-training", "epochs=1"], "--skip-training prints only the backend table"),
        (["--hybrid", "--heads"], "--hybrid and --heads are two demos"),
        ([*out, "stray"], "unexpected argument 'stray'"),
    ]
    wrong = []
    for argv, message in table:
        rc = main(["demo", *argv])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        if not (rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
                and "backend table" not in captured.out):
            wrong.append((argv, rc, captured.err[-500:]))
    assert not wrong, "\n".join(map(str, wrong))
    assert demo_runs.calls == []


def test_demo_trains_each_variant_over_seeds_and_says_whether_the_difference_exceeds_the_spread(
        capsys, demo_runs, tmp_path):
    demo_runs.accuracy.update({("avgpool", 0): 80.0, ("avgpool", 1): 82.0, ("avgpool", 2): 84.0,
                               ("covpool", 0): 81.0, ("covpool", 1): 83.0, ("covpool", 2): 82.0})
    assert main(["demo", "--output-dir", str(tmp_path), "--no-progress", "epochs=1",
                 "model.covpool.backend=eig"]) == 0
    seen = [(c.output_dir, c.name, c.seed, c.model.swap_pooling, c.model.covpool.get("backend"))
            for c in demo_runs.calls]
    assert seen == [(str(tmp_path), "avgpool_seed0", 0, False, None), (str(tmp_path), "covpool_seed0", 0, True, "eig"),
                    (str(tmp_path), "avgpool_seed1", 1, False, None), (str(tmp_path), "covpool_seed1", 1, True, "eig"),
                    (str(tmp_path), "avgpool_seed2", 2, False, None), (str(tmp_path), "covpool_seed2", 2, True, "eig")]
    assert all(c.epochs == 1 and c.progress is False for c in demo_runs.calls)
    out = capsys.readouterr().out
    assert out.index("(backend table)") < out.index("== avgpool, seed 0")
    assert "mean  82.00%  sd  2.00  range 80.00-84.00" in out and "mean  82.00%  sd  1.00  range 81.00-83.00" in out
    assert ("verdict: covpool - avgpool = +0.00 points (means of 3 seeds), within the seed-to-seed spread (sd 2.00 "
            "and 1.00)") in out and "covpool was ahead in 2 of 3 seeds" in out
    assert (tmp_path / "comparison.png").stat().st_size > 1000

    demo_runs.calls.clear()
    demo_runs.accuracy.update({("avgpool", 3): 83.0, ("covpool", 1): 90.0, ("covpool", 2): 91.0, ("covpool", 3): 92.0})
    assert main(["demo", "--output-dir", str(tmp_path), "--seeds", "3", "seed=1"]) == 0
    assert [c.seed for c in demo_runs.calls] == [1, 1, 2, 2, 3, 3]  # from the config's seed on
    out = capsys.readouterr().out
    assert "larger than the seed-to-seed spread" in out and "covpool is ahead at this budget" in out


def test_demo_stops_at_an_interrupted_run(capsys, demo_runs, tmp_path):
    """A run stopped by a signal ends the demo with its status (it went on to the next run, then crashed on
    the empty history with a KeyError)."""
    demo_runs.interrupt.add(("avgpool", 0))
    assert main(["demo", "--output-dir", str(tmp_path), "--seeds", "2"]) == 143
    assert len(demo_runs.calls) == 1 and "the demo stops here" in capsys.readouterr().out


def test_head_options_reach_the_heads_demo(capsys, demo_runs, tmp_path):
    """`covpool demo --heads model.head=bcnn` trains average pooling and that head (it stopped with "only used
    with model.swap_pooling=true"); model.covpool.* options reach every head run and not the average pooling."""
    assert main(["demo", "--heads", "--output-dir", str(tmp_path), "model.head=bcnn",
                 "model.covpool.reduced_dim=32"]) == 0
    assert [(c.name, c.model.swap_pooling, c.model.head, c.model.covpool.get("reduced_dim"))
            for c in demo_runs.calls] == [("avgpool", False, "isqrt_cov", None), ("bcnn", True, "bcnn", 32)]
    demo_runs.calls.clear()
    assert main(["demo", "--heads", "--output-dir", str(tmp_path), "model.head=[mpn_cov, dropcov]"]) == 0
    assert [c.name for c in demo_runs.calls] == ["avgpool", "mpn_cov", "dropcov"]
    assert "| dropcov |" in capsys.readouterr().out


def test_eval_overrides_after_flags_and_error_lines(monkeypatch, capsys, tmp_path):
    seen = {}

    def fake_evaluate(checkpoint, cfg, use_ema=False, split="val", out_dir=None):
        seen.update(checkpoint=checkpoint, cfg=cfg, ema=use_ema, split=split, out_dir=out_dir)
        return evaluation.EvalResult({"loss": 1.0, "acc1": 50.0, "acc5": 90.0, "count": 8, "mean_class_acc": 50.0,
                                      "split": split}, ["a", "b"], torch.tensor([[2, 2], [2, 2]]), [],
                                     {"target": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])})

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    ckpt = _checkpoint(tmp_path)
    assert main(["eval", "--checkpoint", str(ckpt), "epochs=9", "--ema", "name=e", "--split", "test"]) == 0
    assert seen["cfg"].epochs == 9 and seen["cfg"].name == "e" and seen["ema"] is True and seen["split"] == "test"
    assert seen["out_dir"] == tmp_path / "eval_last_test_ema"
    out = capsys.readouterr().out
    assert "test loss 1.0000  top-1 50.00%  top-5 90.00%  mean per-class 50.00%  (8 images, 2 classes)" in out
    assert "lowest per-class accuracy: a 50.0% (2/4), b 50.0% (2/4)" in out
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in one_error_line(capsys)
    assert main(["eval"]) == 2
    assert "--checkpoint" in one_error_line(capsys)


# -- shipped configs -----------------------------------------------------------------------------------------
def test_shipped_configs_are_one_copy_inside_the_package():
    from covpool.train.config import shipped_configs

    shipped = shipped_configs()
    package_dir = Path(covpool.__file__).parent / "configs"
    assert set(shipped) == {p.stem for p in package_dir.glob("*.yaml")} and "cub200_resnet50_isqrt" in shipped
    # the repository's configs/ (what the documented commands use) is the package's folder, not a copy
    assert (REPO / "configs").resolve() == (REPO / "covpool" / "configs").resolve()
    for path in shipped.values():
        load_config(path)  # every shipped config is valid


@pytest.mark.parametrize("given", ["cub200_resnet50_isqrt", "cub200_resnet50_isqrt.yaml",
                                   "configs/cub200_resnet50_isqrt.yaml"])
def test_shipped_config_by_name_from_any_folder(runs, tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name resolves inside the package
    assert main(["train", "--config", given, "data.root=/data/cub"]) == 0
    expected = load_config(Path(covpool.__file__).parent / "configs" / "cub200_resnet50_isqrt.yaml",
                           ["data.root=/data/cub"])
    assert config_to_dict(runs[0].cfg) == config_to_dict(expected)


def test_local_config_wins_over_a_shipped_name(runs, tmp_path, monkeypatch):
    from covpool.train.config import resolve_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.yaml").write_text("name: mine\n")
    assert main(["train", "--config", "demo.yaml"]) == 0
    assert runs[0].cfg.name == "mine"
    assert resolve_config("demo.yaml") == Path("demo.yaml")
    assert resolve_config("demo").parent == Path(covpool.__file__).parent.resolve() / "configs"


def test_unknown_config_name_lists_the_shipped_ones(runs, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "cub200_resnet50"]) == 2
    line = one_error_line(capsys)
    assert "'cub200_resnet50' not found" in line and "cub200_resnet50_isqrt" in line and "demo" in line
    assert main(["train", "--config", "elsewhere/demo.yaml"]) == 2  # a path, not a name: no fallback
    assert "not found" in one_error_line(capsys)


def test_list_configs(capsys):
    from covpool.train.config import shipped_configs

    assert main(["train", "--list-configs"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in shipped_configs()) and "CUB-200-2011" in out


@pytest.mark.slow
def test_wheel_ships_the_configs(wheel, tmp_path):
    """The built wheel holds every config once, inside the package, and an install resolves them by name."""
    import zipfile

    from covpool.train.config import shipped_configs

    yamls = sorted(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml"))
    assert yamls == [f"covpool/configs/{name}.yaml" for name in shipped_configs()]
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = "import covpool.train.config as c; print(c.resolve_config('demo')); print(c.load_config('demo').name)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(tmp_path / "site" / "covpool" / "configs" / "demo.yaml"), "avgpool"]


# -- ranges of numeric keys ----------------------------------------------------------------------------------
def _leaf_fields(cls=None, prefix=""):
    import dataclasses
    import typing

    from covpool.train.config import TrainConfig

    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, hints[f.name]


def test_every_numeric_key_has_a_range_shown_in_help(capsys):
    import typing

    numeric = []
    for key, f, hint in _leaf_fields():
        options = set(typing.get_args(hint) or (hint,)) - {type(None)}
        if options & {int, float}:
            assert "interval" in f.metadata, f"{key} has no range"
            numeric.append(key)
    assert len(numeric) >= 25
    assert main(["train", "--help"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    for key in numeric:
        assert any(w in lines[key] for w in ("; >= ", "; > ", "; in ", "numbers, each")), lines[key]


@pytest.mark.parametrize("override, shown", [
    ("clip_grad=-1", "'clip_grad' must be > 0 or null, got -1.0"),
    ("clip_grad=0", "'clip_grad' must be > 0 or null"),
    ("ema_decay=2", "'ema_decay' must be in [0, 1), got 2.0"),
    ("ema_decay=1", "'ema_decay' must be in [0, 1)"),
    ("mixup=-1", "'mixup' must be >= 0"),
    ("cutmix=-0.5", "'cutmix' must be >= 0"),
    ("label_smoothing=1", "'label_smoothing' must be in [0, 1)"),
    ("max_val_steps=0", "'max_val_steps' must be >= 1 or null, got 0"),
    ("max_steps_per_epoch=0", "'max_steps_per_epoch' must be >= 1 or null"),
    ("epochs=0", "'epochs' must be >= 1"),
    ("seed=-1", "'seed' must be in [0, 4294967295]"),
    ("seed=4294967296", "'seed' must be in [0, 4294967295]"),
    ("optim.lr=-0.1", "'optim.lr' must be >= 0"),
    ("optim.lr=.inf", "'optim.lr' must be >= 0, got inf"),
    ("optim.lr=.nan", "'optim.lr' must be >= 0, got nan"),
    ("optim.momentum=1", "'optim.momentum' must be in [0, 1)"),
    ("optim.weight_decay=-1e-4", "'optim.weight_decay' must be >= 0"),
    ("optim.head_lr_mult=-1", "'optim.head_lr_mult' must be >= 0"),
    ("optim.warmup_epochs=-1", "'optim.warmup_epochs' must be >= 0"),
    ("optim.warmup_lr=-1", "'optim.warmup_lr' must be >= 0"),
    ("optim.min_lr=-1", "'optim.min_lr' must be >= 0"),
    ("optim.decay_epochs=0", "'optim.decay_epochs' must be > 0"),
    ("optim.decay_rate=0", "'optim.decay_rate' must be in (0, 1]"),
    ("optim.decay_milestones=[60, 30]", "'optim.decay_milestones' must be ascending numbers, each >= 0"),
    ("optim.decay_milestones=[-1]", "'optim.decay_milestones' must be ascending numbers, each >= 0"),
    ("data.batch_size=0", "'data.batch_size' must be >= 1"),
    ("data.val_batch_size=0", "'data.val_batch_size' must be >= 1 or null"),
    ("data.img_size=0", "'data.img_size' must be >= 1"),
    ("data.workers=-1", "'data.workers' must be >= 0"),
    ("data.hflip=1.5", "'data.hflip' must be in [0, 1]"),
    ("data.re_prob=-0.1", "'data.re_prob' must be in [0, 1]"),
    ("data.color_jitter=-1", "'data.color_jitter' must be >= 0"),
    ("data.crop_pct=0", "'data.crop_pct' must be in (0, 1] or null"),
    ("data.scale=[0.5]", "'data.scale' must be 2 ascending numbers, each in (0, 1] or null"),
    ("data.scale=[1.0, 0.5]", "'data.scale' must be 2 ascending numbers"),
    ("data.scale=[0, 1]", "'data.scale' must be 2 ascending numbers"),
    ("data.embedded_train_per_class=0", "'data.embedded_train_per_class' must be >= 1"),
    ("data.embedded_val_per_class=0", "'data.embedded_val_per_class' must be >= 1"),
    ("model.num_classes=0", "'model.num_classes' must be >= 1 or null"),
])
def test_out_of_range_values_are_config_errors(runs, capsys, override, shown):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert shown in str(err.value)
    assert main(["train", "--config", "demo", override]) == 2  # and one error line on the command line
    line = one_error_line(capsys)
    assert shown in line and "demo.yaml" not in line  # an override is not blamed on the file
    assert not runs


def test_out_of_range_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "neg.yaml"
    path.write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"'optim.lr' must be >= 0, got -1.0 in .*neg\.yaml"):
        load_config(path)


def test_boundary_values_are_accepted():
    cfg = load_config(None, ["clip_grad=1e-6", "ema_decay=0", "mixup=0", "max_val_steps=1", "max_steps_per_epoch=1",
                             "epochs=1", "seed=4294967295", "optim.lr=0", "optim.momentum=0", "optim.decay_rate=1",
                             "data.workers=0", "data.hflip=1", "data.scale=[0.08, 1]", "data.crop_pct=1",
                             "optim.decay_milestones=[]", "clip_grad=null", "max_val_steps=null"])
    assert cfg.ema_decay == 0.0 and cfg.optim.lr == 0.0 and cfg.data.scale == [0.08, 1]
    assert cfg.clip_grad is None and cfg.max_val_steps is None


def test_direct_construction_checks_ranges_too():
    from covpool.train.config import OptimConfig, TrainConfig

    with pytest.raises(ConfigError, match="'epochs' must be >= 1, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="'lr' must be >= 0"):
        OptimConfig(lr=-1.0)
    assert TrainConfig().epochs == 10
    from covpool.train.config import DataConfig

    assert DataConfig(scale=(0.5, 1.0)).scale == (0.5, 1.0)
    with pytest.raises(ConfigError, match="'scale' must be 2 ascending numbers"):
        DataConfig(scale=(1.0, 0.5))


# -- checkpoints given on the command line -------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes)"),
    (b"epochs: 3\nthis is a text file\n", "is not a readable PyTorch"),
    (None, "is a plain state_dict"),
])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_unusable_checkpoint_is_one_error_line(runs, capsys, tmp_path, content, message, command):
    path = tmp_path / "weights.pt"
    if content is None:
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    else:
        path.write_bytes(content)
    argv = ["train", "--resume-from", str(path)] if command == "train" else ["eval", "--checkpoint", str(path)]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert message in line and str(path) in line
    assert not runs


# -- config_diff (what a resume with a changed config reports) -----------------------------------------------
def test_config_diff_lists_changed_dotted_keys():
    from covpool.train.config import MISSING, config_diff, format_config_diff

    stored = config_to_dict(load_config("demo", ["epochs=1"]))  # what a checkpoint holds
    new = load_config("demo", ["epochs=3", "optim.lr=0.01", "model.covpool.reduced_dim=64", "optim.sched=step"])
    diff = config_diff(stored, new)
    assert diff == [("epochs", 1, 3), ("model.covpool.reduced_dim", MISSING, 64), ("optim.lr", 0.05, 0.01),
                    ("optim.sched", "cosine", "step")]
    assert format_config_diff(diff[:1] + diff[2:3]) == "epochs: 1 -> 3, optim.lr: 0.05 -> 0.01"
    assert config_diff(new, new) == [] and config_diff(stored, load_config("demo", ["epochs=1"])) == []
    # removed keys come last, with MISSING on the new side; ignored keys and everything under them are skipped
    assert config_diff(new, stored, ignore=["epochs", "optim"]) == [("model.covpool.reduced_dim", 64, MISSING)]
    assert repr(MISSING) == "<missing>"


@pytest.mark.parametrize("old, new, expected", [
    ({"a": 1}, {"a": 1.0}, []),                        # an int read from YAML equals the float it becomes
    ({"a": [0.5, 1.0]}, {"a": (0.5, 1)}, []),          # a tuple equals the list with the same items
    ({"a": True}, {"a": 1}, [("a", True, 1)]),          # but true is not 1 in a config
    ({"a": None}, {"a": 0}, [("a", None, 0)]),
    ({"s": {"x": 1}}, {"s": 3}, [("s", {"x": 1}, 3)]),  # a section replaced by a value: reported whole
    ({"s": {"x": [1, 2]}}, {"s": {"x": [1, 2, 3]}}, [("s.x", [1, 2], [1, 2, 3])]),
    ({}, {}, []),
])
def test_config_diff_value_rules(old, new, expected):
    from covpool.train.config import config_diff

    assert config_diff(old, new) == expected


# -- every config mistake: one error line, exit 2, before a model or data set is built (issue 20) --------------
_MISTAKES_DRIVER = r"""
import json, os, sys, traceback

import covpool.train.engine as engine, covpool.train.evaluation as evaluation
from covpool.cli import main

def built(*args, **kwargs):  # reached only after every check passed: the mistake was found too late
    raise RuntimeError("BUILT: a model or data set was built before the mistake was reported")

engine.make_model = evaluation.build_model = engine.open_datasets = evaluation.open_datasets = built
results = []
for argv, env in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a process of its own per command line, as a shell would start
        os.close(read)
        os.dup2(write, 2)
        os.environ.update(env)
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    results.append({"rc": os.waitstatus_to_exitcode(status), "err": err})
print(json.dumps(results))
"""

_BASE = ["model.name=test_resnet", "data.img_size=32", "data.batch_size=8", "progress=false"]
_COVPOOL = ["model.swap_pooling=true", "model.covpool.reduced_dim=8"]
# (command-line arguments after `covpool train --config demo output_dir=...`, environment, what the line says)
_MISTAKES = [
    (["model.name=resnet5O"], {}, "model.name='resnet5O' is not a timm model (did you mean 'resnet50'?)"),
    (["optim.opt=adamww"], {}, "optim.opt='adamww' is not a timm optimizer (did you mean 'adamw'?)"),
    (["optim.sched=cosinee"], {}, "optim.sched='cosinee' is not a timm scheduler covpool can step (did you mean "
                                  "'cosine'?); valid: cosine, tanh, step"),
    (["optim.sched=rsqrt"], {}, "optim.sched='rsqrt': rsqrt schedule requires 0 < decay_epochs <= epochs"),
    ([*_COVPOOL, "model.covpool.backend=mpa_lyaa"], {},
     "model.covpool.backend: unknown backend 'mpa_lyaa'; valid backends are: eig"),
    ([*_COVPOOL, "model.covpool.backend={name: ns, iters: 3}"], {},
     "model.covpool.backend: backend 'ns' got unknown option(s) ['iters']"),
    (["model.zca=stem", "model.zca_options.backend=eigg"], {}, "model.zca_options.backend: unknown backend 'eigg'"),
    ([*_COVPOOL, "model.backend_schedule=[[0, ns], [1, svd_padee]]"], {},
     "model.backend_schedule[1]: unknown backend 'svd_padee'"),
    (["model.backend_schedule=[[0, ns], [1, eig]]"], {}, "model.backend_schedule needs covariance pooling"),
    (["device=tpu"], {}, "device='tpu' is not a device (did you mean 'cpu'?); valid: auto, cpu, cuda"),
    (["data.dataset=bogus"], {}, "data.dataset='bogus' is not a data set of covpool train; valid: embedded"),
    ([*_COVPOOL[:1], "model.covpool.reduced_dimm=8"], {}, "unexpected keyword argument 'reduced_dimm'"),
    ([*_COVPOOL[:1], "model.covpool.reduced_dim=-3"], {}, "reduced_dim must be an integer >= 1"),
    ([*_COVPOOL, "model.covpool.last_stride=3"], {}, "last_stride must be None (keep the model's), 1 or 2, got 3"),
    (["model.kwargs.drop_ratee=0.1"], {}, "model.kwargs={'drop_ratee': 0.1} for model.name='test_resnet'"),
    (["model.zca=stme"], {}, "model.zca='stme' is not a ZCA mode (did you mean 'stem'?); valid: none, stem, all"),
    (["clip_mode=max"], {}, "clip_mode='max' is not a clipping mode of timm's dispatch_clip_grad"),
    (["compile=nope"], {}, "compile='nope' is not a torch.compile backend"),
    (["amp=fp16", "device=cpu"], {}, "amp=fp16 needs CUDA"),
    ([], {"COVPOOL_DIST_TIMEOUT": "abc"}, "COVPOOL_DIST_TIMEOUT must be a positive number of seconds, got 'abc'"),
    ([], {"COVPOOL_DIST_TIMEOUT": "-3"}, "COVPOOL_DIST_TIMEOUT must be a positive number of seconds, got '-3'"),
    (["name=../escape"], {}, "config key 'name' must be a folder name"),
    ([*_COVPOOL, "model.head=bcnnn"], {}, "model.head='bcnnn' is not a second-order head (did you mean 'bcnn'?)"),
    (["model.head=bcnn"], {}, "model.head and model.covpool are only used with model.swap_pooling=true"),
    ([*_COVPOOL, "model.head=sot"], {}, "head 'sot' pools transformer tokens"),
    ([*_COVPOOL, "model.head=bcnn", "model.covpool.backend=eig"], {}, "backend='eig' would have no effect"),
    # issue 23: sizes the model or the data set cannot take, a device this machine lacks
    (["data.img_size=4"], {}, "data.img_size=4: the embedded data set cuts patches of at least 8x8 pixels"),
    (_COVPOOL, {}, "model.name='test_resnet' at data.img_size=32 ends in a 1x1 feature map"),
    (["model.name=vit_tiny_patch16_224", "model.kwargs.img_size=224"], {},
     "model.name='vit_tiny_patch16_224' cannot take data.img_size=32 inputs: Input height (32) doesn't match"),
    (["model.name=torchvision:resnet1"], {}, "model.name='torchvision:resnet1' is not a timm model (did you mean "
                                             "'torchvision:resnet18'?)"),
    *([(["device=cuda"], {}, "device=cuda but CUDA is not available here")] if not torch.cuda.is_available() else []),
]


def test_config_mistakes_end_in_one_error_line_before_anything_is_built(tmp_path):
    """The command line in processes of their own (one per mistake, forked from one interpreter so the table
    costs one import of torch): status 2, one `error:` line naming the key and the closest valid name, no
    traceback, nothing written, and neither a model nor a data set built."""
    runs = tmp_path / "runs"
    ckpt = _checkpoint(tmp_path)  # written with model.name=resnet18 (the default) by a config of its own
    table = [(["train", "--config", "demo", f"output_dir={runs}", *_BASE, *argv], env, message)
             for argv, env, message in _MISTAKES]
    table += [(["eval", "--checkpoint", str(ckpt), "--config", "demo", *_BASE], {},
               f"the config describes another model than the one {ckpt} holds: model.name: 'resnet18' -> "
               "'test_resnet'"),
              (["eval", "--checkpoint", str(ckpt), "optim.opt=adamww"], {}, "optim.opt='adamww' is not a timm "
               "optimizer"),
              (["train", "--config", str(tmp_path)], {}, "is a folder, not a config file")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("COVPOOL_DIST_TIMEOUT", None)
    out = subprocess.run([sys.executable, "-c", _MISTAKES_DRIVER, json.dumps([(a, e) for a, e, _ in table])],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    wrong = []
    for (argv, _, message), result in zip(table, json.loads(out.stdout)):
        lines = result["err"].strip().splitlines()
        if not (result["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]):
            wrong.append((argv[4 + len(_BASE):] if argv[0] == "train" else argv, result["rc"], result["err"][-600:]))
    assert not wrong, "\n".join(map(str, wrong))
    assert not runs.exists()
