"""Pure functions on batches of matrices: covariance, vectorisation and the square-root backends.

No ``nn.Module`` and no timm here; everything above (layers, models, tools) builds on these.
"""
from . import _spectral  # noqa: F401,I001  (registers eig and the SVD family first)
from . import _ns  # noqa: F401,I001  (then ns)
from . import _lyapunov  # noqa: F401,I001  (then mtp_lya, mpa_lya)
from ._api import covariance, covariance_power, covariance_sqrtm, inv_sqrtm, sqrtm, triu_vectorize
from ._lyapunov import lyapunov_sign
from ._spectral import matrix_power
from ._registry import Backend, BackendSpec, Option, get_backend, list_backends, register_backend, resolve_backend

__all__ = [
    "sqrtm",
    "inv_sqrtm",
    "list_backends",
    "register_backend",
    "get_backend",
    "resolve_backend",
    "Backend",
    "BackendSpec",
    "Option",
    "covariance",
    "covariance_sqrtm",
    "covariance_power",
    "matrix_power",
    "triu_vectorize",
    "lyapunov_sign",
]
