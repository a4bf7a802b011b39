"""The documentation site's generated pages agree with the code: every public name has a docstring and an
entry, and the config, command-line, backend, head and model references list what the schema, the parsers
and the registries hold. (Building the site itself is `make docs`; these tests need no Sphinx.)"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
import sys
import typing

import pytest
from _train_helpers import REPO

import covpool

DOCS = REPO / "docs"


def _load(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gen = _load("covpool_docs", DOCS / "_ext" / "covpool_docs.py")
params = _load("covpool_params", DOCS / "_ext" / "covpool_params.py")
links = _load("covpool_check_links", DOCS / "tools" / "check_links.py")

OBJECTS = gen.public_objects()
OWN = [(module, name) for module, objects in OBJECTS.items() for name, _, home in objects
       if home == f"{module}.{name}"]


def test_the_reference_covers_the_public_modules():
    """The six modules of the issue, and the public modules inside them that hold names of their own."""
    modules = gen.api_modules()
    assert modules[:6] == ["covpool", "covpool.linalg", "covpool.layers", "covpool.models", "covpool.train",
                           "covpool.testing"]
    assert {"covpool.models.so_vit", "covpool.models.resnet_isqrt", "covpool.layers.functional"} <= set(modules)
    assert not any(m.startswith(("covpool.cli", "covpool.bench", "covpool.demo", "covpool.outputs")) for m in modules)
    assert not any("._" in m for m in modules)


@pytest.mark.parametrize("module, name", OWN, ids=[f"{m}.{n}" for m, n in OWN])
def test_every_public_name_has_a_docstring(module, name):
    assert gen.docstring_of(module, name).strip(), f"{module}.{name} has no docstring: the reference would be empty"


def _documented_callables():
    """Every callable the reference renders: the public functions and classes, and the public methods with a
    docstring that a public class defines (autodoc shows those)."""
    for module, name in OWN:
        obj = getattr(importlib.import_module(module), name)
        if inspect.isclass(obj):
            yield f"{module}.{name}", obj
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and inspect.isfunction(member) and member.__doc__:
                    yield f"{module}.{name}.{attr}", member
        elif callable(obj):
            yield f"{module}.{name}", obj


def test_every_parameter_is_documented():
    """The rule ``make docs`` enforces with a warning, checked without Sphinx: each parameter of a public
    callable has an ``Args:`` entry or is named as ``name`` in its docstring's prose."""
    missing = {qualname: found for qualname, obj in _documented_callables()
               if (found := params.undocumented_parameters(obj))}
    assert not missing, "parameters without documentation:\n" + "\n".join(
        f"  {qualname}: {', '.join(names)}" for qualname, names in sorted(missing.items()))


def test_the_parameter_rule_reads_args_sections_prose_and_dataclass_help():
    def f(alpha, beta, gamma, *tensors, _private=None, **options):
        """Uses ``alpha=1`` and ``*tensors`` in the prose.

        Args:
            beta (int): an entry with a type.
            **options: keyword options.
        """

    assert params.undocumented_parameters(f) == ["gamma"]
    assert params.documented(":param int gamma: napoleon's rendering", "gamma")
    assert params.documented(":param \\*\\*options: napoleon escapes the stars", "options")
    assert not params.documented("gammas are not ``gamma_ray``", "gamma")

    @dataclasses.dataclass
    class Config:
        """A config."""

        size: int = dataclasses.field(default=1, metadata={"help": "the size"})
        depth: int = 2

    assert params.undocumented_parameters(Config) == ["depth"]
    assert params.field_parameters(Config) == [":param size: the size"]
    assert params.parameters(ValueError) == []


def test_docstring_of_sees_through_what_is_not_a_docstring():
    @dataclasses.dataclass
    class Bare:
        x: int = 0

    class Child(ValueError):
        pass

    assert Bare.__doc__ and inspect.getdoc(Child)  # a dataclass's signature, the base class's docstring...
    module = type(sys)("covpool_docs_probe")
    module.Bare, module.Child = Bare, Child
    sys.modules["covpool_docs_probe"] = module
    try:
        assert gen.docstring_of("covpool_docs_probe", "Bare") == ""  # ...are no docstring of their own
        assert gen.docstring_of("covpool_docs_probe", "Child") == ""
    finally:
        del sys.modules["covpool_docs_probe"]
    assert gen.docstring_of("covpool.linalg", "BackendSpec").startswith("What every ``backend=``")


def test_every_public_name_is_in_the_api_reference():
    """Each module's page lists every name of its ``__all__``: its own names in an autosummary (a page each),
    the others with a link to where they are documented."""
    pages = gen.api_pages()
    for module, objects in OBJECTS.items():
        page = pages[f"{module}.rst"]
        assert f".. automodule:: {module}" in page
        for name, _, home in objects:
            if home == f"{module}.{name}":
                assert f"\n   {name}\n" in page, f"{module}.{name} has no entry"
            else:
                assert f"``{module}.{name}``" in page and f":py:obj:`{home}`" in page, f"{module}.{name} not listed"
    assert set(pages) == {f"{m}.rst" for m in OBJECTS} | {"index.rst"}


