"""Every example in examples/ runs in its small-size mode and does what it says."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from _train_helpers import REPO

import covpool

EXAMPLES = REPO / "examples"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"covpool_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    tested = {"swap_pooling", "finetune_so_vit", "zca_resnet", "compare_backends"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_swap_pooling_small(source, capsys):
    loss = _load("swap_pooling").main(["--source", source, "--small"])
    out = capsys.readouterr().out
    assert math.isfinite(loss) and 0.0 < loss < 10.0
    # reduced_dim 32 -> 32*33/2 = 528 covariance entries feed the new classifier
    assert "in_features=528, out_features=8" in out and "3 steps" in out


def test_finetune_so_vit_small(capsys):
    acc = _load("finetune_so_vit").main(["--small"])
    out = capsys.readouterr().out
    assert 0.0 <= acc <= 100.0 and "head SoViTHead" in out and "3 steps" in out


@pytest.mark.parametrize("backend,limit", [("eig", 5e-3), ("ns", None)])
def test_zca_resnet_small(backend, limit, capsys):
    residual = _load("zca_resnet").main(["--small", "--backend", backend])
    out = capsys.readouterr().out
    assert "replaced 20 BatchNorm2d layers" in out
    line = out.split("max |off-diagonal covariance|: ")[1].splitlines()[0]
    before, bn, zca = (float(part.split()[-1]) for part in line.split(", "))
    assert zca == pytest.approx(residual, abs=1e-3)
    # BatchNorm keeps the input's correlations; exact whitening removes them, 5 Newton-Schulz steps most of them
    assert bn > 0.3
    assert zca < limit if limit is not None else zca < bn / 2


def test_compare_backends_small(capsys):
    results = _load("compare_backends").main(["--small"])
    assert set(results) == set(covpool.list_backends())
    # the eigendecomposition family is exact; the iterative ones are approximations of a few iterations
    for name, r in results.items():
        assert r["rel_error"] < (1e-5 if name == "eig" or name.startswith("svd") else 0.2), name
        assert r["forward_s"] > 0 and r["forward_backward_s"] > 0
    out = capsys.readouterr().out
    assert all(name in out for name in covpool.list_backends())


@pytest.mark.slow
def test_example_runs_as_a_script():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "compare_backends.py"), "--small"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rel. error" in proc.stdout and "eig" in proc.stdout
