"""The public surface: names, registries and the timm registration that `import covpool` promises."""
import ast
import importlib
import os
import re
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
    "build_head", "register_head", "matrix_power", "covariance_power",
    "Head", "AdaptiveChannelDrop", "MultiHeadCrossCov", "SvPNCrossCov", "SecondOrderNet", "TokenCovPool",
}


def test_public_names_snapshot():
    assert set(covpool.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(covpool, name) is not None


# The public names of each library subpackage: adding one is a decision, renaming one a deprecation.
LIBRARY_PUBLIC = {
    "covpool.linalg": {"sqrtm", "inv_sqrtm", "list_backends", "register_backend", "get_backend", "resolve_backend",
                       "Backend", "BackendSpec", "Option", "covariance", "covariance_sqrtm", "covariance_power",
                       "matrix_power", "triu_vectorize", "lyapunov_sign"},
    "covpool.layers": {"CovPool", "ZCABatchNorm1d", "ZCABatchNorm2d", "convert_zca", "convert_sync_zca", "SoViTHead",
                       "cov_pool", "zca_batch_norm", "set_backend", "register_head", "list_heads", "get_head",
                       "build_head", "Head", "AdaptiveChannelDrop", "MultiHeadCrossCov", "SvPNCrossCov"},
    "covpool.layers.functional": {"cov_pool", "second_moment", "signed_sqrt", "l2_normalize", "tensor_sketch",
                                  "random_maclaurin", "compact_bilinear", "cross_covariance", "svpn",
                                  "multi_head_cross_covariance", "adaptive_channel_drop", "zca_batch_norm"},
    "covpool.models": {"swap_pooling", "keep_fitting_classifier", "cifar_stem", "SecondOrderNet", "TokenCovPool"},
    "covpool.testing": {"well_conditioned", "well_separated", "ill_conditioned", "rank_deficient",
                        "repeated_eigenvalues", "exact_root", "exact_grad", "rel", "round_products",
                        "assert_compiles_like_eager"},
}


@pytest.mark.parametrize("module", sorted(LIBRARY_PUBLIC))
def test_library_subpackage_names_snapshot(module):
    assert set(importlib.import_module(module).__all__) == LIBRARY_PUBLIC[module]


# Library paths that moved, each name's new home: the old path imports for one release, with a FutureWarning.
MOVED_LIBRARY_PATHS = [
    ("covpool.layers.covpool_layer", "CovPool", "covpool.layers.pooling"),
    ("covpool.layers.covpool_layer", "AdaptiveChannelDrop", "covpool.layers.pooling"),
    ("covpool.layers.sovit_head", "SvPNCrossCov", "covpool.layers.pooling"),
    ("covpool.layers.sovit_head", "MultiHeadCrossCov", "covpool.layers.pooling"),
    ("covpool.layers.sovit_head", "svpn", "covpool.layers.functional"),
    ("covpool.layers.sovit_head", "cross_covariance", "covpool.layers.functional"),
    ("covpool.models.swap", "SecondOrderNet", "covpool.models.second_order"),
    ("covpool.models.swap", "TokenCovPool", "covpool.models.second_order"),
]


@pytest.mark.parametrize("old, name, new", MOVED_LIBRARY_PATHS, ids=[f"{o}.{n}" for o, n, _ in MOVED_LIBRARY_PATHS])
def test_moved_library_paths_import_with_a_future_warning(old, name, new):
    namespace: dict = {}
    public = "covpool.layers" if new.startswith("covpool.layers.pooling") else new.replace(".second_order", "")
    with pytest.warns(FutureWarning, match=rf"^{old}\.{name} is deprecated and goes in the next release; use "
                                           rf"{re.escape(public)}\.{name}$"):
        exec(f"from {old} import {name}", namespace)
    assert namespace[name] is getattr(importlib.import_module(new), name)
    with pytest.raises(ImportError):
        exec(f"from {old} import no_such_name", {})


def test_old_head_spellings_warn_and_build_the_same_head():
    import timm

    with pytest.warns(FutureWarning, match=r"SoViTHead\(kind='mpa'\) is now SoViTHead\(head='mpa_cov'\)"):
        old = covpool.SoViTHead(16, 3, reduced_dim=4, kind="mpa")
    assert old.head_name == "mpa_cov" and old.pool.backend == "mpa_lya"
    with pytest.warns(FutureWarning, match="SoViTHead.kind is now SoViTHead.head_name"):
        assert old.kind == "mpa"
    with pytest.warns(FutureWarning, match="kind="):
        assert covpool.SoViTHead(16, 3, reduced_dim=(4, 2), kind="svpn").head_name == "svpn"
    with pytest.warns(FutureWarning, match="head='mpa' is now head='mpa_cov'"):
        model = timm.create_model("so_vit_7", img_size=32, num_classes=3, head="mpa")
    assert model.head.head_name == "mpa_cov" and model.head.pool.dim == 48
    with pytest.warns(FutureWarning, match=r"SvPNCrossCov\(dims=\.\.\.\) is now SvPNCrossCov\(reduced_dim=\.\.\.\)"):
        pool = covpool.layers.SvPNCrossCov(8, dims=(3, 2))
    assert pool.reduced_dim == pool.dims == (3, 2) and pool.out_features == 6


ROOT = Path(covpool.__file__).parent
REPO = ROOT.parent
MODULES = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                 for p in ROOT.rglob("*.py") if p.name != "__main__.py")


