"""The loss and the per-image results of `task: multi_label`: a sigmoid per label instead of one softmax.

The loss is binary cross-entropy with logits over the multi-hot targets [B, C] (data/multilabel.py),
averaged over labels and images. `train.label_smoothing` s moves each binary target toward 1/2 (1 - s/2
and s/2, as YOLOv5's smooth_BCE); `train.class_weights: auto` weighs each label's positives by its
negatives / positives in train (BCE pos_weight). Rows of IGNORE_LABEL (an unreadable eval image whose slot
another image filled) are left out of the loss and the results' metrics.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.samples import IGNORE_LABEL
from ..data.multilabel import positive_weights
from ..recipe.schema import TrainConfig


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


def build_multi_label_loss(train_targets: Sequence[tuple], num_classes: int, tc: TrainConfig) -> MultiLabelLoss:
    """The criterion of a multi-label run, with positive weights from the training labels when asked."""
    weight = positive_weights(train_targets, num_classes) if tc.class_weights == "auto" else None
    return MultiLabelLoss(weight, tc.label_smoothing)


def multi_label_results(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One batch's per-image results: loss (unsmoothed, unweighted: the one hard examples rank by), every
    label's probability, and the targets (IGNORE_LABEL rows kept for the metrics to leave out)."""
    return {"loss": per_image_loss(logits, labels)[0], "probs": logits.float().sigmoid(), "label": labels}
