"""The pages of the site that the code writes: the API reference, the config, command-line, backend, head and
model references, and the list of benchmark pages.

Each page is a function of the code as it is imported (``__all__`` of the public modules, the config schema,
the argument parsers, the backend, head and timm registries), called when the site is built (Sphinx's
``config-inited``), so none of them can disagree with the code. ``tests/test_docs.py`` calls the same
functions and checks every name of the registries and the schema appears in them.

Sphinx extension: ``setup(app)`` writes the pages into ``docs/api/`` and ``docs/_generated/`` (both ignored by
git), resolves cross-references to any public alias of a documented object (``covpool.CovPool`` →
``covpool.layers.CovPool``), shows a private base class as the public bases it stands on, and mends viewcode's
backlinks for modules whose names are documented under two modules.
"""
from __future__ import annotations

import ast
import contextlib
import csv
import dataclasses
import functools
import importlib
import inspect
import io
import os
import pkgutil
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["API_MODULES", "EXTRA_HELP", "GENERATED", "api_modules", "api_pages", "public_objects", "docstring_of",
           "config_reference", "commands", "cli_reference", "backend_table", "head_table",
           "covpool_models", "model_table", "benchmark_list", "write_pages", "setup"]

DOCS = Path(__file__).resolve().parent.parent

#: the public modules whose ``__all__`` is the API reference, the package first: a name the package re-exports
#: from a subpackage is documented once, where the subpackage's ``__all__`` puts it
API_MODULES = ("covpool", "covpool.linalg", "covpool.layers", "covpool.models", "covpool.train", "covpool.testing")

#: command-line modes whose ``--help`` differs from their command's plain ``--help``
EXTRA_HELP: dict[str, tuple[tuple[str, ...], ...]] = {"demo": (("--hybrid",), ("--heads",))}


# ------------------------------------------------------------------------------------------------ helpers
def _title(text: str, char: str = "=") -> str:
    return f"{text}\n{char * len(text)}\n"


def _cell(text: Any) -> str:
    """``text`` on one line, for a list-table cell (its markup is kept: a stray one fails the build)."""
    return " ".join(str(text).split()) or " "


def _literal(text: Any) -> str:
    return f"``{text}``" if str(text) else " "


def _list_table(header: Iterable[str], rows: Iterable[Iterable[str]], widths: str = "auto") -> str:
    """A ``list-table`` whose cells may hold several lines (continuation lines are indented)."""
    out = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}", ""]
    for row in [list(header), *(list(r) for r in rows)]:
        for i, cell in enumerate(row):
            lines = str(cell).split("\n") or [" "]
            out.append(f"   {'* -' if i == 0 else '  -'} {lines[0]}")
            out += [f"       {line}" if line else "" for line in lines[1:]]
    return "\n".join(out) + "\n"


def _first_line(doc: str | None) -> str:
    """The first paragraph of ``doc`` on one line, cross-reference roles turned into literals (a table
    of another module's names cannot resolve them)."""
    text = (doc or "").strip().split("\n\n")[0].replace("\n", " ")
    return re.sub(r":[\w:]+:`~?([^`<]*?)(?: <[^`]*>)?`", r"``\1``", text)


def _kind(obj: Any) -> str:
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "function"
    return "data"


# ------------------------------------------------------------------------------------------ API reference
def api_modules() -> list[str]:
    """:data:`API_MODULES`, then every public module inside its subpackages (no ``_`` in its name) whose
    ``__all__`` holds a name that none of them exports, e.g. :mod:`covpool.models.so_vit` for its model
    class."""
    modules = list(API_MODULES)
    exported = {id(getattr(m, n)) for m in map(importlib.import_module, API_MODULES) for n in m.__all__}
    for package in API_MODULES[1:]:  # covpool's own modules beside its subpackages are the application
        path = getattr(importlib.import_module(package), "__path__", None)
        for info in pkgutil.iter_modules(path or [], package + "."):
            if info.name.rsplit(".", 1)[1].startswith("_"):
                continue
            module = importlib.import_module(info.name)
            if any(id(getattr(module, n)) not in exported for n in getattr(module, "__all__", ())):
                modules.append(info.name)
    return modules