@pytest.mark.parametrize("module", MODULES)
def test_every_module_declares_all(module):
    import importlib

    mod = importlib.import_module(module)
    assert isinstance(mod.__all__, (list, tuple)), f"{module} has no __all__"
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ lists missing {name}"


# The training package's public names (covpool.train.__all__): adding one is a decision, removing one a break.
TRAIN_PUBLIC = {
    "TrainConfig", "ModelConfig", "DataConfig", "OptimConfig", "ConfigError", "load_config", "check_config", "train",
    "evaluate", "EvalResult", "load_model", "predict", "Prediction", "ImageReadError", "TrainResult",
    "NonFiniteLossError", "RunExistsError", "RunLockedError", "TrainingAborted", "DistributedFailure", "Checkpoint",
    "CheckpointError", "build_model", "build_datasets", "open_datasets", "dataset_names", "DatasetNotFoundError",
    "ClassListError", "PretrainedWeightsError", "EmbeddedTextures", "CUB200", "atomic_save", "load_checkpoint",
}


def test_training_package_public_names_snapshot():
    import covpool.train

    assert set(covpool.train.__all__) == TRAIN_PUBLIC


# Files of covpool/ may hold 500 lines at most; a model family's file (timm's layout: blocks, model, filters,
# builders, configs, variants in one file) may hold more. Each exception is named here.
LONG_FILES = {"covpool/models/so_vit.py"}


