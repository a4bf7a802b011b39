"""The public surface: names, registries and the timm registration that `import covpool` promises."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import covpool

PUBLIC = {
    "sqrtm", "inv_sqrtm", "list_backends", "register_backend", "get_backend", "covariance", "covariance_sqrtm",
    "triu_vectorize",
    "CovPool", "ZCABatchNorm1d", "ZCABatchNorm2d", "convert_sync_zca", "SoViTHead", "cov_pool", "zca_batch_norm",
    "swap_pooling", "keep_fitting_classifier", "set_backend", "convert_zca", "cifar_stem", "list_heads", "get_head",
    "build_head", "matrix_power", "covariance_power",
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


ROOT = Path(covpool.__file__).parent
REPO = ROOT.parent
# The application: the command line, the demo, the benchmark, the training package and the examples. It may
# use its own internals (covpool.train._*), but of the library only what a user can: public names.
APPLICATION = ("covpool.train", "covpool.cli", "covpool.demo", "covpool.bench", "covpool.__main__")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of(path: Path) -> set[str]:
    """Absolute names a file imports: modules, and ``module.name`` for every ``from module import name``
    (relative imports resolved against the file's package), plus ``covpool.a.b`` attribute chains it uses."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(p for p in (base, node.module or "") if p)
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Attribute) and not isinstance(getattr(node, "ctx", None), ast.Store):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "covpool":
                found.add(".".join(["covpool", *reversed(chain)]))
    return found


def _sources(*names: str) -> list[Path]:
    """The .py files of covpool's subpackages or modules ``names`` (e.g. "linalg", "bench")."""
    paths = []
    for name in names:
        target = ROOT / name
        paths += sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
    return paths


def _imports(*names: str) -> set[str]:
    return set().union(*(_imports_of(path) for path in _sources(*names)))


_APP = ("covpool.train", "covpool.cli", "covpool.demo", "covpool.bench")


@pytest.mark.parametrize(
    "package, forbidden",
    [("linalg", ("timm", "covpool.layers", "covpool.models", "torch.nn", *_APP)),
     ("layers", ("timm", "covpool.models", *_APP)),
     ("models", _APP),
     ("train", ("covpool.cli", "covpool.demo", "covpool.bench")),
     # bench.main, a shim for callers of covpool <= 0.1.0, is the one import of the command line below it
     ("bench", ("timm", "covpool.layers", "covpool.models", "covpool.demo"))],
)
def test_layering(package, forbidden):
    """Each layer imports only the ones above it: linalg → layers → models → the application (train, the
    benchmark, the demo and the command line on top)."""
    bad = {m for m in _imports(package) if m.startswith(forbidden)}
    assert not bad, f"covpool.{package} must not import {sorted(bad)}"


def _private_library_names(imported: set[str]) -> set[str]:
    """The imported names that reach into the library's internals: a ``_module`` or ``_name`` anywhere
    under covpool outside the application (dunders such as ``__version__`` are public)."""
    def private(part: str) -> bool:
        return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))

    return {m for m in imported if m.startswith("covpool.") and not m.startswith(APPLICATION)
            and any(private(part) for part in m.split(".")[1:])}


# Private library names the application still needs until the library makes them public; each entry must
# still be needed (the test below fails when it is not, so the list only shrinks).
_AWAITING_LIBRARY: dict[str, set[str]] = {}


def _application_files() -> list[Path]:
    return [*_sources("train", "cli", "demo", "bench", "__main__"), *sorted((REPO / "examples").glob("*.py"))]


@pytest.mark.parametrize("path", _application_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_application_uses_only_public_library_names(path):
    """The application (covpool.train, cli, demo, bench, examples) uses the library as a user would."""
    where = str(path.relative_to(REPO))
    private = {m for m in _private_library_names(_imports_of(path))
               if not any(m == p or m.startswith(p + ".") for p in _AWAITING_LIBRARY.get(where, ()))}
    assert not private, f"{where} uses the library's private {sorted(private)}: make them public in the library"
    still = {p for p in _AWAITING_LIBRARY.get(where, ())
             if not any(m == p or m.startswith(p + ".") for m in _imports_of(path))}
    assert not still, f"{where} no longer needs {sorted(still)}: remove it from _AWAITING_LIBRARY"


def test_private_name_detection():
    """The check above finds what it must: private modules and names, relative or absolute, not dunders."""
    assert _private_library_names({"covpool.linalg._iterative._split", "covpool._testing",
                                   "covpool.models.keep_fitting_classifier", "covpool.__version__",
                                   "covpool.train._io", "covpool.linalg", "covpool.layers.zca._group"}) == {
        "covpool.linalg._iterative._split", "covpool._testing", "covpool.layers.zca._group"}
    found = _imports_of(ROOT / "bench.py")
    assert "covpool.linalg" in found and "covpool.testing.exact_root" in found


def test_import_registers_the_models_with_timm():
    import timm

    assert set(timm.list_models("so_vit*")) == {"so_vit_7", "so_vit_10", "so_vit_14", "so_vit_19"}
    assert set(timm.list_models("*_isqrt")) == {"resnet18_isqrt", "resnet50_isqrt", "resnet101_isqrt"}


def test_backend_options_are_documented_defaults():
    defaults = {name: covpool.get_backend(name).defaults for name in covpool.list_backends()[:7]}
    assert defaults["ns"] == {"num_iters": 5, "norm": "trace", "tf32": False}
    assert defaults["mtp_lya"] == {"degree": 10, "lya_iters": 8, "refine": 0, "tf32": False}
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