def public_objects() -> dict[str, list[tuple[str, Any, str]]]:
    """Per module of :func:`api_modules`: ``(name, object, home)`` for every name of its ``__all__``, where
    ``home`` is the full name the object is documented under: the first module (subpackages before their
    modules, the package ``covpool`` last) whose ``__all__`` holds it."""
    names = api_modules()
    modules = {name: importlib.import_module(name) for name in names}
    homes: list[tuple[Any, str]] = []

    def home_of(obj: Any) -> str | None:
        return next((home for other, home in homes if other is obj), None)

    for name in names[1:] + names[:1]:
        for attr in modules[name].__all__:
            obj = getattr(modules[name], attr)
            if home_of(obj) is None:
                homes.append((obj, f"{name}.{attr}"))
    return {name: [(attr, getattr(mod, attr), home_of(getattr(mod, attr)) or "") for attr in mod.__all__]
            for name, mod in modules.items()}


def _module_attribute_docs(path: Path) -> dict[str, str]:
    """``name -> doc`` of a module file's top-level assignments documented by a string right below them or by
    ``#:`` comments right above them (Sphinx's conventions), read from the source."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    body = ast.parse(source).body
    docs: dict[str, str] = {}
    for stmt, after in zip(body, [*body[1:], None]):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) \
            else []
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        if not names:
            continue
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            doc = inspect.cleandoc(after.value.value)
        else:
            above, row = [], stmt.lineno - 2
            while row >= 0 and lines[row].lstrip().startswith("#:"):
                above.insert(0, lines[row].lstrip()[2:].strip())
                row -= 1
            doc = "\n".join(above)
        for name in names:
            if doc:
                docs.setdefault(name, doc)
    return docs


def _attribute_docs(module_name: str) -> dict[str, str]:
    """``name -> doc`` of the module-level names documented by a string right below their assignment (or a
    ``#:`` comment above it), in ``module_name`` and every module of its package (where a re-exported name
    such as ``covpool.linalg.BackendSpec`` is defined)."""
    module = importlib.import_module(module_name)
    files = [Path(module.__file__)] if module.__file__ else []
    if hasattr(module, "__path__"):
        files += sorted(Path(module.__path__[0]).glob("*.py"))
    docs: dict[str, str] = {}
    for path in files:
        for name, doc in _module_attribute_docs(path).items():
            docs.setdefault(name, doc)
    return docs


def docstring_of(module_name: str, attr: str) -> str:
    """The documentation the reference shows for ``module_name.attr``: a class's or function's own docstring
    (not one inherited, nor the signature a dataclass writes when it has none), or a data name's attribute
    docstring; ``""`` when it has none."""
    obj = getattr(importlib.import_module(module_name), attr)
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__") or ""
        if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            doc = ""  # dataclasses' stand-in: the signature
        return inspect.cleandoc(doc)
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return inspect.cleandoc(obj.__doc__ or "")
    return _attribute_docs(module_name).get(attr, "")


def api_pages() -> dict[str, str]:
    """``file name -> reStructuredText`` of the API reference: ``index.rst`` and one page per public module
    (its docstring, then an autosummary of the names its ``__all__`` documents, each with a page of its own;
    names documented elsewhere are listed with a link to their home)."""
    objects = public_objects()
    pages = {}
    index = [_title("API reference"),
             "Every public name of covpool, module by module, generated from each module's ``__all__`` and the "
             "docstrings. ``import covpool`` gives the names of :doc:`covpool`; the subpackages hold the rest.\n",
             ".. toctree::", "   :maxdepth: 1", ""]
    for module_name in objects:
        index.append(f"   {module_name}")
        own = [(attr, obj) for attr, obj, home in objects[module_name] if home == f"{module_name}.{attr}"]
        aliases = [(attr, home) for attr, obj, home in objects[module_name] if home != f"{module_name}.{attr}"]
        lines = [_title(module_name), f".. automodule:: {module_name}", "   :no-members:", "",
                 f".. currentmodule:: {module_name}", ""]
        for kind, heading in (("function", "Functions"), ("class", "Classes"), ("exception", "Exceptions"),
                              ("data", "Data")):
            names = [attr for attr, obj in own if _kind(obj) == kind]
            if names:
                lines += [_title(heading, "-"), ".. autosummary::", "   :toctree: generated", "   :nosignatures:",
                          "", *(f"   {attr}" for attr in names), ""]
        if aliases:
            lines += [_title("Re-exported names" if own else "Names", "-"),
                      f"``{module_name}.<name>`` is the same object as the entry it links to.\n",
                      _list_table(["name", "documented as", "summary"],
                                  [[_literal(f"{module_name}.{attr}"), f":py:obj:`{home}`",
                                    _cell(_first_line(docstring_of(home.rsplit('.', 1)[0], home.rsplit('.', 1)[1])))]
                                   for attr, home in aliases], widths="25 30 45")]
        pages[f"{module_name}.rst"] = "\n".join(lines)
    pages["index.rst"] = "\n".join(index) + "\n"
    return pages


# --------------------------------------------------------------------------------------- config reference
def config_reference() -> str:
    """Every key of ``covpool train``'s config: type, default, range and values, and its help, one table per
    section (:func:`covpool.train.config.config_schema`)."""
    from covpool.train.config import config_schema

    sections: dict[str, list[list[str]]] = {}
    for key in config_schema():
        limits = " ".join(filter(None, [key.range, key.values]))
        sections.setdefault(key.section or "top level", []).append(
            [_literal(key.key), _literal(key.type), _literal(repr(key.default)), _cell(limits), _cell(key.help)])
    out = []
    for section, rows in sections.items():
        anchor = "config-" + section.replace(" ", "-")
        heading = "Top-level keys" if section == "top level" else f"``{section}``"
        out += [f".. _{anchor}:\n", _title(heading, "-"),
                _list_table(["key", "type", "default", "range / values", "meaning"], rows, widths="18 12 12 20 38")]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ CLI reference
def _help_text(argv: list[str]) -> str:
    from covpool.cli import main

    out, previous = io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(out):
            status = main([*argv, "--help"])
    finally:
        if previous is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = previous
    if status != 0:
        raise RuntimeError(f"`covpool {' '.join(argv)} --help` exited with status {status}")
    return out.getvalue().rstrip()


def commands() -> list[str]:
    """The commands of ``covpool``, in the order ``covpool --help`` lists them (``_covpool_cli.COMMANDS``)."""
    import _covpool_cli

    return list(_covpool_cli.COMMANDS)


def cli_reference() -> str:
    """``covpool --help`` and every command's ``--help`` (and :data:`EXTRA_HELP`'s modes), verbatim."""
    def block(argv: list[str]) -> list[str]:
        text = _help_text(argv)
        return ["::", "", *(f"    {line}" if line else "" for line in text.splitlines()), ""]

    out = [".. _cli-covpool:\n", _title("``covpool``", "-"), *block([])]
    for command in commands():
        out += [f".. _cli-{command}:\n", _title(f"``covpool {command}``", "-"), *block([command])]
        for extra in EXTRA_HELP.get(command, ()):
            out += [_title(f"``covpool {command} {' '.join(extra)}``", "~"), *block([command, *extra])]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ registry tables
def backend_table() -> str:
    """Every registered square-root backend: what it computes, its options with their defaults, its product
    count and its Gram side."""
    import covpool

    rows = []
    for name in covpool.list_backends():
        b = covpool.get_backend(name)
        options = "\n".join(f"- ``{key}={opt.default!r}``: {_cell(opt.doc)}" for key, opt in b.options.items())
        products = ("eigendecomposition (no product count)" if b.products_fn is None else
                    "square root {} / {}, inverse {} / {}".format(*b.products(False), *b.products(True)))
        gram = f"when N < {b.gram_below:g}·d" if b.gram_fn is not None else "no"
        rows.append([f"``{name}``", _cell(b.doc), options or "none", products, gram])
    return _list_table(["name", "method", "options (default)", "products (forward / forward + backward)",
                        "Gram side (``gram='auto'``)"], rows, widths="10 30 35 15 10")


def head_table() -> str:
    """Every second-order head preset: its paper, what it is and the options that make it."""
    import covpool

    rows = []
    for name in covpool.list_heads():
        h = covpool.get_head(name)
        options = ", ".join(f"``{k}={v!r}``" for k, v in h.options.items()) or "iSQRT-COV's defaults"
        module = f"``{getattr(h.module, '__name__', h.module)}``" + (" (tokens only)" if h.tokens_only else "")
        rows.append([f"``{name}``", _cell(h.paper), _cell(h.doc), module, options])
    return _list_table(["name", "paper", "what it computes", "module", "options"], rows, widths="10 20 35 10 25")


def covpool_models() -> list[str]:
    """The models covpool registers in timm's registry."""
    import timm
    from timm.models import model_entrypoint

    import covpool  # noqa: F401  (registers them)

    return [m for m in timm.list_models() if model_entrypoint(m).__module__.split(".")[0] == "covpool"]


