"""The backend registry: a dict from name to :class:`Backend`, and option checking."""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._checks import check_int, check_number, did_you_mean, is_int

__all__ = ["Backend", "BackendSpec", "Option", "register_backend", "get_backend", "list_backends", "resolve_backend"]

BackendFn = Callable[..., torch.Tensor]
ProductsFn = Callable[..., tuple[int, int]]

BackendSpec = str | Mapping[str, Any]
"""What every ``backend=`` argument takes: a registered name, or a dict with ``name`` and options."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword option of a backend: its default and a check that returns the normalised value.

    Args:
        default: the value used when the option is not given; it is not passed through ``check``.
        check: ``check(key, value)`` returns the value to use (e.g. a list from a config file as a tuple) or
            raises ValueError naming ``key`` (``"backend.option"``) and what it accepts.
        doc: one line for the backend reference (:doc:`/reference/backends`).
    """

    default: Any
    check: Callable[[str, Any], Any]
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class Backend:
    """A registered square-root backend, as :func:`register_backend` makes it (frozen; build one through it).

    Args:
        name: the name :func:`get_backend` and every ``backend=`` argument know it by.
        fn: ``fn(a, inverse, **options)`` receives a float32/float64 tensor of shape ``(B, n, n)`` (batch dims
            flattened, autocast off) and returns the square root (``inverse=False``) or inverse square root.
        options: each keyword option of ``fn`` and its :class:`Option`.
        doc: one line for the backend reference (:doc:`/reference/backends`).
        products_fn: declared by backends built from matrix products only, ``products_fn(inverse, **options)``
            returns how many batched ``n×n`` products one call performs: ``(forward, forward + backward)``;
            None otherwise (:meth:`products`).
        gram_fn: declared by backends that can work on the Gram side, ``gram_fn(u, **options)`` receives
            ``(B, d, M)`` factors U and returns ``sqrtm(U Uᵀ)`` computed from the M×M matrix Uᵀ U, with the same
            value and gradient (see :func:`covpool.linalg.covariance_sqrtm`); None otherwise.
        gram_below: ``gram="auto"`` uses the Gram side when the samples M < ``gram_below`` × the channels d
            (:meth:`uses_gram`).
        gram_scale: ``gram_fn`` also takes ``scale=`` (``(B, 1, 1)``, the power of two the features were
            divided by) and returns the root of the unscaled matrix itself.
        fn_scale: the same for ``fn``, which then returns the root of scale²·A.
    """

    name: str
    fn: BackendFn
    options: Mapping[str, Option]
    doc: str = ""
    products_fn: ProductsFn | None = None
    gram_fn: BackendFn | None = None
    gram_below: float = 0.0
    gram_scale: bool = False
    fn_scale: bool = False

    @property
    def defaults(self) -> dict[str, Any]:
        """Each option's default, in a new dict."""
        return {k: opt.default for k, opt in self.options.items()}

    def bind(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``options``, each checked; unknown names raise and list the valid ones."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(f"{k}={v.default!r}" for k, v in self.options.items()) or "none"
            hint = "".join(did_you_mean(k, self.options) for k in unknown[:1])
            raise TypeError(f"backend {self.name!r} got unknown option(s) {unknown}{hint}; its options are: {valid}")
        bound = self.defaults
        for key, value in options.items():
            bound[key] = self.options[key].check(f"{self.name}.{key}", value)
        return bound

    def uses_gram(self, channels: int, samples: int, gram: bool | str = "auto") -> bool:
        """Whether :func:`covpool.linalg.covariance_sqrtm` computes the root of a ``channels``-square
        covariance of ``samples`` samples on the Gram side: ``gram=True`` always (an error for a backend
        without one), False never, ``"auto"`` when ``samples < gram_below · channels``.

        Example::

            >>> import covpool
            >>> ns = covpool.get_backend("ns")
            >>> ns.uses_gram(256, 49), ns.uses_gram(256, 196), ns.uses_gram(256, 256)
            (True, True, False)
        """
        check_gram("gram", gram)
        if gram is True and self.gram_fn is None:
            have = ", ".join(name for name, b in _REGISTRY.items() if b.gram_fn is not None) or "none"
            raise ValueError(f"backend {self.name!r} has no Gram-side form (backends with one: {have}); "
                             "pass gram='auto' or False")
        if self.gram_fn is None or gram is False:
            return False
        return gram is True or samples < self.gram_below * channels

    def products(self, inverse: bool = False, **options: Any) -> tuple[int, int] | None:
        """``(forward, forward + backward)`` batched matrix products of one call with ``options``
        (checked, defaults filled in), whatever n, for the square root or, with ``inverse``, the inverse
        square root; None for a backend that did not declare them (the eigendecomposition and SVD backends,
        whose cost is not a product count). An unknown option raises TypeError, a bad value ValueError.

        Example::

            >>> import covpool
            >>> covpool.get_backend("ns").products(num_iters=5)
            (12, 36)
        """
        bound = self.bind(options)
        return None if self.products_fn is None else self.products_fn(inverse, **bound)


_REGISTRY: dict[str, Backend] = {}


def register_backend(
    name: str,
    fn: BackendFn,
    options: Mapping[str, Option] | None = None,
    doc: str = "",
    products: ProductsFn | None = None,
    gram: BackendFn | None = None,
    gram_below: float = 0.8,
) -> Backend:
    """Register ``fn`` under ``name`` so ``sqrtm(a, backend=name)`` can use it.

    From features (:func:`covpool.linalg.covariance_sqrtm`), ``fn`` and ``gram`` receive the features divided
    by a power of two per matrix (so that the covariance stays in the dtype's range), and covpool multiplies
    the root back; a ``fn`` or ``gram`` that takes a keyword ``scale`` (that power of two, ``(B, 1, 1)``)
    returns the root of the unscaled matrix itself (for ``fn``: of scale²·A), folding the factor into its small
    tensors instead of a pass over the d×d result (the shipped backends do).

    Args:
        name: the new backend's name, a non-empty string not registered yet.
        fn: ``fn(a, inverse, **options)``: receives ``(B, n, n)`` float32/float64 matrices (batch dimensions
            flattened, autocast off) and returns their square root (``inverse=False``) or inverse square root,
            same shape and dtype, differentiably.
        options: maps each keyword option of ``fn`` to an :class:`Option` (default and check); None: no options.
        doc: one line describing the backend, shown in the backend reference (:doc:`/reference/backends`).
        products: for a backend made of matrix products, ``products(inverse, **options) -> (forward,
            forward + backward)``, its count of batched n×n products, which ``covpool bench`` reports next to
            the times (:meth:`Backend.products`).
        gram: ``gram(u, **options)``, the square root of a covariance ``U Uᵀ`` computed from the Gram matrix
            ``Uᵀ U`` (``u``: ``(B, d, M)``), which :func:`covpool.linalg.covariance_sqrtm` uses on its own when
            M < ``gram_below``·d; without it the backend is always given the d×d matrix.
        gram_below: the ratio M/d below which ``gram="auto"`` takes the Gram side (>= 0; measure where yours
            gets cheaper: the shipped backends use 0.7 to 0.9).

    Returns:
        The registered :class:`Backend`.

    Raises:
        TypeError: ``name`` is not a non-empty string, or ``products`` or ``gram`` is not callable.
        ValueError: ``name`` is already registered, or ``gram_below`` is not a finite number >= 0.

    Example::

        >>> import torch, covpool
        >>> from covpool.linalg import Option, register_backend
        >>> def my_eig(a, inverse):
        ...     lam, v = torch.linalg.eigh(a)
        ...     f = lam.clamp_min(1e-12).rsqrt() if inverse else lam.clamp_min(0).sqrt()
        ...     return (v * f.unsqueeze(-2)) @ v.mT
        >>> _ = register_backend("my_eig", my_eig)
        >>> covpool.sqrtm(4 * torch.eye(2), backend="my_eig")
        tensor([[2., 0.],
                [0., 2.]])
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a backend name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"backend {name!r} is already registered; pick another name")
    if products is not None and not callable(products):
        raise TypeError(f"products must be a function (inverse, **options) -> (forward, forward + backward), "
                        f"got {type(products).__name__}")
    if gram is not None and not callable(gram):
        raise TypeError(f"gram must be a function (u, **options) -> sqrtm(u @ u.mT), got {type(gram).__name__}")
    check_number("gram_below", gram_below, 0.0)
    gram_scale = gram is not None and "scale" in inspect.signature(gram).parameters
    fn_scale = callable(fn) and "scale" in inspect.signature(fn).parameters
    backend = Backend(name=name, fn=fn, options=dict(options or {}), doc=doc, products_fn=products, gram_fn=gram,
                      gram_below=float(gram_below), gram_scale=gram_scale, fn_scale=fn_scale)
    _REGISTRY[name] = backend
    return backend


def list_backends() -> list[str]:
    """Names of the registered backends, in registration order."""
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The :class:`Backend` registered as ``name``; an unknown name raises and lists the valid ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backend {name!r}; valid backends are: {', '.join(_REGISTRY)}") from None


def resolve_backend(backend: BackendSpec, options: Mapping[str, Any] | None = None) -> tuple[Backend, dict[str, Any]]:
    """Turn ``backend`` (a name, or a dict with ``name`` and options) plus keyword ``options`` (None: none)
    into a backend and its checked options, defaults filled in. Keyword options override those in the dict;
    the dict is not modified. Raises TypeError for a ``backend`` of another type or an unknown option,
    ValueError for an unknown name, a dict without ``name`` or an option's bad value.

    The one check of a backend spec: the functions call it per call, the layers at construction (so an
    unknown name or option fails when the model is built, not at its first forward)."""
    options = {} if options is None else options
    if isinstance(backend, Mapping):
        spec = dict(backend)
        if "name" not in spec:
            raise ValueError(f"a backend dict needs a 'name' key (one of {', '.join(_REGISTRY)}), got {backend!r}")
        name = spec.pop("name")
        spec.update(options)
        options = spec
    elif isinstance(backend, str):
        name = backend
    else:
        raise TypeError(f"backend must be a name or a dict with 'name' and options, got {type(backend).__name__}")
    entry = get_backend(name)
    return entry, entry.bind(options)


def int_at_least(low: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        return check_int(key, value, low)

    return check


def check_gram(key: str, value: Any) -> bool | str:
    """The ``gram`` argument of :meth:`Backend.uses_gram` and of the pooling layers: ``"auto"``, True or False."""
    if not (value is True or value is False or value == "auto"):  # not `in`: 1 == True
        raise ValueError(f"{key} must be 'auto', True or False, got {value!r}")
    return value


def bool_option(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def one_of(*choices: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    return check


def degree_pair(key: str, value: Any) -> tuple[int, int]:
    """A Padé degree: ``(m, n)`` (a list from a config file is fine) or one int meaning ``(k, k)``."""
    if is_int(value):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(not is_int(v) or v < 0 for v in value)
        or sum(value) < 2
    ):
        raise ValueError(f"{key} must be a pair (m, n) of non-negative integers with m + n >= 2, got {value!r}")
    return int(value[0]), int(value[1])