def test_every_public_class_is_exported_by_its_subpackage():
    """The classes that only the source showed (issue 25) are in their subpackage's ``__all__``."""
    import covpool.layers
    import covpool.models

    for name in ("Head", "AdaptiveChannelDrop", "MultiHeadCrossCov", "SvPNCrossCov"):
        assert name in covpool.layers.__all__
    for name in ("SecondOrderNet", "TokenCovPool"):
        assert name in covpool.models.__all__


def _schema_keys(cls, prefix=""):
    """The config's keys, walked here from the dataclasses independently of the generator."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _schema_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def test_config_reference_lists_every_key_with_its_type_default_and_range():
    from covpool.train import TrainConfig

    text = gen.config_reference()
    defaults = TrainConfig()
    keys = list(_schema_keys(TrainConfig))
    assert len(keys) > 50
    for key, f in keys:
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        row = text.split(f"* - ``{key}``\n", 1)
        assert len(row) == 2, f"config key {key} is missing from the reference"
        cells = row[1].split("* -", 1)[0]
        assert f"``{f.type}``" in cells and f"``{value!r}``" in cells, f"{key}: type or default wrong"
        assert " ".join(f.metadata["help"].split()) in cells
    assert "in [0, 1)" in text.split("* - ``ema_decay``", 1)[1].split("* -", 1)[0]
    for choice in covpool.list_heads():
        assert choice in text.split("* - ``model.head``", 1)[1].split("* -", 1)[0]


def test_cli_reference_shows_every_commands_help():
    import _covpool_cli

    text = gen.cli_reference()
    assert gen.commands() == list(_covpool_cli.COMMANDS)
    for command in _covpool_cli.COMMANDS:
        assert f"``covpool {command}``" in text and f"usage: covpool {command}" in text
    for command, extras in gen.EXTRA_HELP.items():
        for extra in extras:
            assert f"``covpool {command} {' '.join(extra)}``" in text
    assert "--resume-from CKPT" in text and "--checkpoint" in text


def test_backend_table_follows_the_registry(monkeypatch):
    """Every registered backend, its options with their defaults and its product counts; one registered by
    a user's code appears as well."""
    from covpool.linalg import _registry

    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    covpool.register_backend("docs_probe", lambda a, inverse, k=3: a,
                             {"k": covpool.linalg.Option(3, lambda key, v: v, doc="a probe option")},
                             doc="a backend registered by a test", products=lambda inverse, k: (k, 2 * k))
    text = gen.backend_table()
    for name in covpool.list_backends():
        backend = covpool.get_backend(name)
        row = text.split(f"* - ``{name}``\n", 1)[1].split("* -", 1)[0]
        for key, option in backend.options.items():
            assert f"``{key}={option.default!r}``" in row
        if backend.products_fn is not None:
            assert "square root {} / {}".format(*backend.products()) in row
    assert "a probe option" in text and "square root 3 / 6, inverse 3 / 6" in text


def test_head_table_follows_the_registry():
    text = gen.head_table()
    for name in covpool.list_heads():
        head = covpool.get_head(name)
        row = text.split(f"* - ``{name}``\n", 1)[1].split("* -", 1)[0]
        assert " ".join(head.paper.split()) in row and " ".join(head.doc.split()) in row
        assert f"``{head.module.__name__}``" in row and ("tokens only" in row) == head.tokens_only
        for key, value in head.options.items():
            assert f"``{key}={value!r}``" in row


def test_model_table_lists_every_registered_model_and_tag():
    import timm
    from timm.models import get_arch_pretrained_cfgs

    names = gen.covpool_models()
    assert {"resnet50_isqrt", "so_vit_7"} <= set(names)
    assert set(names) == {m for m in timm.list_models() if timm.models.model_entrypoint(m).__module__
                          .startswith("covpool.")}
    text = gen.model_table()
    for name in names:
        assert f"* - ``{name}``" in text
        for tagged in get_arch_pretrained_cfgs(name):
            assert f"* - ``{tagged}``" in text
    model = timm.create_model("so_vit_7")  # counted for real here, on the meta device there
    assert f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M" in text
    assert "76.8 %" in text.split("* - ``so_vit_7.in1k``", 1)[1].split("* -", 1)[0]


def test_benchmark_list_includes_what_each_folder_holds(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "bench.csv").write_text("variant,d,ms\nns,64,1.5\n")
    (tmp_path / "cpu" / "bench.png").write_bytes(b"")
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "backends.md").write_text("# backends\n")
    text = gen.benchmark_list(tmp_path)
    assert "   gpu/backends" in text  # a page the command wrote: in the toctree
    assert "* - variant" in text and "  - 1.5" in text  # a folder with tables only: the tables themselves
    assert gen.benchmark_list(tmp_path / "gpu").strip() == "No benchmark folder yet."


