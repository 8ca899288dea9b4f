"""PNG plots written into the run directory: they open in any file viewer or IDE, no display needed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no window, works on servers and inside IDEs alike
import matplotlib.pyplot as plt  # noqa: E402

from ..atomic import replacing  # noqa: E402


def save_curves(records: list[dict], path: Path) -> None:
    """Loss (train and val) and val accuracy per epoch, rewritten after each epoch."""
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train (smoothed targets)")
    ax_loss.plot(epochs, [r["val_loss"] for r in records], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * r["val_acc"] for r in records], "o-", color="tab:green", label="top-1")
    if all(r.get("val_balanced_acc") is not None for r in records):
        ax_acc.plot(epochs, [100 * r["val_balanced_acc"] for r in records], "s--", color="tab:olive",
                    label="balanced (mean per class)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy %", title="val accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, path)


def save_image_grid(images: list, titles: list[str], path: Path, columns: int = 6, title: str = "") -> None:
    """Thumbnails with a caption each (e.g. "given cat / predicted dog"), row by row."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows + (0.4 if title else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, titles):
        thumb = image.copy()
        thumb.thumbnail((160, 160))  # a 12-megapixel photo would make a huge PNG
        ax.imshow(thumb)
        ax.set_title(caption, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def save_lr_find(lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float, rule: str,
                 path: Path) -> None:
    """The LR range test: raw and smoothed loss against the base LR (log scale), the suggestion marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="tab:blue", alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, color="tab:blue", label="smoothed loss")
    at = min(range(len(lrs)), key=lambda i: abs(lrs[i] - suggestion))
    ax.axvline(suggestion, color="tab:red", linestyle="--", alpha=0.6)
    ax.plot([suggestion], [smoothed[at]], "o", color="tab:red", label=f"suggestion optim.lr={suggestion:.2g}")
    ax.set_xscale("log")
    top = max(smoothed[: max(1, len(smoothed) // 10)] + [min(smoothed) * 4])  # keep the divergence off the scale
    ax.set_ylim(min(min(losses), min(smoothed)) * 0.95, min(max(losses), top * 1.05))
    ax.set(xlabel="base learning rate (optim.lr; every group keeps its ratio)", ylabel="training loss",
           title=f"LR range test: {rule}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
