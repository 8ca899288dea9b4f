"""`task: multi_label`: any number of labels per image, none included. A sigmoid per label instead of one
softmax; targets are label sets (label_sets.py reads them, as multi-hot [B, C] rows in batches).

The loss is binary cross-entropy with logits, averaged over labels and images. `train.label_smoothing` s
moves each binary target toward 1/2 (1 - s/2 and s/2, as YOLOv5's smooth_BCE); `train.class_weights: auto`
weighs each label's positives by its negatives / positives in train (BCE pos_weight). Every epoch: the
mean average precision over the labels with a positive image (mAP, macro: it picks the best epoch), micro
and macro F1 at `train.threshold`, the share of images whose predicted label set is exactly right, each
label's AP (multi_label_reports.py; the counting is torchmetrics'). `predict` gives every label from the threshold on, which the
export records. Rows of IGNORE_LABEL (an unreadable eval image whose slot another image filled) are left
out of the loss and the metrics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..data.samples import IGNORE_LABEL
from ..data.samples import ImageSamples
from ..errors import FinetuneError
from ..recipe.schema import DataConfig, TrainConfig
from ..reporting.plots import CurveMetric
from .base import Predict, Task
from .label_sets import (
    align_label_sets,
    cooccurrence,
    load_label_sets,
    positive_weights,
    stratify_keys,
    wrap_label_sets_in_memory,
)
from .multi_label_reports import multi_label_metrics, save_multi_label_evaluation, score_multi_label_after_training

LISTED = 20  # labels named in check-data's line


@dataclass(frozen=True)
class MultiLabel(Task):
    """A sigmoid per label; `threshold` decides which labels an image is predicted to hold."""

    threshold: float = 0.5  # train.threshold: the probability from which a label is predicted (F1, predict)

    name: ClassVar[str] = "multi_label"
    selection: ClassVar[str] = "map"
    selection_name: ClassVar[str] = "mAP"
    min_classes: ClassVar[int] = 1  # one label present or absent is a question worth a model
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "map", "f1_micro", "f1_macro", "exact_match", "per_class_ap",
                                               "images")

    # -- targets: label sets (label_sets.py)

    def load_source(self, text: str, cfg: DataConfig, class_names: list[str] | None = None) -> ImageSamples:
        return load_label_sets(text, cfg, class_names)

    def wrap_in_memory(self, data: Any, class_names: Sequence[str] | None, cfg: DataConfig, what: str) -> ImageSamples:
        return wrap_label_sets_in_memory(data, class_names, cfg, what)

    def align(self, samples: ImageSamples, class_names: list[str]) -> ImageSamples:
        return align_label_sets(samples, class_names)

    def check_val(self, val: ImageSamples) -> None:
        if not any(len(target) for target in val.targets):
            raise FinetuneError(f"the val data {val.origin} has no image with a label, so val mAP, which picks the "
                                "best epoch, is undefined; give val images with their labels, or leave data.val "
                                "out to split val off the training data.")

    def stratify_keys(self, targets: Sequence[tuple], class_names: list[str]) -> list[int]:
        return stratify_keys(targets, len(class_names))

    def count_targets(self, targets: Sequence[tuple], class_names: list[str]):
        """Positive images per label."""
        return super().count_targets([t for target in targets for t in target], class_names)

    def target_report(self, targets: Sequence[tuple], class_names: list[str]) -> dict:
        return {"labels": cooccurrence(targets, class_names)}

    def format_target_report(self, split: str, report: dict) -> list[str]:
        labels = report["labels"]
        pairs = ", ".join(f"{'+'.join(p['labels'])} {p['images']}" for p in labels["top_pairs"]) or "none"
        empty = f"; labels with no positive image: {', '.join(labels['no_positives'][:LISTED])}"
        return [f"{split}: images per number of labels {labels['labels_per_image']}; most frequent pairs: {pairs}"
                + (empty if labels["no_positives"] else "")]

    def imbalance_advice(self) -> str:
        return "train.class_weights=auto (positive weights), and watch per-label AP."

    # -- training and scoring

    def build_loss(self, train_targets: Sequence[tuple], num_classes: int, tc: TrainConfig, mixing: bool) -> nn.Module:
        """Binary cross-entropy, with positive weights from the training labels when asked."""
        weight = positive_weights(train_targets, num_classes) if tc.class_weights == "auto" else None
        return MultiLabelLoss(weight, tc.label_smoothing)

    def results(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per image: the loss (unsmoothed, unweighted: the one hard examples rank by), every label's
        probability, and the targets (IGNORE_LABEL rows kept for the metrics to leave out)."""
        return {"loss": per_image_loss(logits, labels)[0], "probs": logits.float().sigmoid(), "label": labels}

    def kept(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels != IGNORE_LABEL).all(dim=1)  # an ignored image is a whole row of IGNORE_LABEL

    def metrics(self, results: dict, class_names: list[str], prefix: str) -> dict:
        return multi_label_metrics(results, class_names, prefix, self.threshold)

    def describe_head(self, class_names: list[str]) -> str:
        return f"{len(class_names)} labels"

    def curve_metric(self) -> CurveMetric:
        return CurveMetric("map", "mAP", "mAP", "val mAP")

    def summary(self, best: float, best_epoch: int, test: dict | None) -> str:
        return (f"best val mAP {100 * best:.2f}% at epoch {best_epoch}"
                + (f"; test mAP {100 * (test['test_map'] or 0):.2f}%" if test else ""))

    def format_epoch(self, record: dict, epochs: int) -> str:
        ema = f" | EMA mAP {self.format_value(record.get('ema_val_map'))}" if "ema_val_map" in record else ""
        best = {None: "", "model": " (best, exported)", "ema": " (best, EMA exported)"}[record["exported"]]
        loss = record["val_loss"]
        return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} | val loss "
                f"{'-' if loss is None else f'{loss:.4f}'} mAP {self.format_value(record['val_map'])} (F1 micro "
                f"{self.format_value(record['val_f1_micro'])}, macro {self.format_value(record['val_f1_macro'])})"
                f"{ema}{best} | {record['epoch_seconds']:.1f}s")

    def score_after_training(self, predict: Predict, splits, eval_view: Callable, hard_examples: int,
                             folder: Path | None, best_epoch: int) -> dict | None:
        return score_multi_label_after_training(predict, splits, eval_view, hard_examples, folder, best_epoch,
                                                self.threshold)

    def match(self, samples: ImageSamples, label_names: list[str], run: str) -> ImageSamples:
        return align_label_sets(samples, label_names)

    def evaluate(self, folder: Path, results: dict, view, class_names: list[str], about: dict) -> tuple[dict, str]:
        """metrics.json with mAP and F1 at the run's threshold, predictions.csv with each label's probability."""
        return save_multi_label_evaluation(folder, results, view, class_names, self.threshold, about)

    # -- using the export

    def predictions(self, logits: torch.Tensor, label_names: list[str], top_k: int,
                    threshold: float | None) -> list[list[dict]]:
        """Per image, every label whose probability reaches `threshold` (default: the run's), most probable
        first, and [] where none does."""
        threshold = self.threshold if threshold is None else threshold
        if not 0 < threshold < 1:
            raise FinetuneError(f"threshold {threshold!r}: give a probability in (0, 1).")
        return [[{"label": label_names[i], "prob": float(row[i])}
                 for i in row.argsort(descending=True).tolist() if row[i] >= threshold] for row in logits.sigmoid()]

    def format_prediction(self, prediction: list[dict]) -> str:
        return ", ".join(f"{p['label']} {100 * p['prob']:.1f}%" for p in prediction) or "no label"

    def prediction_table(self, predictions: list) -> tuple[list[str], list[list[Any]]]:
        """labels and probabilities, each joined by `|` as a manifest writes them (empty: no label reached the
        threshold)."""
        return ["labels", "probabilities"], [["|".join(p["label"] for p in top),
                                              "|".join(f"{p['prob']:.6f}" for p in top)] for top in predictions]

    def export_config(self) -> dict:
        return {"task": self.name, "threshold": self.threshold}  # predict's sigmoid and its threshold

    def from_export(self, config: dict) -> MultiLabel:
        return dataclasses.replace(self, threshold=float(config.get("threshold", 0.5)))

    def card_columns(self) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
        return (("map", "mAP", "mAP"), ("f1_micro", "f1 micro", "micro F1"))

    def card_subject(self, count: int, listed: str) -> str:
        return f"multi-label image classifier (any number of labels per image) for {count} labels: {listed}"

    def card_usage(self) -> tuple[str, str]:
        return (".sigmoid()[0]",
                f"[(name, float(p)) for name, p in zip(labels, probs) if p >= {self.threshold}]")


class MultiLabelLoss(torch.nn.Module):
    """(logits [B, C], multi-hot targets [B, C]) -> the mean binary cross-entropy over the kept images."""

    def __init__(self, weight: torch.Tensor | None = None, smoothing: float = 0.0):
        super().__init__()
        # `weight`, as CrossEntropyLoss names its class weights (the printed set-up reads it): BCE pos_weight.
        self.register_buffer("weight", weight)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses, keep = per_image_loss(logits, targets, self.weight, self.smoothing)
        return losses.sum() / keep.sum().clamp(min=1)


def per_image_loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None,
                   smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(each image's mean BCE over its labels [B], 0 for an ignored image; which images count [B])."""
    keep = (targets != IGNORE_LABEL).all(dim=1)
    clean = targets.float().clamp(min=0)
    if smoothing:
        clean = clean * (1 - smoothing) + smoothing / 2
    losses = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), clean, pos_weight=pos_weight,
                                                                  reduction="none").mean(dim=1)
    return losses * keep, keep



