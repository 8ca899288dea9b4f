"""Classification metrics from per-sample results: loss, accuracy, balanced accuracy, per-class accuracy.

Pure functions of tensors already gathered from every process (the loop's `gather_for_metrics` drops
the padding duplicates, so each image counts once). The counting is torchmetrics'; samples labelled
IGNORE_LABEL (an unreadable image whose slot in the batch was filled by another) are left out.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_stat_scores

from ..data.badimages import IGNORE_LABEL


def classification_metrics(losses: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor,
                           class_names: list[str], prefix: str) -> dict:
    """{prefix}_loss, _acc (top-1, a fraction), _balanced_acc (the mean of per-class recall over the classes
    present, so a rare class counts as much as a common one), _per_class_acc ({class: fraction or None when
    the class has no images here}) and _images."""
    keep = labels != IGNORE_LABEL
    n = int(keep.sum())
    if not n:
        return {f"{prefix}_loss": None, f"{prefix}_acc": None, f"{prefix}_balanced_acc": None,
                f"{prefix}_per_class_acc": dict.fromkeys(class_names), f"{prefix}_images": 0}
    args = {"num_classes": len(class_names), "ignore_index": IGNORE_LABEL}
    recall = multiclass_accuracy(preds, labels, average=None, **args)
    support = multiclass_stat_scores(preds, labels, average=None, **args)[:, 4]
    # torchmetrics' own "macro" also averages classes that are only predicted (recall 0); balanced accuracy
    # is the mean over the classes that have images here.
    present = support > 0
    return {
        f"{prefix}_loss": round(losses[keep].float().mean().item(), 6),
        f"{prefix}_acc": round(multiclass_accuracy(preds, labels, average="micro", **args).item(), 6),
        f"{prefix}_balanced_acc": round(recall[present].mean().item(), 6),
        f"{prefix}_per_class_acc": {name: round(r, 6) if s else None
                                    for name, r, s in zip(class_names, recall.tolist(), support.tolist())},
        f"{prefix}_images": n,
    }


def format_epoch(record: dict, epochs: int) -> str:
    """One metrics.jsonl record as the line the loop prints after each epoch."""
    ema = f" | EMA acc {100 * record['ema_val_acc']:.2f}%" if "ema_val_acc" in record else ""
    best = {None: "", "model": " (best, exported)", "ema": " (best, EMA exported)"}[record["exported"]]
    compiled = f" (first update {record['compile_seconds']:.1f}s: compiling)" if "compile_seconds" in record else ""
    return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} | val loss "
            f"{record['val_loss']:.4f} acc {100 * record['val_acc']:.2f}% (balanced "
            f"{100 * record['val_balanced_acc']:.2f}%){ema}{best} | {record['epoch_seconds']:.1f}s{compiled}")