def _parameters(name: str) -> int:
    import timm
    import torch

    with torch.device("meta"):  # no memory, no initialisation: a count in milliseconds
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters())


def _loads(cfg: Any) -> str:
    if cfg.hf_hub_id:
        what = f"timm's hub: ``{cfg.hf_hub_id}``"
    elif cfg.url:
        what = f"`the authors' release <{cfg.url}>`__"
    elif cfg.file:
        what = f"the file ``{cfg.file}``"
    else:
        what = "nothing by itself: a downloaded file (see the notes)"
    return what + (" (backbone only)" if cfg.num_classes == 0 else f" ({cfg.num_classes} classes)")


def model_table() -> str:
    """Every model covpool registers in timm: paper, parameters, and for each pretrained tag what
    ``pretrained=True`` loads and the accuracy its authors report."""
    from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg

    models, weights = [], []
    for name in covpool_models():
        default = get_pretrained_cfg(name)
        paper = _cell(default.paper_name or "")
        if default.paper_ids:
            ids = str(default.paper_ids)
            link = f"https://arxiv.org/abs/{ids.split(':', 1)[1]}" if ids.startswith("arXiv:") else ""
            paper += f" (`{ids} <{link}>`__)" if link else f" ({ids})"
        models.append([f"``{name}``", paper, f"{_parameters(name) / 1e6:.2f} M", f"``{name}.{default.tag}``"])
        for tagged, cfg in get_arch_pretrained_cfgs(name).items():
            notes = " ".join(cfg.notes or ())
            top1 = re.search(r"(\d+(?:\.\d+)?)% top-1", notes)
            weights.append([f"``{tagged}``", _loads(cfg), f"{top1.group(1)} %" if top1 else "–", _cell(notes)])
    return "\n".join([
        _title("Architectures", "-"),
        "Parameters are counted with 1000 classes, on torch's meta device (no memory, no download).\n",
        _list_table(["model", "paper", "parameters", "default tag"], models, widths="15 55 12 18"),
        _title("Weights", "-"),
        "``timm.create_model('<model>.<tag>', pretrained=True)`` loads what the second column says; the top-1 "
        "accuracy is the one the notes quote from the authors (ImageNet-1k validation, 224²).\n",
        _list_table(["model.tag", "what loads", "authors' top-1", "notes"], weights, widths="20 25 10 45"),
    ])


