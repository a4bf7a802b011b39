"""Stem surgery for small images: :func:`cifar_stem`."""
from __future__ import annotations

from torch import nn

__all__ = ["cifar_stem"]


def cifar_stem(model: nn.Module) -> nn.Module:
    """Give an ImageNet ResNet the stem of the CIFAR ResNets (He et al., CVPR 2016, section 4.2) in place:
    a 3×3 stride-1 ``conv1`` and no max-pool, so 32×32 images reach the last stage at 4×4, not 1×1.

    Works on any model with a single-convolution stem named ``conv1`` followed by ``maxpool`` (timm's
    and torchvision's ``resnet18/34/50/...``, covpool's ``resnet*_isqrt``). The new ``conv1`` has no bias,
    the old one's channels, device and dtype and a fresh (PyTorch default) initialisation: pretrained
    7×7 weights do not carry over.

    Returns:
        ``model``, so ``model = cifar_stem(timm.create_model("resnet18", num_classes=10))`` reads well.

    Example::

        >>> import timm, torch, covpool
        >>> model = covpool.cifar_stem(timm.create_model("resnet18", num_classes=10))
        >>> model.forward_features(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 512, 4, 4])
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError("cifar_stem needs a ResNet with a single-conv stem (conv1 + maxpool), such as "
                         "timm's or torchvision's resnet18/34/50; deep stems (resnet*d, resnet*t) are not supported")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False,
                            device=conv.weight.device, dtype=conv.weight.dtype)
    model.maxpool = nn.Identity()
    return model