def test_no_file_over_500_lines_but_a_model_familys():
    long = {str(p.relative_to(REPO)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert set(long) <= LONG_FILES, f"files over 500 lines: {long}"
    assert all(name.startswith("covpool/models/") for name in LONG_FILES)


# Old import paths of the application, kept for one release: (module, name, where it lives now).
MOVED = [
    ("covpool.train.validate", "check_config", "covpool.train.config_checks.check_config"),
    ("covpool.train.validate", "check_same_model", "covpool.train.config_checks.check_same_model"),
    ("covpool.train.validate", "SCHEDULERS", "covpool.train.config.SCHEDULERS"),
    ("covpool.train.evaluation", "autocast", "covpool.precision.amp_mode(amp).autocast(device)"),
    ("covpool.train.checkpoint", "remove_stale_temp_files",
     "covpool.outputs.remove_leftover_temporaries(folder / name) for each name"),
    ("covpool.train.engine", "start_up_header", "covpool.train.summary.start_up_header"),
    ("covpool.train.engine", "evaluate", "covpool.train.evaluate"),
    ("covpool.train.engine", "format_table", "covpool.train.summary.format_history"),
    ("covpool.train.engine", "RunExistsError", "covpool.train.RunExistsError"),
    ("covpool.train.engine", "RunLockedError", "covpool.train.RunLockedError"),
    ("covpool.train.engine", "DistributedFailure", "covpool.train.DistributedFailure"),
    ("covpool.bench", "format_table", "covpool.outputs.format_table(rows, columns, markdown=True)"),
]


@pytest.mark.parametrize("module, name, new", MOVED, ids=[f"{m}.{n}" for m, n, _ in MOVED])
def test_old_application_paths_still_import_with_a_future_warning(module, name, new):
    code = f"from {module} import {name} as old"
    with pytest.warns(FutureWarning, match=rf"{module}\.{name} is deprecated .*; use {re.escape(new)}$"):
        exec(code, {})


def test_old_paths_behave_as_before(tmp_path):
    """What the old names return still does what it did."""
    import warnings

    import torch

    from covpool.train import config_checks, engine, evaluation, summary

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from covpool.bench import format_table
        from covpool.train.checkpoint import remove_stale_temp_files
        from covpool.train.validate import check_config

        assert check_config is config_checks.check_config and engine.start_up_header is summary.start_up_header
        with evaluation.autocast("bf16", torch.device("cpu")):
            assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.bfloat16
        assert format_table([{"d": 8}]).startswith("| variant | d |")
        (tmp_path / ".last.pt.ab12.tmp").write_bytes(b"")
        assert [p.name for p in remove_stale_temp_files(tmp_path, ("last.pt",))] == [".last.pt.ab12.tmp"]
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        engine.nope  # noqa: B018
# The application: the command line, the demo, the benchmark, the training package, what they all write, and the
# examples. A package may use its own internals (covpool.train._* inside covpool.train), but of the library and of
# the application's other packages only what a user can: public names.
APPLICATION = ("covpool.train", "covpool.cli", "covpool.demo", "covpool.bench", "covpool.outputs", "covpool.precision",
               "covpool.__main__")


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


_APP = ("covpool.train", "covpool.cli", "covpool.demo", "covpool.bench", "covpool.outputs", "covpool.precision")


@pytest.mark.parametrize(
    "package, forbidden",
    [("linalg", ("timm", "covpool.layers", "covpool.models", "torch.nn", *_APP)),
     ("layers", ("timm", "covpool.models", *_APP)),
     ("models", _APP),
     ("outputs", ("covpool.train", "covpool.cli", "covpool.demo", "covpool.bench", "covpool.precision", "torch",
                  "timm")),
     ("precision", ("covpool.train", "covpool.cli", "covpool.demo", "covpool.bench", "covpool.outputs", "timm")),
     ("train", ("covpool.cli", "covpool.demo", "covpool.bench")),
     # the benchmark times the library (backends, heads, models with --models), never the trainer or what is above
     ("bench", ("covpool.train", "covpool.demo", "covpool.cli"))],
)
def test_layering(package, forbidden):
    """Each layer imports only the ones above it: linalg → layers → models → the application (train, the
    benchmark, the demo and the command line on top)."""
    bad = {m for m in _imports(package) if m.startswith(forbidden)}
    assert not bad, f"covpool.{package} must not import {sorted(bad)}"


# The package's own plumbing, below the library and the application alike (not library API a user would call):
# the FutureWarning shim of moved names, written once for both.
SHARED_INTERNALS = ("covpool._deprecation",)


def _private_library_names(imported: set[str]) -> set[str]:
    """The imported names that reach into the library's internals: a ``_module`` or ``_name`` anywhere
    under covpool outside the application (dunders such as ``__version__`` are public)."""
    def private(part: str) -> bool:
        return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))

    return {m for m in imported if m.startswith("covpool.") and not m.startswith(APPLICATION + SHARED_INTERNALS)
            and any(private(part) for part in m.split(".")[1:])}


def _application_files() -> list[Path]:
    return [*_sources("train", "cli", "demo", "bench", "outputs", "precision", "__main__"),
            *sorted((REPO / "examples").glob("*.py"))]


