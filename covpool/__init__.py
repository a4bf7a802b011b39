"""covpool: second-order (covariance) pooling and whitening for PyTorch vision models.

``import covpool`` gives the square-root backends (:func:`sqrtm`, :func:`inv_sqrtm`), the meta-layers
and registers covpool's backbones with timm, so ``timm.create_model("so_vit_7")`` works after it.
``covpool.load_model(checkpoint)`` rebuilds a model trained by ``covpool train`` from its checkpoint
(:func:`covpool.train.load_model`); it belongs to the training tools (the ``train`` extra), which load on its
first use, not with ``import covpool``.
"""
from typing import Any

from . import layers, linalg, models  # noqa: F401  (subpackages; importing models registers them with timm)
from .layers import *  # noqa: F401,F403
from .linalg import (
    covariance,
    covariance_power,
    covariance_sqrtm,
    get_backend,
    inv_sqrtm,
    list_backends,
    matrix_power,
    register_backend,
    sqrtm,
    triu_vectorize,
)
from .models import *  # noqa: F401,F403

__version__ = "0.1.0"

__all__ = [
    "sqrtm",
    "inv_sqrtm",
    "list_backends",
    "register_backend",
    "get_backend",
    "covariance",
    "covariance_sqrtm",
    "covariance_power",
    "matrix_power",
    "triu_vectorize",
    *layers.__all__,
    *models.__all__,
]

# Names of the training tools offered here too, loaded on first use: the library does not import the application
# above it (covpool.train needs the `train` extra), so they are not in __all__ and `import *` does not load them.
_APPLICATION_NAMES = {"load_model": "covpool.train.inference"}


def __getattr__(name: str) -> Any:
    if name not in _APPLICATION_NAMES:
        raise AttributeError(f"module 'covpool' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(_APPLICATION_NAMES[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_APPLICATION_NAMES})
