"""What `pip install covpool` gives: the library without the training extra, typed, with honest metadata."""
import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The `train` extra's packages that nothing else brings (pyyaml and tqdm come with timm's huggingface_hub too).
TRAIN_ONLY = ("matplotlib", "skimage")


@pytest.mark.slow
def test_wheel_metadata_puts_the_application_dependencies_in_the_train_extra(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        msg = email.message_from_bytes(zf.read(meta))
    assert "covpool/py.typed" in names
    requires = msg.get_all("Requires-Dist")
    core = sorted(r.split(">")[0].split("<")[0].split(";")[0].strip() for r in requires if "extra ==" not in r)
    assert core == ["einops", "timm", "torch", "torchvision"]
    train = sorted(r.split(">")[0].strip() for r in requires if "extra == \"train\"" in r)
    assert train == ["matplotlib", "pyyaml", "scikit-image", "tqdm"]
    onnx = sorted(r.split(">")[0].split("<")[0].strip() for r in requires if "extra == \"onnx\"" in r)
    assert onnx == ["onnx", "onnxruntime", "onnxscript"]
    assert any(r.startswith("covpool[onnx]") for r in requires if "extra == \"test\"" in r)
    assert msg["License-Expression"] == "MIT" and "Typing :: Typed" in msg.get_all("Classifier")


@pytest.mark.slow
def test_the_library_works_without_the_train_extra(wheel, tmp_path):
    """Installed without `[train]` (its modules made unimportable), `import covpool` and timm's registry work."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in TRAIN_ONLY))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "block"), str(site)])}
    code = ("import covpool, timm, torch\n"
            f"assert covpool.__file__.startswith({str(site)!r})\n"
            "m = timm.create_model('so_vit_7', num_classes=3, img_size=32).eval()\n"
            "print(tuple(m(torch.randn(1, 3, 32, 32)).shape))\n"
            "print(tuple(covpool.sqrtm(torch.eye(3), backend='ns').shape))\n"
            "try:\n    import matplotlib\nexcept ImportError:\n    print('no matplotlib')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:3] == ["(1, 3)", "(3, 3)", "no matplotlib"]


def test_a_command_without_the_train_extra_says_what_to_install(monkeypatch, capsys):
    from covpool import cli

    def needs_skimage(argv):
        raise ModuleNotFoundError("No module named 'skimage'", name="skimage")

    monkeypatch.setitem(cli.RUNNERS, "demo", needs_skimage)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: `covpool demo` needs the training extra (skimage is not installed): "
                   "pip install 'covpool[train]'"]

    def needs_something_else(argv):
        raise ModuleNotFoundError("No module named 'nope'", name="nope")

    monkeypatch.setitem(cli.RUNNERS, "demo", needs_something_else)
    with pytest.raises(ModuleNotFoundError):  # not the extra's: a bug, with its traceback
        cli.main(["demo"])


def test_the_code_passes_its_ruff_configuration():
    """pyproject.toml's [tool.ruff] rules (pycodestyle, pyflakes, isort, bugbear, pyupgrade) hold everywhere."""
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the test extra: pip install -e '.[test]')")
    run = subprocess.run([ruff, "check", "--no-cache", str(REPO)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
