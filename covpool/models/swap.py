"""``swap_pooling``: give an existing ResNet iSQRT-COV covariance pooling in place of average pooling."""
from __future__ import annotations

from typing import Any, TypeVar

from timm.models.resnet import ResNet as TimmResNet
from torch import nn
from torchvision.models import ResNet as TorchvisionResNet

from ..layers import CovPool
from ._common import set_last_stride
from .resnet_isqrt import ISqrtResNet

__all__ = ["swap_pooling"]

ModelT = TypeVar("ModelT", bound=nn.Module)

_SUPPORTED = (
    "timm's ResNet family (timm.models.resnet.ResNet: resnet*, resnext*, seresnet*, ecaresnet*, wide_resnet*, "
    "resnet*d, ...) and torchvision.models.ResNet (resnet*, resnext*, wide_resnet*)"
)


def swap_pooling(model: ModelT, *, last_stride: int | None = None, **covpool_options: Any) -> ModelT:
    """Replace a ResNet's global average pooling and classifier with iSQRT-COV covariance pooling.

    Li et al., "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square
    Root Normalization", CVPR 2018. The pooling becomes a :class:`covpool.CovPool` on the last stage's
    features and the classifier a fresh linear layer on its ``out_features``-dim vector with the model's
    class count; the backbone weights are untouched. The model is changed in place and returned.

    - timm ``ResNet``: the model becomes a :class:`covpool.models.resnet_isqrt.ISqrtResNet` (a subclass of
      timm's ResNet, the class of ``resnet50_isqrt``), so ``num_features``, ``forward_head(x, pre_logits=
      True)`` (the covariance vector) and ``reset_classifier(n)`` (keeps the covariance pooling) keep working.
    - torchvision ``ResNet``: ``avgpool`` becomes the :class:`covpool.CovPool` and ``fc`` the new classifier;
      torchvision's ``forward`` is unchanged.

    Either way the result trains, pickles and saves/loads its ``state_dict`` like the original.

    Args:
        model: a timm ``ResNet`` or a torchvision ``ResNet`` with a linear ``fc``.
        last_stride: stride of the last stage. ``None`` (default) keeps the model's; 1 removes its
            downsampling as iSQRT-COV does (14×14 instead of 7×7 features at 224², 4× the last stage's
            compute), which gives the 256×256 covariance 196 samples instead of 49, i.e. full rank; 2 asserts
            the usual stride. The default changes nothing but the head, so a pretrained model keeps its
            speed and memory footprint unless you ask.
        **covpool_options: :class:`covpool.CovPool` options, e.g. ``reduced_dim=256`` (default) and
            ``backend="ns"`` or ``{"name": "ns", "num_iters": 5}`` (default ``"ns"``, 5 iterations).

    Returns:
        The same model object.

    Raises:
        TypeError: ``model`` is not one of the supported ResNets (the message lists them).
        ValueError: the model already uses covariance pooling, its ``fc`` is not an ``nn.Linear``
            (torchvision), ``last_stride`` is invalid or cannot be applied, or a CovPool option is.

    Example::

        >>> import timm, covpool
        >>> model = covpool.swap_pooling(timm.create_model("resnet18", num_classes=10), last_stride=1)
        >>> model.num_features, model.fc
        (32896, Linear(in_features=32896, out_features=10, bias=True))
    """
    if last_stride not in (None, 1, 2):
        raise ValueError(f"last_stride must be None (keep the model's), 1 or 2, got {last_stride!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_pooling expects an nn.Module, one of {_SUPPORTED}; got {type(model).__name__}")
    if isinstance(model, ISqrtResNet) or any(isinstance(m, CovPool) for m in model.children()):
        raise ValueError(f"{type(model).__name__} already uses covariance pooling")
    if type(model) is TimmResNet:
        return _swap_timm(model, last_stride, covpool_options)
    if isinstance(model, TorchvisionResNet):
        return _swap_torchvision(model, last_stride, covpool_options)
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    raise TypeError(f"swap_pooling supports {_SUPPORTED}; got {kind}")


def _build_pool(in_channels: int, covpool_options: dict[str, Any]) -> CovPool:
    pool = CovPool(in_channels, **covpool_options)
    if not pool.vectorize:
        raise ValueError("vectorize must be True: the classifier needs the covariance as a vector")
    return pool


def _swap_timm(model: TimmResNet, last_stride: int | None, covpool_options: dict[str, Any]) -> ISqrtResNet:
    # Build (and so validate) everything before the first change, so a bad option leaves the model intact.
    pool = _build_pool(model.feature_info[-1]["num_chs"], covpool_options)
    if last_stride is not None:
        set_last_stride(model, last_stride)
    # ISqrtResNet adds methods only, no state of its own, so re-classing is exact, and the class is
    # importable, so the model still pickles.
    model.__class__ = ISqrtResNet
    model._install_covpool(pool)
    return model


def _swap_torchvision(model: TorchvisionResNet, last_stride: int | None,
                      covpool_options: dict[str, Any]) -> TorchvisionResNet:
    fc = model.fc
    if not isinstance(fc, nn.Linear):
        raise ValueError(f"expected a torchvision ResNet whose fc is an nn.Linear, got {type(fc).__name__}")
    pool = _build_pool(fc.in_features, covpool_options)
    if last_stride is not None:
        set_last_stride(model, last_stride)
    ref = fc.weight
    model.avgpool = pool.to(device=ref.device, dtype=ref.dtype).train(model.training)
    model.fc = nn.Linear(pool.out_features, fc.out_features, bias=fc.bias is not None, device=ref.device,
                         dtype=ref.dtype).train(model.training)
    return model
