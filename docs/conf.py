"""Sphinx configuration of covpool's documentation site (``make docs`` → ``docs/_build/html``).

Sphinx with autodoc/autosummary/napoleon (the API reference from the docstrings), sphinx-gallery (examples
executed at build time), MyST (the Markdown pages ``covpool bench`` writes) and the PyData theme, the one
PyTorch's own theme builds on. The site works offline: MathJax is served from the site itself
(sphinx-mathjax-offline) and the theme loads no fonts or scripts from elsewhere (``docs/tools/check_links.py``
checks it). ``-W --keep-going`` makes every warning an error; ``nitpicky`` makes every unresolved
cross-reference one.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))  # this checkout's covpool, not an installed one

import torch  # noqa: E402

import covpool  # noqa: E402

# The gallery's matrices and networks are small: on 2 cores a second thread costs more in synchronisation
# than it saves (20 training steps of a two-layer net on a busy machine: 9.2 s with 2 threads, 0.6 s with one).
torch.set_num_threads(1)

project = "covpool"
author = "covpool developers"
copyright = "covpool developers, MIT licence"
release = version = covpool.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
    "covpool_docs",
    "covpool_params",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_generated", "gallery/*.ipynb", "gallery/*.py", "**/README.md"]
templates_path = ["_templates"]
root_doc = "index"

# ---- the API reference ----------------------------------------------------------------------------------
autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_class_signature = "separated"
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
python_use_unqualified_type_names = True

nitpicky = True
# No intersphinx: the build is offline (CI reaches no documentation site). Names of other libraries stay
# plain text; a reference to covpool's own names must resolve.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|timm|torchvision|numpy|yaml|einops|matplotlib|PIL|skimage|tqdm)(\..*)?"),
    (r"py:.*", r"(collections|typing|types|pathlib|dataclasses|argparse|enum|abc|os|io|contextlib|signal|logging)"
     r"(\..*)?"),
    (r"py:.*", r"(Tensor|nn\.Module|Module|Path|Mapping|Callable|Sequence|Iterable|Iterator|Hashable|Collection)"),
    # the application's own modules (what every command writes, the benchmark, the demo) are not library API
    (r"py:.*", r"covpool\.(outputs|bench|demo|cli)(\..*)?"),
]

# ---- the gallery ----------------------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": str(DOCS.parent / "examples" / "gallery"),
    "gallery_dirs": "gallery",
    "filename_pattern": r"/plot_",
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "within_subsection_order": "FileNameSortKey",
    "abort_on_example_error": False,
    "only_warn_on_example_error": False,
    "reset_modules": ("matplotlib",),
    "show_memory": False,
    "write_computation_times": False,  # its page loads jQuery and DataTables from CDNs
    "plot_gallery": os.environ.get("COVPOOL_DOCS_GALLERY", "True"),
    "image_scrapers": ("matplotlib",),
}

# ---- the site --------------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"covpool {release}"
html_static_path = ["_static"]
html_css_files = ["covpool.css"]
html_show_sourcelink = False
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "navbar_align": "left",
    "header_links_before_dropdown": 6,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_context = {"default_mode": "light"}
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
