"""Classification metrics from per-sample results: loss, accuracy, balanced accuracy, per-class accuracy
every epoch; top-5, per-class precision/recall/F1, calibration error and the confusion matrix for the
evaluation report.

Pure functions of tensors already gathered from every process (the loop's `gather_for_metrics` drops
the padding duplicates, so each image counts once). The counting is torchmetrics'; samples labelled
IGNORE_LABEL (an unreadable image whose slot in the batch was filled by another) are left out.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multiclass_stat_scores,
)

from ..data.samples import IGNORE_LABEL

# Equal-width confidence bins for the expected calibration error and the reliability diagram (torchmetrics'
# default; Guo et al. 2017 use 15 too).
CALIBRATION_BINS = 15


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


def report_metrics(results: dict, class_names: list[str]) -> dict:
    """The evaluation report's numbers from per-sample results (evaluate.py's keys: loss, pred, label, and
    top_k / top_k_prob, the few most probable classes): images, loss, top1_acc, top5_acc (5+ classes),
    balanced_acc, macro_f1, ece, per_class {name: precision, recall, f1, support} and confusion_matrix
    (rows: the given class, columns: the prediction; counts). Precision is None for a class never
    predicted, recall and F1 for a class without images; the macro averages run over the classes present."""
    keep = results["label"] != IGNORE_LABEL
    labels, preds, n, classes = results["label"][keep], results["pred"][keep], int(keep.sum()), len(class_names)
    args = {"num_classes": classes, "average": None}
    matrix = (multiclass_confusion_matrix(preds, labels, classes) if n
              else torch.zeros(classes, classes, dtype=torch.long))
    support, predicted = matrix.sum(dim=1), matrix.sum(dim=0)
    present = support > 0
    out = {"images": n, "classes": classes, "loss": None, "top1_acc": None, "top5_acc": None, "balanced_acc": None,
           "macro_f1": None, "ece": None, "calibration_bins": CALIBRATION_BINS}
    if classes < 5:
        del out["top5_acc"]
    per_class = dict.fromkeys(class_names)
    if n:
        # Probabilities outside the top k are not kept; zeros there leave both the top-5 set and the top-1
        # confidence (all calibration reads) as they were.
        scores = torch.zeros(n, classes).scatter_(1, results["top_k"][keep], results["top_k_prob"][keep].float())
        precision, recall = multiclass_precision(preds, labels, **args), multiclass_recall(preds, labels, **args)
        f1 = multiclass_f1_score(preds, labels, **args)
        out.update(loss=results["loss"][keep].float().mean().item(),
                   top1_acc=multiclass_accuracy(preds, labels, num_classes=classes, average="micro").item(),
                   balanced_acc=recall[present].mean().item(), macro_f1=f1[present].mean().item(),
                   ece=multiclass_calibration_error(scores, labels, classes, n_bins=CALIBRATION_BINS).item())
        if classes >= 5:
            out["top5_acc"] = multiclass_accuracy(scores, labels, classes, top_k=5, average="micro").item()
        per_class = {name: {"precision": _rounded(p) if k else None, "recall": _rounded(r) if s else None,
                            "f1": _rounded(f) if s else None, "support": s}
                     for name, p, r, f, s, k in zip(class_names, precision.tolist(), recall.tolist(), f1.tolist(),
                                                    support.tolist(), predicted.tolist())}
    rounded = {key: _rounded(value) if isinstance(value, float) else value for key, value in out.items()}
    return {**rounded, "per_class": per_class, "confusion_matrix": matrix.tolist()}


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, bins: int = CALIBRATION_BINS) -> list[dict]:
    """Per equal-width confidence bin: its range, image count, mean confidence and accuracy (None when
    empty), binned as torchmetrics bins for the calibration error (a confidence of exactly 1 joins the top bin)."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence.double(), edges, right=True) - 1).clamp(0, bins - 1)
    count = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, torch.ones(len(index), dtype=torch.float64))
    conf = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, confidence.double())
    acc = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, correct.double())
    return [{"lower": round(edges[i].item(), 4), "upper": round(edges[i + 1].item(), 4), "count": int(count[i]),
             "confidence": round((conf[i] / count[i]).item(), 6) if count[i] else None,
             "accuracy": round((acc[i] / count[i]).item(), 6) if count[i] else None} for i in range(bins)]


def _rounded(value: float) -> float:
    return round(value, 6)


def format_epoch(record: dict, epochs: int) -> str:
    """One metrics.jsonl record as the line the loop prints after each epoch."""
    ema = f" | EMA acc {100 * record['ema_val_acc']:.2f}%" if "ema_val_acc" in record else ""
    best = {None: "", "model": " (best, exported)", "ema": " (best, EMA exported)"}[record["exported"]]
    compiled = f" (first update {record['compile_seconds']:.1f}s: compiling)" if "compile_seconds" in record else ""
    return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} | val loss "
            f"{record['val_loss']:.4f} acc {100 * record['val_acc']:.2f}% (balanced "
            f"{100 * record['val_balanced_acc']:.2f}%){ema}{best} | {record['epoch_seconds']:.1f}s{compiled}")


def percent(share: float | None, missing: str = "-") -> str:
    """A share (0.8731) as every report prints it (87.31%); `missing` when there is no number."""
    return f"{100 * share:.2f}%" if isinstance(share, (int, float)) else missing
