"""Build So-ViT-7 with ``timm.create_model`` and fine-tune it on the embedded texture task.

So-ViT (Xie et al., arXiv:2104.10935) classifies from the class token *and* the covariance of the visual
tokens. ``import covpool`` registers ``so_vit_7/10/14/19`` with timm. Pass ``--pretrained FILE`` to start
from a local checkpoint (the hub is not needed); the classifier is re-sized to the 8 texture classes.

    python examples/finetune_so_vit.py --small
    python examples/finetune_so_vit.py --pretrained so_vit_7.pth --steps 200
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
from torch.utils.data import DataLoader

import covpool  # noqa: F401  (registers so_vit_* with timm)
from covpool.train.embedded import EmbeddedTextures


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(-1) == labels).sum().item()
        total += len(labels)
    model.train()
    return 100.0 * correct / total


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default=None, help="local checkpoint file (optional)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--small", action="store_true", help="tiny sizes: runs in seconds on a CPU")
    args = parser.parse_args(argv)
    img_size, per_class, steps = (32, 8, 3) if args.small else (64, 48, args.steps)

    torch.manual_seed(0)
    extra = {"pretrained_cfg_overlay": {"file": args.pretrained}} if args.pretrained else {}
    model = timm.create_model("so_vit_7", pretrained=bool(args.pretrained), num_classes=8, img_size=img_size,
                              **extra)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"so_vit_7: {params:.2f}M parameters, head {type(model.get_classifier()).__name__}")

    train = DataLoader(EmbeddedTextures("train", img_size, per_class, seed=0), batch_size=16, shuffle=True,
                       drop_last=True)
    val = DataLoader(EmbeddedTextures("val", img_size, max(per_class // 4, 2), seed=0), batch_size=64)
    head = {id(p) for p in model.get_classifier().parameters()}
    # the fine-tuning recipe: the new head learns faster than the (pretrained) body
    optimizer = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if id(p) not in head], "lr": 5e-4},
        {"params": [p for p in model.parameters() if id(p) in head], "lr": 2.5e-3},
    ], weight_decay=0.05)
    start, step = time.perf_counter(), 0
    while step < steps:
        for images, labels in train:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    acc = accuracy(model, val)
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s, last loss {loss.item():.4f}, val accuracy {acc:.1f}%")
    return acc


if __name__ == "__main__":
    main()
