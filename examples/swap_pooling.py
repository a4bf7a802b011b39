"""Give an ordinary ResNet covariance pooling and train it for a few steps.

``covpool.swap_pooling`` replaces the global average pooling + fc of a torchvision or timm ResNet with
iSQRT-COV covariance pooling (Li et al., CVPR 2018) and a right-sized classifier; the backbone is kept.

    python examples/swap_pooling.py                      # torchvision resnet18, 64x64 patches
    python examples/swap_pooling.py --source timm --small
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
import torchvision
from torch.utils.data import DataLoader

import covpool
from covpool.train.embedded import EmbeddedTextures


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("torchvision", "timm"), default="torchvision")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--small", action="store_true", help="tiny sizes: runs in seconds on a CPU")
    args = parser.parse_args(argv)
    img_size, per_class, steps = (32, 8, 3) if args.small else (64, 64, args.steps)

    torch.manual_seed(0)
    if args.source == "torchvision":
        model = torchvision.models.resnet18(num_classes=8)
    else:
        model = timm.create_model("resnet18", num_classes=8)
    before = sum(p.numel() for p in model.parameters())
    # last_stride=1 doubles the last feature map's side: more positions for each covariance estimate
    covpool.swap_pooling(model, reduced_dim=32 if args.small else 64, backend="ns", last_stride=1)
    print(f"{args.source} resnet18: {before / 1e6:.2f}M -> {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters; classifier now {model.fc}")

    data = EmbeddedTextures("train", img_size=img_size, per_class=per_class, seed=0)
    loader = DataLoader(data, batch_size=16, shuffle=True, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    model.train()
    start, step, loss = time.perf_counter(), 0, torch.tensor(float("nan"))
    while step < steps:
        for images, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 10 == 0 or step == steps:
                print(f"step {step:3d}  loss {loss.item():.4f}")
            if step == steps:
                break
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s")
    return loss.item()


if __name__ == "__main__":
    main()
