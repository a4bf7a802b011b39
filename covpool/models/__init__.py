"""Backbones registered in timm's model registry (the library's only layer that imports timm; the application
above it uses timm too).

Importing this package registers ``resnet{18,50,101}_isqrt`` and ``so_vit_{7,10,14,19}`` with timm, so
``timm.create_model("so_vit_7")`` works after ``import covpool``; also ``resnet{18,34,50,101,152}_dropcov``
(:mod:`covpool.models.resnet_dropcov`), ``vgg16_isqrt`` (:mod:`covpool.models.vgg_isqrt`),
``sot_{tiny,small,base}``, ``deit_{tiny,small,base}_dropcov`` and ``t2t_vit_14_dropcov``
(:mod:`covpool.models.sot`). The model classes live in their modules (:mod:`covpool.models.resnet_isqrt`,
:mod:`covpool.models.so_vit`, ...); the public helpers are
:func:`swap_pooling` (a second-order head on any timm or torchvision backbone),
:func:`keep_fitting_classifier` (a local checkpoint keeps its classifier when the class count fits) and
:func:`cifar_stem` (a ResNet stem for 32×32 images), and the modules :func:`swap_pooling` builds
(:class:`SecondOrderNet`, :class:`TokenCovPool`, in :mod:`covpool.models.second_order`).
"""
from . import resnet_dropcov, resnet_isqrt, so_vit, sot, stem, swap, vgg_isqrt  # noqa: F401  (registers the models)
from ._common import keep_fitting_classifier
from .second_order import SecondOrderNet, TokenCovPool
from .stem import cifar_stem
from .swap import swap_pooling

__all__ = ["swap_pooling", "keep_fitting_classifier", "cifar_stem", "SecondOrderNet", "TokenCovPool"]
