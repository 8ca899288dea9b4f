"""`task: single_label` (the default): one class per image. A softmax over the classes, cross-entropy with
label smoothing and class weights (or soft targets under mixup/CutMix), top-1 and balanced accuracy per
epoch (val accuracy picks the best epoch), the confusion matrix, calibration and hard examples after
training (reporting/review.py, reporting/evaluation.py), and the top-k classes from `predict`.

Targets are read as data/targets.py's `OneClassPerImage` reads them (sources.py), the default of every task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from ..data.sampling import inverse_frequency_weights
from ..errors import FinetuneError
from ..recipe.schema import TrainConfig
from ..reporting.evaluation import build_report, match_classes, save_evaluation, summary
from ..reporting.metrics import classification_metrics, format_epoch
from ..reporting.plots import CurveMetric
from ..reporting.review import score_after_training
from .base import Predict, Task

TOP_K = 5  # the classes kept per image (top-5 accuracy, calibration): a few numbers, not all C probabilities


@dataclass(frozen=True)
class SingleLabel(Task):
    """A softmax over the classes; each image is one of them."""

    name: ClassVar[str] = "single_label"
    selection: ClassVar[str] = "acc"
    selection_name: ClassVar[str] = "acc"
    linear_probe: ClassVar[bool] = True
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "acc", "balanced_acc", "per_class_acc", "images")

    def build_loss(self, train_targets: Sequence[int], num_classes: int, tc: TrainConfig, mixing: bool) -> nn.Module:
        if mixing:  # soft targets, label smoothing folded in by timm's Mixup (training/mixing.py)
            return SoftTargetCrossEntropy()
        weights = inverse_frequency_weights(train_targets, num_classes) if tc.class_weights == "auto" else None
        return nn.CrossEntropyLoss(weight=weights, label_smoothing=tc.label_smoothing)

    def results(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per image: the unsmoothed loss, the prediction and its probability, the given label's probability,
        the label, and the TOP_K most probable classes with their probabilities."""
        probs = logits.softmax(dim=-1)
        pred_prob, pred = probs.max(dim=-1)
        top_k_prob, top_k = probs.topk(min(TOP_K, probs.shape[-1]), dim=-1)
        given_prob = probs.gather(1, labels.clamp(min=0)[:, None])[:, 0]  # ignored labels (-100) read class 0
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")  # 0 for ignored labels
        return {"loss": loss, "pred": pred, "pred_prob": pred_prob, "given_prob": given_prob, "label": labels,
                "top_k": top_k, "top_k_prob": top_k_prob}

    def metrics(self, results: dict, class_names: list[str], prefix: str) -> dict:
        return classification_metrics(results["loss"], results["pred"], results["label"], class_names, prefix)

    def describe_head(self, class_names: list[str]) -> str:
        return f"{len(class_names)} classes"

    def curve_metric(self) -> CurveMetric:
        return CurveMetric()

    def format_epoch(self, record: dict, epochs: int) -> str:
        return format_epoch(record, epochs)

    def summary(self, best: float, best_epoch: int, test: dict | None) -> str:
        return (f"best val acc {100 * best:.2f}% at epoch {best_epoch}"
                + (f"; test acc {100 * test['test_acc']:.2f}% (balanced {100 * test['test_balanced_acc']:.2f}%)"
                   if test else ""))

    def score_after_training(self, predict: Predict, splits, eval_view: Callable, hard_examples: int,
                             folder: Path | None, best_epoch: int) -> dict | None:
        """Test metrics, the val report with its confusion matrix and reliability diagram, hard examples."""
        return score_after_training(predict, splits, eval_view, hard_examples, folder, best_epoch)

    def match(self, samples, label_names: list[str], run: str):
        return match_classes(samples, label_names, run)

    def evaluate(self, folder: Path, results: dict, view, class_names: list[str], about: dict) -> tuple[dict, str]:
        report = build_report(results, class_names, view)
        save_evaluation(folder, report, results, view, class_names, about)
        return report, summary(report)

    def predictions(self, logits: torch.Tensor, label_names: list[str], top_k: int,
                    threshold: float | None) -> list[list[dict]]:
        """Per image, the `top_k` classes best first: [{"label": ..., "prob": ...}, ...]."""
        if threshold is not None:
            raise FinetuneError("a threshold applies to a multi-label model (task multi_label); this one picks one "
                                "class per image: use top_k.")
        probs = logits.softmax(dim=-1)
        values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [[{"label": label_names[i], "prob": float(p)} for p, i in zip(row_p.tolist(), row_i.tolist())]
                for row_p, row_i in zip(values, indices)]

    def format_prediction(self, prediction: list[dict]) -> str:
        return ", ".join(f"{p['label']} {100 * p['prob']:.1f}%" for p in prediction) or "no label"

    def prediction_table(self, predictions: list) -> tuple[list[str], list[list[Any]]]:
        """prediction, probability, then the next classes as prediction_2, probability_2, ... (as many as top-k)."""
        k = max((len(p) for p in predictions), default=1)
        header = ["prediction", "probability"] + [f"{c}_{i}" for i in range(2, k + 1) for c in ("prediction", "probability")]
        return header, [[v for p in top for v in (p["label"], f"{p['prob']:.6f}")] for top in predictions]

    def export_config(self) -> dict:
        return {}  # timm's config.json as it is: a classifier is what timm expects

    def card_columns(self) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
        return (("acc", "acc", "accuracy"), ("balanced_acc", "balanced acc", "balanced accuracy"))

    def card_usage(self) -> tuple[str, str]:
        return ".softmax(-1)", "labels[int(probs.argmax())], float(probs.max())"