@pytest.mark.parametrize("path", _application_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_application_uses_only_public_library_names(path):
    """The application (covpool.train, cli, demo, bench, examples) uses the library as a user would."""
    where = str(path.relative_to(REPO))
    private = _private_library_names(_imports_of(path))
    assert not private, f"{where} uses the library's private {sorted(private)}: make them public in the library"


def _package_of(module: str) -> str:
    """The package a module belongs to, for the private-module rule: covpool.train.x -> covpool.train,
    covpool.cli -> covpool.cli (a top-level module is its own package)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _private_crossings(module: str, imported: set[str]) -> set[str]:
    """The names ``module`` imports from a private module or name of another covpool package."""
    def private(part: str) -> bool:
        return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))

    home = _package_of(module)
    return {m for m in imported if m.startswith("covpool.") and _package_of(m) != home
            and not m.startswith(SHARED_INTERNALS) and any(private(part) for part in m.split(".")[1:])}


@pytest.mark.parametrize("path", _application_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_application_module_imports_another_packages_private_module(path):
    """covpool.cli, demo, bench and the examples use covpool.train, covpool.outputs and each other through
    public names only, as the application uses the library (covpool.train's own _modules stay its own)."""
    module = _module_name(path) if path.is_relative_to(ROOT) else "examples"
    crossings = _private_crossings(module, _imports_of(path))
    assert not crossings, f"{path.relative_to(REPO)} imports another package's private {sorted(crossings)}"


def test_private_crossing_detection():
    assert _private_crossings("covpool.cli", {"covpool.train._io.os_error_in", "covpool.train.config",
                                              "covpool.outputs.os_error_in"}) == {"covpool.train._io.os_error_in"}
    assert _private_crossings("covpool.train.engine", {"covpool.train._dist", "covpool.outputs"}) == set()
    assert _private_crossings("covpool.demo", {"covpool.train._plot.plot_comparison"}) == {
        "covpool.train._plot.plot_comparison"}


# The floors of the house, from the ground up: a module imports only modules on its own floor or below it.
_FLOORS = ((*SHARED_INTERNALS, "covpool.linalg", "covpool.testing"), ("covpool.layers",), ("covpool.models",),
           ("covpool",), ("covpool.outputs", "covpool.precision"), ("covpool.train",), ("covpool.bench",),
           ("covpool.demo",), ("covpool.cli",), ("covpool.__main__",))


def _floor(module: str) -> int:
    best = max((prefix for floor in _FLOORS for prefix in floor if module == prefix or module.startswith(prefix + ".")),
               key=len)
    return next(i for i, floor in enumerate(_FLOORS) if best in floor)


def _import_graph() -> dict[str, set[str]]:
    """covpool's modules and the covpool modules each imports: ``from pkg import name`` is an import of
    ``pkg.name`` when that is a module and of ``pkg`` otherwise; ``covpool.a.b`` attribute chains count (a
    package's __init__ is not implied by importing one of its modules)."""
    modules = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}

    def module_of(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(module_of(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = ".".join(p for p in (package.rsplit(".", node.level - 1)[0] if node.level else "",
                                              node.module or "") if p)
                targets.update(f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                               for a in node.names)
            elif isinstance(node, ast.Attribute):
                chain, inner = [node.attr], node.value
                while isinstance(inner, ast.Attribute):
                    chain.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id == "covpool":
                    targets.add(module_of(".".join(["covpool", *reversed(chain)])))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_import_graph_has_no_circle_and_no_arrow_back_up():
    graph = _import_graph()
    up = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if _floor(b) > _floor(a))
    assert not up, f"imports from a lower floor to a higher one: {up}"
    done, path = set(), []

    def visit(node: str) -> None:  # depth-first search; meeting a module on the current path closes a circle
        if node in path:
            raise AssertionError(f"import circle: {' -> '.join(path[path.index(node):] + [node])}")
        if node in done:
            return
        path.append(node)
        for target in sorted(graph[node]):
            visit(target)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert "covpool.bench" in graph and "covpool.cli" not in graph["covpool.bench"]  # bench.main is gone


def test_importing_the_training_package_loads_only_covpools_own_modules():
    """What covpool/train/__init__.py says: on top of ``import covpool``, only covpool's modules; matplotlib and
    scikit-image load when a run needs them."""
    code = ("import sys, covpool; before = set(sys.modules); import covpool.train; "
            "print(sorted(m.split('.')[0] for m in set(sys.modules) - before if not m.startswith('covpool')), "
            "'matplotlib' in sys.modules, 'skimage' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "False", "False"]


def test_private_name_detection():
    """The check above finds what it must: private modules and names, relative or absolute, not dunders."""
    assert _private_library_names({"covpool.linalg._iterative._split", "covpool._testing",
                                   "covpool.models.keep_fitting_classifier", "covpool.__version__",
                                   "covpool.train._io", "covpool.linalg", "covpool.layers.zca._group"}) == {
        "covpool.linalg._iterative._split", "covpool._testing", "covpool.layers.zca._group"}
    found = _imports_of(ROOT / "bench" / "backends.py")
    assert "covpool.linalg" in found and "covpool.testing.exact_root" in found


def test_import_registers_the_models_with_timm():
    import timm

    assert set(timm.list_models("so_vit*")) == {"so_vit_7", "so_vit_10", "so_vit_14", "so_vit_19"}
    assert set(timm.list_models("*_isqrt")) == {"resnet18_isqrt", "resnet50_isqrt", "resnet101_isqrt", "vgg16_isqrt"}
    assert set(timm.list_models("resnet*_dropcov")) == {f"resnet{d}_dropcov" for d in (18, 34, 50, 101, 152)}


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
