"""PNG plots written into the run directory: they open in any file viewer or IDE, no display needed."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no window, works on servers and inside IDEs alike
import matplotlib.pyplot as plt  # noqa: E402


def save_curves(records: list[dict], path: Path) -> None:
    """Loss (train and val) and val accuracy per epoch, rewritten after each epoch."""
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train (smoothed targets)")
    ax_loss.plot(epochs, [r["val_loss"] for r in records], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * r["val_acc"] for r in records], "o-", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="top-1 %", title="val accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
