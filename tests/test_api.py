"""The public surface: names, registries and the timm registration that `import covpool` promises."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import covpool

PUBLIC = {
    "sqrtm", "inv_sqrtm", "list_backends", "register_backend", "get_backend", "covariance", "triu_vectorize",
    "CovPool", "ZCABatchNorm1d", "ZCABatchNorm2d", "convert_sync_zca", "SoViTHead", "cov_pool", "zca_batch_norm",
    "swap_pooling", "keep_fitting_classifier", "set_backend", "convert_zca", "cifar_stem",
}


def test_public_names_snapshot():
    assert set(covpool.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(covpool, name) is not None


@pytest.mark.parametrize("module", ["covpool.linalg", "covpool.layers", "covpool.models", "covpool.bench",
                                    "covpool.demo", "covpool.cli", "covpool.train"])
def test_every_module_declares_all(module):
    mod = __import__(module, fromlist=["__all__"])
    assert isinstance(mod.__all__, (list, tuple))
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ lists missing {name}"


def _imports(package: str) -> set[str]:
    """Modules imported anywhere in a subpackage's source (absolute names; relative ones resolved)."""
    root = Path(covpool.__file__).parent / package
    found = set()
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = "covpool" if node.level == 2 else f"covpool.{package}" if node.level == 1 else ""
                found.add(".".join(p for p in (base, node.module or "") if p))
    return found


@pytest.mark.parametrize(
    "package, forbidden",
    [("linalg", ("timm", "covpool.layers", "covpool.models", "torch.nn")), ("layers", ("timm", "covpool.models"))],
)
def test_layering(package, forbidden):
    bad = {m for m in _imports(package) if m.startswith(forbidden)}
    assert not bad, f"covpool.{package} must not import {sorted(bad)}"


def test_import_registers_the_models_with_timm():
    import timm

    assert set(timm.list_models("so_vit*")) == {"so_vit_7", "so_vit_10", "so_vit_14", "so_vit_19"}
    assert set(timm.list_models("*_isqrt")) == {"resnet18_isqrt", "resnet50_isqrt", "resnet101_isqrt"}


def test_backend_options_are_documented_defaults():
    defaults = {name: covpool.get_backend(name).defaults for name in covpool.list_backends()[:7]}
    assert defaults["ns"] == {"num_iters": 5, "norm": "trace"}
    assert defaults["mtp_lya"] == {"degree": 10, "lya_iters": 8, "refine": 0}
    assert defaults["mpa_lya"] == {"degree": (5, 5), "lya_iters": 8, "refine": 0}


def test_cli_lists_commands_and_rejects_unknown(capsys):
    from covpool.cli import main

    assert main([]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_python_dash_m_covpool_help():
    out = subprocess.run([sys.executable, "-m", "covpool", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in out.stdout and "demo" in out.stdout
