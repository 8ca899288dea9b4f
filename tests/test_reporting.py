"""finetune/reporting: metrics from gathered per-sample results, the PNG plots, and the hard examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.loaders import Transformed
from finetune.data.samples import IGNORE_LABEL, FileSamples
from finetune.reporting.metrics import classification_metrics, percent
from finetune.reporting.plots import save_curves, save_image_grid, save_lr_find
from finetune.reporting.review import hard_example_entries, rank_hard_examples


def test_balanced_and_per_class_accuracy():
    labels = torch.tensor([0, 0, 0, 0, 1, IGNORE_LABEL])
    preds = torch.tensor([0, 0, 0, 0, 0, 1])
    m = classification_metrics(torch.ones(6), preds, labels, ["common", "rare", "absent"], "val")
    assert m["val_acc"] == pytest.approx(0.8)
    assert m["val_balanced_acc"] == pytest.approx(0.5)  # (1.0 + 0.0) / 2 classes present
    assert m["val_per_class_acc"] == {"common": 1.0, "rare": 0.0, "absent": None}
    assert m["val_images"] == 5


def test_every_report_writes_a_share_as_one_percentage():
    assert (percent(0.87314), percent(1), percent(None), percent(None, "")) == ("87.31%", "100.00%", "-", "")


def test_hard_examples_rank_by_loss_and_leave_out_ignored():
    losses = torch.tensor([0.1, 3.0, 9.0, 2.0])
    labels = torch.tensor([0, 1, IGNORE_LABEL, 1])
    assert rank_hard_examples(losses, labels, 2) == [1, 3]
    assert rank_hard_examples(losses, labels, 10) == [1, 3, 0]


def test_hard_example_entries_name_the_image_and_both_labels():
    """Positions are in the view's order; the entry names the source image behind each."""
    samples = FileSamples(["x.png", "y.png", "z.png"], [0, 1, 1], ["cat", "dog"], "folder")
    view = Transformed(samples, [2, 0], lambda image: image, "val")
    results = {"loss": torch.tensor([0.2, 4.0]), "pred": torch.tensor([1, 1]), "label": torch.tensor([1, 0]),
               "pred_prob": torch.tensor([0.9, 0.95]), "given_prob": torch.tensor([0.9, 0.05])}
    [entry] = hard_example_entries("val", results, rank_hard_examples(results["loss"], results["label"], 1), view,
                                   samples.class_names)
    assert entry == {"split": "val", "index": 0, "image": "x.png", "given": "cat", "predicted": "dog",
                     "loss": 4.0, "given_prob": 0.05, "predicted_prob": 0.95}


def test_metrics_with_no_readable_image_are_empty_not_an_error():
    m = classification_metrics(torch.zeros(2), torch.tensor([0, 1]), torch.tensor([IGNORE_LABEL] * 2), ["a", "b"], "val")
    assert m == {"val_loss": None, "val_acc": None, "val_balanced_acc": None,
                 "val_per_class_acc": {"a": None, "b": None}, "val_images": 0}


def opened(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("L"), dtype=np.float64)


def test_plots_are_pngs_with_something_drawn_and_no_temporary_left(tmp_path):
    records = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_acc": 0.5 + e / 10,
                "val_balanced_acc": 0.4 + e / 10} for e in (1, 2, 3)]
    save_curves(records, tmp_path / "curves.png")
    save_image_grid([Image.new("RGB", (40, 30), (200, 0, 0))] * 3, ["a", "b", "c"], tmp_path / "grid.png", title="t")
    save_lr_find([1e-5, 1e-4, 1e-3], [2.0, 1.5, 3.0], [2.0, 1.7, 2.2], 1e-4, "rule", tmp_path / "lr.png")
    for name in ("curves.png", "grid.png", "lr.png"):
        pixels = opened(tmp_path / name)
        assert pixels.shape[0] > 200 and pixels.std() > 5, name  # not blank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "grid.png", "lr.png"]
