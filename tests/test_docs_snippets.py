"""Every ```python block of README.md and of docs/**/*.md runs, as a reader who pastes it would run it.

How a block is checked:

- It runs on its own, in a fresh namespace: every block carries its own imports (``import torch, covpool``).
- It may use a submodule as an attribute (``timm.data.resolve_model_data_config``) only if a fresh interpreter
  has that submodule after the block's own imports: ``import timm`` loads ``timm.data`` but not
  ``timm.optim``, so ``timm.optim.create_optimizer_v2`` needs ``import timm.optim``. This is checked
  statically, against the modules a fresh interpreter holds after ``import X`` for each package X the block
  imports (one subprocess per package that no other imported package already loads), because this process
  has imported everything the suite uses.
- Nothing is downloaded: creating a model with pretrained weights (timm's ``pretrained=True``, torchvision's
  ``weights=...``) fails the block, unless the line right before its fence says
  ``<!-- snippet: random weights -->``: then those models start from random weights instead and the block
  runs on (what it shows is the API, not the weights).
- The rare block that cannot run here at all (it needs a GPU, a data set, a file it cannot make) is preceded by
  ``<!-- snippet: skip (why) -->``, the reason in parentheses; it is still compiled and import-checked, and at
  most two blocks may skip. Prefer making a block runnable: tiny sizes, the embedded data set, files it writes
  itself under a temporary folder.

Blocks run in this process (the imports are already paid for), with the random state restored afterwards.
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!--\s*snippet:\s*(.*?)\s*-->$")
MAX_SKIPPED = 2


def documents() -> list[Path]:
    docs = [p for p in sorted((REPO / "docs").rglob("*.md")) if not any(part.startswith("_") for part in p.parts)]
    return [REPO / "README.md", *docs]


def blocks() -> list[tuple[str, str, str]]:
    """``(where, marker, code)`` of every ```python block: ``where`` is ``file:line`` of its fence, ``marker``
    the ``<!-- snippet: ... -->`` on the line right before it (or "")."""
    found = []
    for path in documents():
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
                above = MARKER.match(lines[i - 1].strip()) if i else None
                where = f"{path.relative_to(REPO)}:{i + 1}"
                found.append((where, above[1] if above else "", "\n".join(lines[i + 1:end]) + "\n"))
                i = end
            i += 1
    return found


BLOCKS = blocks()


@cache
def fresh_modules(package: str) -> frozenset[str]:
    """The modules a fresh interpreter holds after ``import package`` (this checkout first on the path)."""
    code = f"import json, sys\nimport {package}\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    return frozenset(json.loads(run.stdout.strip().splitlines()[-1]))


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_imports(code: str) -> list[str]:
    """Submodules the block reaches as attributes (``pkg.sub``) that its own imports do not load in a fresh
    interpreter."""
    tree = ast.parse(code)
    bound: dict[str, str] = {}  # a name in the block -> the module it is
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                imported.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
                bound[alias.asname or parts[0]] = alias.name if alias.asname else parts[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module)
            for alias in node.names:
                if _is_module(f"{node.module}.{alias.name}"):
                    imported.add(f"{node.module}.{alias.name}")
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    loaded: set[str] = set()
    # A package that another imported package loads has its own fresh modules loaded with it: one subprocess
    # for covpool covers torch, timm and torchvision.
    for top in sorted({m.split(".")[0] for m in imported}, key=lambda m: m != "covpool"):
        if top not in loaded:
            loaded |= fresh_modules(top)
    available = imported | loaded
    missing = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = []
        inner = node
        while isinstance(inner, ast.Attribute):
            chain.append(inner.attr)
            inner = inner.value
        if not isinstance(inner, ast.Name) or inner.id not in bound:
            continue
        module = bound[inner.id]
        for attr in reversed(chain):
            sub = f"{module}.{attr}"
            if not _is_module(sub):
                break
            if sub not in available:
                missing.append(sub)
                break
            module = sub
    return sorted(set(missing))


@contextlib.contextmanager
def pretrained_weights(random: bool):
    """Downloads fail, or (``random``) timm's and torchvision's pretrained models start from random weights."""
    import timm.models._builder as timm_builder
    import torchvision
    from torchvision.models._api import WeightsEnum

    def timm_load(model, *args, **kwargs):
        if not random:
            raise RuntimeError("this block downloads pretrained weights: put `<!-- snippet: random weights -->` "
                               "on the line before its fence, or make it use none")

    def torchvision_state_dict(weights, *args, **kwargs):
        if not random:
            timm_load(None)
        builders = [m for m in torchvision.models.list_models()
                    if torchvision.models.get_model_weights(m) is type(weights)]
        model = torchvision.models.get_model(builders[0], weights=None,
                                             num_classes=len(weights.meta["categories"]))
        return model.state_dict()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(timm_builder, "load_pretrained", timm_load)
        mp.setattr(WeightsEnum, "get_state_dict", torchvision_state_dict)
        yield


def test_markers_are_known_and_skips_are_rare():
    skipped = []
    for where, marker, _ in BLOCKS:
        assert marker in ("", "random weights") or re.fullmatch(r"skip \(.+\)", marker), \
            f"{where}: unknown marker <!-- snippet: {marker} -->"
        if marker.startswith("skip"):
            skipped.append(where)
    assert len(skipped) <= MAX_SKIPPED, f"make these blocks runnable instead: {skipped}"


@pytest.mark.parametrize("where, marker, code", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_the_block_runs_when_pasted(where, marker, code):
    missing = missing_imports(code)
    assert not missing, f"{where} uses {missing} without importing them (a fresh interpreter has not loaded them)"
    compiled = compile(code, where, "exec")
    if marker.startswith("skip"):
        return
    with torch.random.fork_rng(), pretrained_weights(random=marker == "random weights"):
        exec(compiled, {"__name__": "__snippet__"})