def test_link_checker_finds_broken_links_anchors_and_network_loads(tmp_path):
    (tmp_path / "index.html").write_text(
        '<html><head><link rel="stylesheet" href="https://cdn.example.org/x.css">'
        '<script src="_static/here.js"></script></head><body id="top">'
        '<a href="page.html#there">ok</a> <a href="page.html#nowhere">bad anchor</a> <a href="gone.html">gone</a>'
        '<a href="https://example.org/">an external link is fine</a> <a href="#top">self</a></body></html>')
    (tmp_path / "page.html").write_text('<html><body><section id="there"></section>'
                                        '<img src="missing.png"></body></html>')
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "here.js").write_text("")
    (tmp_path / "_static" / "style.css").write_text("@font-face { src: url(https://fonts.example.org/f.woff2) }")
    problems = links.check_site(tmp_path)
    assert sorted(problems) == sorted([
        "index.html: loads https://cdn.example.org/x.css from the network",
        "index.html: link to page.html#nowhere: page.html has no anchor 'nowhere'",
        "index.html: link to gone.html: no such file",
        "page.html: loads missing.png, which is not in the site",
        "_static/style.css: loads https://fonts.example.org/f.woff2 from the network",
    ])


def test_generated_pages_are_written_where_sphinx_reads_them(tmp_path):
    gen.write_pages(tmp_path)
    assert (tmp_path / "api" / "index.rst").is_file() and (tmp_path / "api" / "covpool.layers.rst").is_file()
    for name in gen.GENERATED:
        assert (tmp_path / "_generated" / name).read_text(encoding="utf-8").strip()


def test_gallery_examples_are_plot_scripts_with_a_title():
    scripts = sorted((REPO / "examples" / "gallery").glob("*.py"))
    assert len(scripts) >= 3
    for script in scripts:
        assert script.name.startswith("plot_"), f"{script.name}: sphinx-gallery runs only plot_*.py"
        head = script.read_text(encoding="utf-8").split('"""')[1].strip().splitlines()
        assert len(head) >= 2 and set(head[1]) == {"="}, f"{script.name}: the docstring needs a title"


def test_the_generator_reads_only_public_names_of_covpool():
    """It read cli._COMMANDS, config._hints, config._is_section, config._range_text and validate._NAMED: a
    rename inside the application broke the site. It now reads config_schema() and the launcher's COMMANDS."""
    import ast

    tree = ast.parse((DOCS / "_ext" / "covpool_docs.py").read_text(encoding="utf-8"))
    modules = set()  # the names the generator binds to covpool's modules and objects
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("covpool", "_covpool_cli"):
            modules.update(a.asname or a.name for a in node.names)
            assert not any(a.name.startswith("_") for a in node.names), ast.unparse(node)
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name for a in node.names if a.name.split(".")[0] in ("covpool",
                                                                                                "_covpool_cli"))
    private = sorted({ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                      and isinstance(node.value, ast.Name) and node.value.id in modules
                      and node.attr.startswith("_") and not node.attr.startswith("__")})
    assert not private, f"the docs generator reads private names: {private}"


# ------------------------------------------------------------------------------ the README and the guides
README = REPO / "README.md"
GUIDES = sorted((DOCS / "guides").glob("*.md"))
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """The anchor GitHub and MyST (``myst_heading_anchors``) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path) -> set[str]:
    lines, in_code = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            lines.append(_slug(line.lstrip("#")))
    return set(lines)


def _local_links(path) -> list[str]:
    """The relative targets of a Markdown file's links and images, outside code blocks."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [t for t in MARKDOWN_LINK.findall(text) if not re.match(r"[a-z]+:|#", t)]


def _broken(path) -> list[str]:
    problems = []
    for target in _local_links(path):
        file, _, anchor = target.partition("#")
        where = (path.parent / file).resolve()
        if not where.is_file():
            problems.append(f"{path.name}: {target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
            problems.append(f"{path.name}: {target}: {file} has no heading with that anchor")
    return problems


def test_the_readme_is_a_landing_page():
    """Under 200 lines (issue 25): what covpool is, the two commands, install, a quick start, a picture."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200
    assert "make demo" in text and "make test" in text and "```python" in text
    assert re.search(r"!\[[^\]]*\]\(docs/[^)]+\.png\)", text), "the README's picture, a figure a command drew"


def test_the_readme_links_into_every_guide_and_its_links_resolve():
    links = {(README.parent / t.partition("#")[0]).resolve() for t in _local_links(README)}
    assert GUIDES, "the guides are the Markdown pages of docs/guides/"
    assert not [g.name for g in GUIDES if g.resolve() not in links], "a guide the README does not link to"
    assert not _broken(README)


@pytest.mark.parametrize("page", GUIDES + sorted((DOCS / "benchmarks").glob("*.md")), ids=lambda p: p.name)
def test_the_links_of_a_guide_resolve(page):
    """On GitHub too: a relative link names a file of the repository, and an anchor a heading of it."""
    assert not _broken(page)


@pytest.mark.parametrize("page", [README, *GUIDES], ids=lambda p: p.name)
def test_prose_lines_are_at_most_120_characters(page):
    """Tables and code blocks aside, where a long line cannot be split."""
    long, in_code = [], False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and not line.startswith("|") and len(line) > 120:
            long.append(number)
    assert not long, f"{page.name}: lines {long} are over 120 characters"
