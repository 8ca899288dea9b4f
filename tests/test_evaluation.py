"""finetune/reporting/evaluation.py with the report's metrics (metrics.py) and plots (plots.py): numbers from
torchmetrics on known predictions, the confusion matrix readable at 2 and 100 classes, the files written,
and classes matched by name. (A run scored end to end: test_evalrun.py.)"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import FinetuneError
from finetune.data.loaders import Transformed
from finetune.data.samples import IGNORE_LABEL, FileSamples
from finetune.reporting.evaluation import (
    build_report,
    confident_mistakes,
    default_output,
    match_classes,
    predictions_csv,
    save_evaluation,
    save_val_report,
)
from finetune.reporting.metrics import reliability_bins, report_metrics
from finetune.reporting.plots import confusion_figure
from finetune.tasks.single_label import TOP_K

CLASSES = ["a", "b", "c", "d", "e", "f"]


def results_from(probs: torch.Tensor, labels: list[int]) -> dict:
    """Per-sample results as training/evaluate.py's predict_batches returns them."""
    labels = torch.tensor(labels)
    pred_prob, pred = probs.max(dim=-1)
    top_k_prob, top_k = probs.topk(min(TOP_K, probs.shape[1]), dim=-1)
    loss = torch.nn.functional.cross_entropy(probs.log(), labels, reduction="none")
    return {"loss": loss, "pred": pred, "pred_prob": pred_prob, "label": labels, "top_k": top_k,
            "top_k_prob": top_k_prob, "given_prob": probs.gather(1, labels.clamp(min=0)[:, None])[:, 0]}


@pytest.fixture
def scored():
    """40 images over 6 classes, class f absent; the last image unreadable (IGNORE_LABEL)."""
    generator = torch.Generator().manual_seed(0)
    labels = [i % 5 for i in range(39)] + [IGNORE_LABEL]
    logits = torch.randn(40, 6, generator=generator)
    logits[torch.arange(30), torch.tensor(labels[:30])] += 2.5  # most right, a few wrong
    return results_from(logits.softmax(-1), labels)


def test_report_metrics_are_torchmetrics_numbers(scored):
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_calibration_error,
        multiclass_f1_score,
    )

    m = report_metrics(scored, CLASSES)
    keep = scored["label"] != IGNORE_LABEL
    probs = torch.zeros(39, 6).scatter_(1, scored["top_k"][:39], scored["top_k_prob"][:39])
    labels, preds = scored["label"][keep], scored["pred"][keep]
    assert m["images"] == 39 and m["classes"] == 6
    assert m["top1_acc"] == pytest.approx(float((preds == labels).float().mean()), abs=1e-6)
    top5 = multiclass_accuracy(probs, labels, 6, top_k=5, average="micro").item()
    assert m["top5_acc"] == pytest.approx(top5, abs=1e-6)
    assert m["top5_acc"] >= m["top1_acc"]
    assert m["ece"] == pytest.approx(multiclass_calibration_error(probs, labels, 6, n_bins=15).item(), abs=1e-6)
    f1 = multiclass_f1_score(preds, labels, 6, average=None)
    assert m["macro_f1"] == pytest.approx(f1[:5].mean().item(), abs=1e-6)  # over the classes present
    recall = [m["per_class"][c]["recall"] for c in CLASSES[:5]]
    assert m["balanced_acc"] == pytest.approx(np.mean(recall), abs=1e-6)
    assert m["per_class"]["f"]["recall"] is None and m["per_class"]["f"]["support"] == 0  # absent class
    matrix = np.array(m["confusion_matrix"])
    assert matrix.sum(axis=1).tolist() == [m["per_class"][c]["support"] for c in CLASSES]  # rows: given class
    assert matrix.trace() == round(m["top1_acc"] * 39)


def test_top5_only_with_five_classes_or_more():
    m = report_metrics(results_from(torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]]), [0, 2]), ["x", "y", "z"])
    assert "top5_acc" not in m and m["top1_acc"] == 0.5
    assert m["per_class"]["z"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 1}  # never predicted


