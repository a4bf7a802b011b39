"""ZCA-whitening batch norm in a ResNet: ``covpool.convert_zca`` swaps BatchNorm2d for ZCABatchNorm2d; train.

Decorrelated BN (Huang et al., CVPR 2018) whitens each group of channels with the inverse square root of
their batch covariance, so the group's output covariance is the identity, where BatchNorm only makes the
variances one. The inverse root comes from a covpool backend (``eig``, ``ns``, ...).

    python examples/zca_resnet.py --small
    python examples/zca_resnet.py --backend ns --steps 40
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

import covpool
from covpool.train.embedded import EmbeddedTextures


def group_correlation(x: torch.Tensor, group_size: int) -> float:
    """Largest absolute off-diagonal covariance within the first channel group of ``(B, C, H, W)`` maps."""
    g = x[:, :group_size].transpose(0, 1).reshape(group_size, -1)
    g = g - g.mean(dim=1, keepdim=True)
    cov = g @ g.T / g.shape[1]
    return (cov - torch.diag(torch.diag(cov))).abs().max().item()


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="eig", choices=covpool.list_backends(),
                        help="eig is exact; the iterative ones (ns, ...) whiten approximately, faster on GPUs")
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="tiny sizes: runs in seconds on a CPU")
    args = parser.parse_args(argv)
    img_size, per_class, steps = (32, 8, 3) if args.small else (64, 32, args.steps)

    torch.manual_seed(0)
    # What the layer does, on correlated input: BatchNorm leaves the correlations, ZCA removes them.
    mix = torch.randn(args.group_size, args.group_size)
    x = torch.einsum("ij,bjhw->bihw", mix, torch.randn(64, args.group_size, 8, 8))
    bn = nn.BatchNorm2d(args.group_size, affine=False)
    zca = covpool.ZCABatchNorm2d(args.group_size, group_size=args.group_size, backend=args.backend, affine=False)
    print(f"max |off-diagonal covariance|: input {group_correlation(x, args.group_size):.3f}, "
          f"BatchNorm2d {group_correlation(bn(x), args.group_size):.3f}, "
          f"ZCABatchNorm2d({args.backend}) {group_correlation(zca(x), args.group_size):.4f}")

    model = timm.create_model("resnet18", num_classes=8)
    count = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    # Like torch's SyncBatchNorm.convert_sync_batchnorm: every BatchNorm2d becomes a ZCABatchNorm2d that
    # keeps its eps, momentum, affine parameters and running statistics.
    model = covpool.convert_zca(model, group_size=args.group_size, backend=args.backend)
    print(f"replaced {count} BatchNorm2d layers with ZCABatchNorm2d")
    loader = DataLoader(EmbeddedTextures("train", img_size, per_class, seed=0), batch_size=16, shuffle=True,
                        drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start, step = time.perf_counter(), 0
    while step < steps:
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    print(f"{steps} training steps in {time.perf_counter() - start:.1f} s, last loss {loss.item():.4f}")
    return group_correlation(zca(x), args.group_size)


if __name__ == "__main__":
    main()
