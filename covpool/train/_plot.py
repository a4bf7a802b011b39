"""Loss and accuracy curves of a run as a PNG (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ._io import atomic_write

__all__ = ["plot_history", "plot_comparison"]


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))


def plot_comparison(runs: dict[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """One figure, two panels (loss, accuracy %), a train (dashed) and val (solid) line per run.

    ``runs`` maps a label to its per-epoch rows (``epoch``, ``train_loss``, ``val_loss``, ``train_acc``,
    ``val_acc1``), as in ``metrics.csv``."""
    from matplotlib.figure import Figure  # Figure without pyplot: the Agg canvas, no GUI, no global state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i}"
        epochs = [r["epoch"] for r in rows]
        prefix = f"{label} " if len(runs) > 1 else ""
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], "--", color=color, label=f"{prefix}train")
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], "-o", color=color, label=f"{prefix}val")
        ax_acc.plot(epochs, [r["train_acc"] for r in rows], "--", color=color, label=f"{prefix}train")
        ax_acc.plot(epochs, [r["val_acc1"] for r in rows], "-o", color=color, label=f"{prefix}val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    # fixed margins: tight_layout would draw the figure twice, which costs more than the plot itself
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.86 if title else 0.92, wspace=0.22)
    return _save(fig, Path(path))


def plot_history(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Curves of a single run (see :func:`plot_comparison`)."""
    return plot_comparison({"": rows}, path, title)