def test_reliability_bins_add_up_to_the_calibration_error(scored):
    keep = scored["label"] != IGNORE_LABEL
    bins = reliability_bins(scored["pred_prob"][keep], (scored["pred"] == scored["label"])[keep])
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 39
    ece = sum(b["count"] / 39 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert ece == pytest.approx(report_metrics(scored, CLASSES)["ece"], abs=1e-5)


def view_of(n: int) -> Transformed:
    samples = FileSamples([f"img{i}.png" for i in range(n)], [0] * n, ["a"], "folder")
    return Transformed(samples, None, lambda image: image, "eval", substitute=False)


def test_report_lists_missing_classes_and_unreadable_images(scored):
    report = build_report(scored, CLASSES, view_of(40))
    assert report["classes_missing"] == ["f"] and report["unreadable"] == ["img39.png"]
    assert list(report)[-1] == "confusion_matrix"  # the long part last in metrics.json


def test_predictions_csv_and_confident_mistakes(scored):
    rows = list(csv.DictReader(io.StringIO(predictions_csv(scored, view_of(40), CLASSES))))
    assert len(rows) == 39 and list(rows[0]) == ["path", "label", "prediction", "probability"]
    assert rows[3] == {"path": "img3.png", "label": "d", "prediction": CLASSES[int(scored["pred"][3])],
                       "probability": f"{float(scored['pred_prob'][3]):.6f}"}
    mistakes = confident_mistakes(scored, 100)
    wrong = [i for i in range(39) if scored["pred"][i] != scored["label"][i]]
    assert sorted(mistakes) == wrong
    assert [float(scored["pred_prob"][i]) for i in mistakes] == sorted((float(scored["pred_prob"][i]) for i in wrong),
                                                                       reverse=True)


def opened(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("L"), dtype=np.float64)


@pytest.mark.parametrize("classes", [2, 100])
def test_confusion_matrix_labels_never_overlap(classes):
    names = [f"class_{i}" for i in range(classes)]
    rng = np.random.default_rng(0)
    matrix = (rng.integers(0, 3, (classes, classes)) + 20 * np.eye(classes, dtype=int)).tolist()
    fig = confusion_figure(matrix, names)
    fig.tight_layout()
    fig.canvas.draw()
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    for labels, along in ((ax.get_yticklabels(), "y"), (ax.get_xticklabels(), "x")):
        boxes = sorted((t.get_window_extent(renderer) for t in labels if t.get_text()),
                       key=lambda box: getattr(box, along + "0"))
        assert len(boxes) == classes  # every class labelled at up to 100
        for first, second in zip(boxes, boxes[1:]):
            assert getattr(first, along + "1") <= getattr(second, along + "0") + 0.5, (along, first, second)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_eval_files(tmp_path, scored):
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "img.png")
    samples = FileSamples([str(tmp_path / "img.png")] * 40, scored["label"].clamp(min=0).tolist(), CLASSES, "f")
    view = Transformed(samples, None, lambda image: image, "eval", substitute=False)
    report = build_report(scored, CLASSES, view)
    folder = tmp_path / "eval"
    save_evaluation(folder, report, scored, view, CLASSES, {"run": "r", "data": "f"})
    assert sorted(p.name for p in folder.iterdir()) == ["confusion_matrix.png", "metrics.json", "mistakes.png",
                                                         "predictions.csv", "reliability.png"]
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["run"] == "r" and saved["top1_acc"] == report["top1_acc"]
    for name in ("confusion_matrix.png", "reliability.png", "mistakes.png"):
        pixels = opened(folder / name)
        assert min(pixels.shape) > 300 and pixels.std() > 5, name  # not blank
    save_val_report(tmp_path, report, 3)
    assert json.loads((tmp_path / "val_report.json").read_text())["epoch"] == 3
    for name in ("val_confusion_matrix.png", "val_reliability.png"):
        assert opened(tmp_path / name).std() > 5, name


def test_classes_are_matched_by_name_and_an_unknown_one_is_named():
    samples = FileSamples(["x", "y", "z"], [0, 1, 1], ["dog", "cat"], "folder")
    assert match_classes(samples, ["cat", "dog", "eel"], "RUN").targets == [1, 0, 0]
    stranger = FileSamples(["x", "y"], [0, 1], ["cat", "zebra"], "folder")
    with pytest.raises(FinetuneError, match="'zebra'.*never saw|never saw.*'zebra'"):
        match_classes(stranger, ["cat", "dog"], "RUN")


def test_default_output_never_names_an_existing_folder(tmp_path):
    first = default_output(tmp_path, "/data/my val@x")
    assert first.parent == tmp_path and first.name.startswith("eval-my-val-x-")
    first.mkdir()
    assert default_output(tmp_path, "/data/my val@x") == tmp_path / f"{first.name}-2"
    assert default_output(tmp_path, "hf:org/beans@validation").name.startswith("eval-beans-validation-")
