"""Backbones registered in timm's model registry (the library's only layer that imports timm; the application
above it uses timm too).

Importing this package registers ``resnet{18,50,101}_isqrt`` and ``so_vit_{7,10,14,19}`` with timm (and
``sot_{tiny,small,base}``, ``deit_{tiny,small,base}_dropcov``, ``t2t_vit_14_dropcov``), so
``timm.create_model("so_vit_7")`` works after ``import covpool``. The model classes live in their
modules (:mod:`covpool.models.resnet_isqrt`, :mod:`covpool.models.so_vit`); the public helpers are
:func:`swap_pooling` (a second-order head on any timm or torchvision backbone),
:func:`keep_fitting_classifier` (a local checkpoint keeps its classifier when the class count fits) and
:func:`cifar_stem` (a ResNet stem for 32×32 images).
"""
from . import resnet_isqrt, so_vit, sot, stem, swap  # noqa: F401  (importing them registers the models with timm)
from ._common import keep_fitting_classifier
from .stem import cifar_stem
from .swap import swap_pooling

__all__ = ["swap_pooling", "keep_fitting_classifier", "cifar_stem"]
