"""Classification metrics from per-sample results: loss, accuracy, balanced accuracy, per-class accuracy.

Pure functions of tensors already gathered from every process. Samples labelled IGNORE_LABEL (an
unreadable image whose slot in the batch was filled by another) are left out.
"""

from __future__ import annotations

import torch

from .badimages import IGNORE_LABEL


def classification_metrics(losses: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor,
                           class_names: list[str], prefix: str) -> dict:
    """{prefix}_loss, _acc (top-1, a fraction), _balanced_acc (the mean of per-class recall over the classes
    present, so a rare class counts as much as a common one), _per_class_acc ({class: fraction or None when
    the class has no images here}) and _images."""
    keep = labels != IGNORE_LABEL
    losses, preds, labels = losses[keep].float(), preds[keep], labels[keep]
    hits = (preds == labels).float()
    count = torch.bincount(labels, minlength=len(class_names)).float()
    correct = torch.bincount(labels, weights=hits, minlength=len(class_names))
    present = count > 0
    per_class = [round(c / n, 6) if n else None for c, n in zip(correct.tolist(), count.tolist())]
    n = int(labels.numel())
    return {
        f"{prefix}_loss": round(losses.mean().item(), 6) if n else None,
        f"{prefix}_acc": round(hits.mean().item(), 6) if n else None,
        f"{prefix}_balanced_acc": round((correct[present] / count[present]).mean().item(), 6) if n else None,
        f"{prefix}_per_class_acc": dict(zip(class_names, per_class)),
        f"{prefix}_images": n,
    }
