"""
Training curves: average vs covariance pooling
==============================================

The same small convolutional network trained twice on covpool's embedded texture data set
(:class:`covpool.train.EmbeddedTextures`: 8 classes, grey patches of photographs shipped with scikit-image;
no download), once with global average pooling and once with iSQRT-COV covariance pooling
(:class:`covpool.CovPool`: a 1×1 reduction to 32 channels, the covariance of the 8×8 positions, its
Newton–Schulz square root, the upper triangle), with the same seed, data, optimiser and steps.

Average pooling keeps each channel's mean; covariance pooling keeps how the channels vary together over the
image, which is what tells textures apart. This is a toy (one seed, a few epochs, a four-layer network,
trained in a few seconds): it shows how to use :class:`covpool.CovPool` as a drop-in for average pooling,
not a ranking. ``covpool demo`` runs the full-size comparison on a ResNet-18.
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

import covpool
from covpool.train import EmbeddedTextures

torch.manual_seed(0)
train_set = EmbeddedTextures("train", img_size=32, per_class=48, seed=0)
val_set = EmbeddedTextures("val", img_size=32, per_class=24, seed=0)
train_x, train_y = map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in train_set]))
val_x, val_y = map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in val_set]))


def backbone() -> nn.Sequential:
    """Four 3×3 convolutions, 32×32 grey patches -> (B, 64, 8, 8) feature maps."""
    layers, width = [], 3
    for out, stride in ((32, 1), (32, 2), (64, 1), (64, 2)):
        layers += [nn.Conv2d(width, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        width = out
    return nn.Sequential(*layers)


def average_pooling_net() -> nn.Module:
    return nn.Sequential(backbone(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 8))


def covariance_pooling_net() -> nn.Module:
    pool = covpool.CovPool(64, reduced_dim=32, backend="ns")     # 32·33/2 = 528 features
    return nn.Sequential(backbone(), pool, nn.Linear(pool.out_features, 8))


def fit(model: nn.Module, epochs: int = 8, batch: int = 32) -> list[tuple[float, float]]:
    """SGD with a cosine schedule; (training loss, validation top-1 %) after each epoch."""
    torch.manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (len(train_x) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    history = []
    for _ in range(epochs):
        model.train()
        order, losses = torch.randperm(len(train_x)), []
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            accuracy = (model(val_x).argmax(1) == val_y).float().mean().item()
        history.append((sum(losses) / len(losses), 100 * accuracy))
    return history


histories = {"average pooling": fit(average_pooling_net()),
             "covariance pooling (CovPool)": fit(covariance_pooling_net())}

fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
for label, history in histories.items():
    epochs = range(1, len(history) + 1)
    loss_ax.plot(epochs, [loss for loss, _ in history], marker="o", label=label)
    acc_ax.plot(epochs, [acc for _, acc in history], marker="o", label=label)
loss_ax.set_xlabel("epoch")
loss_ax.set_ylabel("training loss")
acc_ax.set_xlabel("epoch")
acc_ax.set_ylabel("validation top-1 (%)")
acc_ax.legend()
fig.suptitle("A four-layer CNN on the embedded textures (8 classes, 32×32 grey patches)")
fig.tight_layout()

# %%
# The final epoch of each run:
for label, history in histories.items():
    loss, accuracy = history[-1]
    print(f"{label:<30} training loss {loss:.3f}   validation top-1 {accuracy:.1f} %")
