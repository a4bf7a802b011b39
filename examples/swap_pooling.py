"""Put a second-order (covariance pooling) head on any timm or torchvision backbone and fine-tune it.

The fine-grained recipe (iSQRT-COV, Li et al. CVPR 2018; So-ViT, Xie et al. 2021): take a pretrained
backbone, replace its global pooling + classifier by ``covpool.swap_pooling`` (covariance of the last feature
map or of a ViT's patch tokens, matrix square root, linear classifier), and fine-tune with the new head
learning fastest: timm's layer-wise learning-rate decay gives the head the full rate and each earlier block
``layer_decay`` times less.

    python examples/swap_pooling.py                                     # timm resnet18 from scratch, 64x64
    python examples/swap_pooling.py --model convnext_nano --small       # any timm CNN
    python examples/swap_pooling.py --model vit_tiny_patch16_224 --small   # ViT: class token + token covariance
    python examples/swap_pooling.py --source torchvision --model efficientnet_b0 --small
    python examples/swap_pooling.py --model convnext_tiny.fb_in22k --pretrained   # the recipe (hub download)
"""
from __future__ import annotations

import argparse
import time

import timm
import timm.optim
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

import covpool
from covpool.train.embedded import EmbeddedTextures

NUM_CLASSES = 8


def build(source: str, name: str, pretrained: bool, img_size: int) -> nn.Module:
    if source == "torchvision":
        return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    kwargs = {}
    if timm.models.get_pretrained_cfg(name.split(".")[0]).fixed_input_size:
        kwargs["img_size"] = img_size  # ViTs are built for one input size (position embeddings resampled)
    return timm.create_model(name, pretrained=pretrained, num_classes=NUM_CLASSES, **kwargs)


def classifier(model: nn.Module) -> nn.Module:
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    return model.fc if hasattr(model, "fc") else model.classifier


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("timm", "torchvision"), default="timm")
    parser.add_argument("--model", default="resnet18", help="a timm name (tags allowed) or a torchvision one")
    parser.add_argument("--pretrained", action="store_true",
                        help="load the timm backbone's pretrained weights "
                             "(timm has torchvision's too: resnet50.tv_in1k)")
    parser.add_argument("--layer-decay", type=float, default=None,
                        help="timm's layer-wise LR decay (default 0.7 with --pretrained, none from scratch)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--small", action="store_true", help="tiny sizes: runs in seconds on a CPU")
    args = parser.parse_args(argv)
    if args.pretrained and args.source != "timm":
        parser.error("--pretrained is for timm names (timm serves torchvision's weights as e.g. resnet50.tv_in1k)")
    img_size, per_class, steps = (32, 8, 3) if args.small else (64, 64, args.steps)
    layer_decay = args.layer_decay if args.layer_decay is not None else (0.7 if args.pretrained else None)

    torch.manual_seed(0)
    model = build(args.source, args.model, args.pretrained, img_size)
    before = sum(p.numel() for p in model.parameters())
    # ResNets: iSQRT-COV's stride-1 last stage doubles the map's side, 4x the samples per covariance estimate.
    last_stride = 1 if isinstance(getattr(model, "layer4", None), nn.Sequential) else None
    model = covpool.swap_pooling(model, reduced_dim=32 if args.small else 64, backend="ns", last_stride=last_stride)
    print(f"{args.source} {args.model}: {before / 1e6:.2f}M -> {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters; classifier now {classifier(model)}")

    data = EmbeddedTextures("train", img_size=img_size, per_class=per_class, seed=0)
    loader = DataLoader(data, batch_size=16, shuffle=True, drop_last=True)
    if args.source == "timm":
        optimizer = timm.optim.create_optimizer_v2(model, "sgd", lr=0.05, momentum=0.9, weight_decay=1e-4,
                                                   layer_decay=layer_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for group in optimizer.param_groups:  # timm's schedulers apply each group's layer-decay multiplier; we have none
        group["lr"] *= group.get("lr_scale", 1.0)
    model.train()
    start, step, loss = time.perf_counter(), 0, torch.tensor(float("nan"))
    while step < steps:
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
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
