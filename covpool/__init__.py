"""covpool: second-order (covariance) pooling and whitening for PyTorch vision models.

``import covpool`` gives the square-root backends (:func:`sqrtm`, :func:`inv_sqrtm`), the meta-layers
and registers covpool's backbones with timm, so ``timm.create_model("so_vit_7")`` works after it.
"""
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