# --------------------------------------------------------------------------------------------- benchmarks
def benchmark_list(folder: Path | None = None) -> str:
    """The benchmark folders under ``docs/benchmarks/`` (each the ``--out`` of a ``covpool bench`` run):
    their Markdown pages where the command wrote them, otherwise their CSV tables and PNG plots."""
    folder = DOCS / "benchmarks" if folder is None else folder
    out = []
    pages = sorted(p for p in folder.glob("*/*.md"))
    if pages:
        out += [".. toctree::", "   :maxdepth: 1", "",
                *(f"   {p.relative_to(folder).with_suffix('').as_posix()}" for p in pages), ""]
    for machine in sorted(p for p in folder.iterdir() if p.is_dir() and not any(p.glob("*.md"))):
        tables = sorted(machine.glob("*.csv"))
        if not tables:
            continue
        out.append(_title(f"``{machine.name}/``", "-"))
        for table in tables:
            with table.open(newline="", encoding="utf-8") as f:
                header, *rows = list(csv.reader(f))
            out += [f"``{machine.name}/{table.name}``:\n", _list_table(header, [[_cell(c) for c in r] for r in rows])
                    .replace("   :header-rows: 1", "   :header-rows: 1\n   :class: benchmark-table"), ""]
        for png in sorted(machine.glob("*.png")):
            rel = png.relative_to(folder.parent).as_posix()  # from the docs folder: Sphinx reads "/x" so
            out += [f".. figure:: /{rel}", f"   :alt: {png.name}", "   :width: 100%", "",
                    f"   ``{machine.name}/{png.name}``", ""]
    return "\n".join(out) or "No benchmark folder yet.\n"


# ------------------------------------------------------------------------------------------------ writing
def _write(path: Path, text: str) -> None:
    """Write only a changed page, so Sphinx rebuilds only what changed."""
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


GENERATED: dict[str, Callable[[], str]] = {
    "config.rst": config_reference,
    "cli.rst": cli_reference,
    "backends.rst": backend_table,
    "heads.rst": head_table,
    "models.rst": model_table,
    "benchmarks.rst": benchmark_list,
}


def write_pages(docs: Path = DOCS) -> None:
    """Write the API pages into ``docs/api/`` and the reference fragments into ``docs/_generated/``."""
    api = docs / "api"
    pages = api_pages()
    for stale in api.glob("*.rst"):
        if stale.name not in pages:
            stale.unlink()
    # autosummary writes a page per name and never removes one: start afresh, so a name gone from every
    # __all__ leaves no page behind
    shutil.rmtree(api / "generated", ignore_errors=True)
    for name, text in pages.items():
        _write(api / name, text)
    for name, make in GENERATED.items():
        _write(docs / "_generated" / name, make())


