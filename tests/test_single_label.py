"""task: single_label (tasks/single_label.py): the loss it builds from the recipe (class weights, label
smoothing, soft targets under mixing), its per-image results, its epoch line and summary, and what
`predict` returns (the top-k classes, no threshold)."""

from __future__ import annotations

import pytest
import torch
from timm.loss import SoftTargetCrossEntropy

from finetune.data.samples import IGNORE_LABEL
from finetune.errors import FinetuneError
from finetune.recipe.schema import TrainConfig
from finetune.tasks import SingleLabel

TASK = SingleLabel()


def test_the_loss_is_cross_entropy_with_the_recipes_weights_and_smoothing_or_soft_targets():
    loss = TASK.build_loss([0, 0, 0, 1], 2, TrainConfig(class_weights="auto", label_smoothing=0.1), False)
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.label_smoothing == 0.1
    assert loss.weight.tolist() == pytest.approx([4 / 6, 4 / 2])  # N / (classes x count)
    assert TASK.build_loss([0, 1], 2, TrainConfig(), False).weight is None
    assert isinstance(TASK.build_loss([0, 1], 2, TrainConfig(), True), SoftTargetCrossEntropy)


def test_results_and_metrics_leave_unreadable_images_out():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    results = TASK.results(logits, torch.tensor([0, 2, IGNORE_LABEL]))
    assert results["pred"].tolist() == [0, 1, 2] and results["top_k"].shape == (3, 3)  # top-5 of 3 classes: 3
    metrics = TASK.metrics(results, ["a", "b", "c"], "val")
    assert metrics["val_images"] == 2 and metrics["val_acc"] == 0.5
    assert TASK.kept(results["label"]).tolist() == [True, True, False]


def test_epoch_line_and_summary_read_as_before():
    record = {"epoch": 2, "train_loss": 0.5, "val_loss": 0.25, "val_acc": 0.875, "val_balanced_acc": 0.8,
              "exported": "model", "epoch_seconds": 3.0}
    assert TASK.format_epoch(record, 8) == ("epoch 2/8: train loss 0.5000 | val loss 0.2500 acc 87.50% (balanced "
                                            "80.00%) (best, exported) | 3.0s")
    assert TASK.summary(0.875, 2, {"test_acc": 0.5, "test_balanced_acc": 0.25}) == \
        "best val acc 87.50% at epoch 2; test acc 50.00% (balanced 25.00%)"


def test_predict_gives_the_top_k_classes_and_refuses_a_threshold():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    top = TASK.predictions(logits, ["a", "b", "c"], 2, None)
    assert [p["label"] for p in top[0]] == ["b", "c"] and top[0][0]["prob"] == pytest.approx(
        torch.softmax(logits, -1)[0, 1].item())
    assert TASK.prediction_table(top) == (["prediction", "probability", "prediction_2", "probability_2"],
                                          [["b", f"{top[0][0]['prob']:.6f}", "c", f"{top[0][1]['prob']:.6f}"]])
    assert TASK.format_prediction(top[0]).startswith("b ")
    with pytest.raises(FinetuneError, match="threshold applies to a multi-label model"):
        TASK.predictions(logits, ["a", "b", "c"], 2, 0.5)
