"""PNG plots written into the run directory: they open in any file viewer or IDE, no display needed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no window, works on servers and inside IDEs alike
import matplotlib.pyplot as plt  # noqa: E402

from ..atomic import replacing  # noqa: E402


@dataclass(frozen=True)
class CurveMetric:
    """The metric curves.png draws next to the loss: the task's selection metric (tasks/)."""
    key: str = "acc"  # metrics.jsonl's val_<key>
    name: str = "top-1"  # its legend
    axis: str = "accuracy"  # its axis (" %" added for a share)
    title: str = "val accuracy"
    percent: bool = True  # a share, drawn as a percentage
    loss: str = "cross-entropy"  # the loss axis


def save_curves(records: list[dict], path: Path, metric: CurveMetric = CurveMetric()) -> None:
    """`curves_figure` as a PNG, rewritten after each epoch."""
    _save(curves_figure(records, metric), path)


def curves_figure(records: list[dict], metric: CurveMetric = CurveMetric()):
    """Loss (train and val), the selection metric (the model, its weight average; balanced accuracy where
    recorded) with the exported epoch marked, and each parameter group's learning rate per epoch
    (`metrics.jsonl` records)."""
    epochs = [r["epoch"] for r in records]
    with_lr = any(r.get("lr") for r in records)
    fig, axes = plt.subplots(1, 3 if with_lr else 2, figsize=(15 if with_lr else 10, 4), sharex=True)
    ax_loss, ax_acc = axes[:2]
    ax_loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train (smoothed targets)")
    ax_loss.plot(epochs, [r["val_loss"] for r in records], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel=metric.loss, title="loss")
    ax_loss.legend()
    key, name = metric.key, metric.name
    scale = _percent if metric.percent else _number
    ax_acc.plot(epochs, [scale(r.get(f"val_{key}")) for r in records], "o-", color="tab:green", label=name)
    if any(r.get(f"ema_val_{key}") is not None for r in records):
        ax_acc.plot(epochs, [scale(r.get(f"ema_val_{key}")) for r in records], "^:", color="tab:purple",
                    label=f"{name}, weight average (EMA)")
    if all(r.get("val_balanced_acc") is not None for r in records):
        ax_acc.plot(epochs, [100 * r["val_balanced_acc"] for r in records], "s--", color="tab:olive",
                    label="balanced (mean per class)")
    # The export is rewritten whenever an epoch improves, so the one on disk is the last improvement's.
    best = next((r for r in reversed(records) if r.get("exported") is not None), None)
    if best is not None:
        acc = best.get(f"ema_val_{key}") if best["exported"] == "ema" else best[f"val_{key}"]
        ax_acc.axvline(best["epoch"], color="tab:red", linestyle="--", alpha=0.4)
        shown = f"{_percent(acc):.1f}%" if metric.percent else f"{_number(acc):.4g}"
        ax_acc.plot([best["epoch"]], [scale(acc)], "*", color="tab:red", markersize=15, zorder=3,
                    label=f"exported: epoch {best['epoch']} ({best['exported']}, {shown})")
    ax_acc.set(xlabel="epoch", ylabel=metric.axis + (" %" if metric.percent else ""), title=metric.title)
    ax_acc.legend(fontsize=8)
    if with_lr:
        _plot_lr(axes[2], records)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def _plot_lr(ax, records: list[dict]) -> None:
    """One line per parameter group, log scale: groups differ by 10x (the head) or by layer decay."""
    epochs = [r["epoch"] for r in records]
    names = list(dict.fromkeys(name for r in records for name in r.get("lr") or {}))
    # A group that is frozen or at the end of the cosine has LR 0, which a log axis cannot show: a gap.
    values = {name: [(r.get("lr") or {}).get(name) or math.nan for r in records] for name in names}
    for name in names:
        ax.plot(epochs, values[name], "o-", markersize=3, label=name)
    if any(not math.isnan(v) for line in values.values() for v in line):
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="learning rate (at the epoch's end)", title="learning rate per group (0 left out)")
    ax.legend(fontsize=7, ncol=1 + len(names) // 8)


def _percent(share: float | None) -> float:
    return math.nan if share is None else 100 * share


def _number(value: float | None) -> float:
    return math.nan if value is None else value


def save_image_grid(images: list, titles: list[str], path: Path, columns: int = 6, title: str = "",
                    colors: list[str] | None = None) -> None:
    """`image_grid_figure` as a PNG."""
    _save(image_grid_figure(images, titles, columns, title, colors), path)


def image_grid_figure(images: list, titles: list[str], columns: int = 6, title: str = "",
                      colors: list[str] | None = None):
    """Thumbnails with a caption each (e.g. "given cat / predicted dog"), row by row, each caption in its
    colour (default black). Constrained layout reserves room for the figure's title above the first row's
    captions, so the two never overlap."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows + (0.5 if title else 0)),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption, color in zip(axes.flat, images, titles, colors or ["black"] * len(titles)):
        thumb = image.copy()
        thumb.thumbnail((160, 160))  # a 12-megapixel photo would make a huge PNG
        ax.imshow(thumb)
        ax.set_title(caption, fontsize=7, color=color)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


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


def confusion_figure(matrix: list[list[int]], class_names: list[str], title: str = ""):
    """The confusion matrix with each row normalised to the given class's images, so a rare class's errors
    show as clearly as a common one's; the cells of up to 20 classes also print their percentage. Cells
    shrink with the class count down to a 30-inch matrix; above that only every k-th class is labelled,
    so labels never overlap."""
    counts = np.asarray(matrix, dtype=np.float64)
    support = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
    n = len(class_names)
    cell = min(n * min(0.6, max(0.18, 12 / n)), 30.0) / n  # inches per class
    font = min(10.0, max(5.0, 0.6 * 72 * cell))  # points
    step = math.ceil(1.25 * font / 72 / cell)  # label every step-th class: a label's height fits its cells
    names = [name if len(name) <= 24 else name[:23] + "…" for name in class_names]
    margin = 0.6 * font / 72 * max(len(name) for name in names) + 0.8
    fig, ax = plt.subplots(figsize=(max(5.0, n * cell + margin + 1.5), max(4.0, n * cell + margin + 0.6)))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the given class")
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=font)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=font)
    ax.set(xlabel="predicted", ylabel="given label")
    if n <= 20:
        for (row, col), share in np.ndenumerate(shares):
            if counts[row, col]:
                ax.text(col, row, f"{100 * share:.0f}", ha="center", va="center", fontsize=font - 1,
                        color="white" if share > 0.5 else "black")
    ax.set_title(title or f"confusion matrix, rows normalised ({int(counts.sum())} images)", fontsize=10)
    return fig


def save_confusion_matrix(matrix: list[list[int]], class_names: list[str], path: Path, title: str = "") -> None:
    """`confusion_figure` as a PNG."""
    _save(confusion_figure(matrix, class_names, title), path)


def save_reliability(bins: list[dict], ece: float | None, path: Path, title: str = "") -> None:
    """Reliability diagram: accuracy against mean confidence per confidence bin (metrics.reliability_bins),
    the gap to the diagonal shaded, and below it how many images each bin holds."""
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    lower = [b["lower"] for b in bins]
    width = bins[0]["upper"] - bins[0]["lower"]
    filled = [b for b in bins if b["count"]]
    ax.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           color="tab:blue", edgecolor="black", label="accuracy")
    ax.bar([b["lower"] for b in filled], [b["confidence"] - b["accuracy"] for b in filled], width=width,
           bottom=[b["accuracy"] for b in filled], align="edge", color="tab:red", alpha=0.3, edgecolor="tab:red",
           hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in the bin",
           title=title or "reliability diagram" + (f": ECE {100 * ece:.2f}%" if ece is not None else ""))
    ax.legend(loc="upper left")
    ax_count.bar(lower, [b["count"] for b in bins], width=width, align="edge", color="gray", edgecolor="black")
    ax_count.set(xlabel="confidence (probability of the predicted class)", ylabel="images")
    for axis in (ax, ax_count):
        axis.grid(alpha=0.3)
    _save(fig, path)


def save_predicted_vs_true(true: list[float], predicted: list[float], path: Path, title: str = "",
                           unit: str = "value") -> None:
    """Predicted numbers against the true ones, one dot per image, with the diagonal a perfect model would
    lie on: how far off it is, and where (a slope below the diagonal: shrunk toward the mean)."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(true, predicted, s=12, alpha=0.5, color="tab:blue", edgecolors="none")
    values = [v for v in list(true) + list(predicted) if math.isfinite(v)] or [0.0, 1.0]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], "--", color="gray", label="predicted = true")
    ax.set(xlim=(low - pad, high + pad), ylim=(low - pad, high + pad), xlabel=f"true {unit}",
           ylabel=f"predicted {unit}", title=title or f"predicted vs true ({len(true)} images)")
    ax.title.set_fontsize(10)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    if fig.get_layout_engine() is None:  # a figure made with constrained layout lays itself out
        fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