# ------------------------------------------------------------------------------------------------- Sphinx
@functools.cache
def _homes() -> dict[int, str]:
    return {id(obj): home for objects in public_objects().values() for _, obj, home in objects if home}


def _find(target: str, module: str, cls: str = "") -> tuple[Any, str, str] | None:
    """``(object, home, name)`` for a reference to covpool's code: ``target`` as written, inside the class
    ``cls`` or the ``module`` it is written in, or a bare name that one documented entry ends with. ``home``
    is where the reference documents it (its own entry, or its class's or module's entry with the attribute
    path appended), ``""`` when nowhere; ``name`` the full name it was found under."""
    homes = _homes()
    candidates = [target, f"{module}.{cls}.{target}" if module and cls else "", f"{module}.{target}" if module else ""]
    if "." not in target:
        same = [home for home in homes.values() if home.endswith("." + target)]
        candidates += same if len(same) == 1 else []
    for candidate in filter(None, candidates):
        if not candidate.startswith("covpool"):
            continue
        try:
            obj = pkgutil.resolve_name(candidate)
        except (ImportError, AttributeError, ValueError):
            continue
        parts = candidate.split(".")
        for i in range(len(parts), 0, -1):
            try:
                owner = pkgutil.resolve_name(".".join(parts[:i]))
            except (ImportError, AttributeError, ValueError):
                continue
            if id(owner) in homes:
                return obj, ".".join([homes[id(owner)], *parts[i:]]), candidate
        return obj, "", candidate
    return None


def _resolve_alias(app, env, node, contnode):
    """A reference to covpool's code that Sphinx could not resolve: to a public alias of a documented object
    (``covpool.CovPool`` → ``covpool.layers.CovPool``), to a member of one, or to a name documented in another
    module (``svpn`` from :class:`covpool.layers.MultiHeadCrossCov`) links to that entry; a real name that the
    reference does not document (an undocumented method, a module constant) stays plain text; anything else
    (a typo, a removed name) is left to Sphinx's warning."""
    if node.get("refdomain") != "py":
        return None
    found = _find(node.get("reftarget", ""), node.get("py:module") or "", node.get("py:class") or "")
    if found is None:
        return None
    _, home, _ = found
    if home:
        domain = env.get_domain("py")
        for reftype in (node["reftype"], "obj"):
            resolved = domain.resolve_xref(env, node["refdoc"], app.builder, reftype, home, node, contnode)
            if resolved is not None:
                return resolved
    return contnode


def _attribute_doc(app, what, name, obj, options, lines):
    """A data name re-exported by a package (``covpool.linalg.BackendSpec``) gets the docstring written
    under its definition, not its type's."""
    if what == "data" and name.startswith("covpool."):
        module, attr = name.rsplit(".", 1)
        doc = _attribute_docs(module).get(attr)
        if doc:
            lines[:] = doc.splitlines()


def _public_bases(app, name, obj, options, bases):
    """A class's private base (``_ZCABatchNorm``) is shown as the public bases it stands on."""
    def public(base: type) -> list[type]:
        if base.__name__.startswith("_") and base.__module__.startswith("covpool"):
            return [b for parent in base.__bases__ for b in public(parent)]
        return [base]

    bases[:] = [b for base in list(bases) for b in public(base)] or [object]


_BACKLINK = re.compile(r'href="([^"]*?api/generated/)([\w.]+)\.html#([\w.]+)"')


def _fix_backlinks(app, pagename, templatename, context, doctree):
    """viewcode keeps one documented module per source module, so on the source page of a module whose names
    are documented under two modules (:mod:`covpool.train` re-exports some names of
    :mod:`covpool.train.config`, which documents the rest) half its "[docs]" anchors name the other module.
    An API page is named after the entry it documents: the anchor is that name (a method's: that name and
    the method's)."""
    if not pagename.startswith("_modules/") or "body" not in context:
        return

    def fix(match: re.Match) -> str:
        base, page, anchor = match.groups()
        if anchor == page or anchor.startswith(page + "."):
            return match.group(0)
        last = "." + page.rsplit(".", 1)[-1]
        at = (anchor + ".").rfind(last + ".")
        qualified = page if at < 0 else page + anchor[at + len(last):]
        return f'href="{base}{page}.html#{qualified}"'

    context["body"] = _BACKLINK.sub(fix, context["body"])


def setup(app) -> dict[str, Any]:
    # config-inited: before Sphinx lists the source files, so the pages written here are among them
    app.connect("config-inited", lambda app, config: write_pages(Path(app.srcdir)))
    app.connect("missing-reference", _resolve_alias)
    app.connect("autodoc-process-docstring", _attribute_doc)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("html-page-context", _fix_backlinks)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

