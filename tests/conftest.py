"""Fixtures shared by the library tests: the device and dtype they run on, and one-thread pinning.

``COVPOOL_TEST_DEVICE`` picks the device of the backend, layer and model tests that take the ``device``
fixture (default ``cpu``; e.g. ``cuda`` or ``cuda:1``), as timm's ``TORCH_DEVICE``;
``COVPOOL_TEST_DTYPE`` the working dtype of those that take ``dtype`` (default ``float32``; the tests
that compare against float64 references compute in float64 whatever it says)::

    COVPOOL_TEST_DEVICE=cuda pytest tests/test_linalg.py tests/test_layers.py tests/test_models.py

The references are computed on the CPU in float64; results are compared there. Helpers that tests
import (matrix families, references, ``rel``) live in :mod:`covpool.testing`. ``wheel`` builds the package's
wheel once per session, for the packaging tests.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _device() -> torch.device:
    name = os.environ.get("COVPOOL_TEST_DEVICE", "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise pytest.UsageError(f"COVPOOL_TEST_DEVICE={name!r} is not a torch device ({err}); use cpu, cuda, ...") \
            from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"COVPOOL_TEST_DEVICE={name!r} but torch sees no CUDA device")
    backend = getattr(torch, device.type, None)
    if device.type not in ("cpu", "cuda") and not (hasattr(backend, "is_available") and backend.is_available()):
        raise pytest.UsageError(f"COVPOOL_TEST_DEVICE={name!r}: torch.{device.type} is not an available accelerator")
    return device


def _dtype() -> torch.dtype:
    name = os.environ.get("COVPOOL_TEST_DTYPE", "float32")
    if name not in _DTYPES:
        raise pytest.UsageError(f"COVPOOL_TEST_DTYPE={name!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def pytest_configure(config):
    # Fail at start-up, not in every test, on a device or dtype that cannot be used.
    _device(), _dtype()


def pytest_report_header(config):
    return f"covpool test device: {_device()}, dtype: {_dtype()} (COVPOOL_TEST_DEVICE / COVPOOL_TEST_DTYPE)"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the backend, layer and model tests run (``COVPOOL_TEST_DEVICE``, default cpu)."""
    return _device()


@pytest.fixture(scope="session")
def dtype() -> torch.dtype:
    """The working dtype of the tests that are not float64 comparisons (``COVPOOL_TEST_DTYPE``, default float32)."""
    return _dtype()


@pytest.fixture
def one_thread():
    """Pin torch to one intra-op thread for the test (timings, determinism, a shared CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel ``pip wheel`` builds from this checkout (from a copy: setuptools leaves build/ and
    *.egg-info in the source tree)."""
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = shutil.copytree(REPO, tmp / "src", symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "bench_out", "*.egg-info", "__pycache__", ".pytest_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (path,) = (tmp / "dist").glob("covpool-*.whl")
    return path
