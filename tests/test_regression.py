"""task: regression piece by piece and end to end: numbers from CSV/JSONL manifests, Hugging Face columns and
Python pairs, with a row-naming error for anything else (tasks/numbers.py); the standardised MSE and Huber
losses, MAE/RMSE/R² in the user's units and the reports (tasks/regression.py, regression_reports.py); the
recipe's checks; and a CPU run on generated counting images whose predict, eval and ONNX file all give
numbers in the units it trained on."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import resume_after_epoch_one
from PIL import Image, ImageDraw

import finetune
from finetune.data.checkdata import check_data, format_report
from finetune.data.loaders import Transformed
from finetune.data.splits import build_splits
from finetune.errors import FinetuneError
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import DataConfig, TrainConfig
from finetune.tasks import Regression
from finetune.tasks.numbers import load_numbers, rank_bins, wrap_numbers_in_memory
from finetune.tasks.regression import RegressionLoss

TASK = Regression()


class WholeCount(Regression):
    """docs/tasks.md's example: a count, rounded to whole objects, never below zero."""
    name = "whole_count"

    def predictions(self, logits, label_names, top_k, threshold):
        return [max(0, round(v)) for v in super().predictions(logits, label_names, top_k, threshold)]


def write_counts(root: Path, n: int, size: int = 32, seed: int = 0) -> list[tuple[str, int]]:
    """root/img/<i>.png holding 0-4 white squares on black; returns (relative path, count) rows."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        count = int(rng.integers(0, 5))
        image = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(image)
        for k in range(count):  # one square per column of a 5-column grid: they never overlap
            x, y = k * size // 5 + 1, int(rng.integers(1, size - 6))
            draw.rectangle([x, y, x + 4, y + 4], fill=(255, 255, 255))
        image.save(root / "img" / f"{i}.png")
        rows.append((f"img/{i}.png", count))
    return rows


def write_csv(path: Path, rows: list, header: tuple = ("path", "count")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def counts(tmp_path) -> tuple[Path, list]:
    return tmp_path, write_counts(tmp_path, 24)


# ---------------------------------------------------------------------------------------------------------
# Reading numbers


def test_csv_and_jsonl_give_numbers_under_the_columns_name(counts):
    root, rows = counts
    from_csv = load_numbers(str(write_csv(root / "m.csv", rows)), DataConfig())
    (root / "m.jsonl").write_text("".join(json.dumps({"image": p, "age": c + 0.5}) + "\n" for p, c in rows))
    from_jsonl = load_numbers(str(root / "m.jsonl"), DataConfig())
    assert from_csv.class_names == ["count"] and from_jsonl.class_names == ["age"]  # the one other column
    assert from_csv.targets == [float(c) for _, c in rows]
    assert from_jsonl.targets == [c + 0.5 for _, c in rows]
    _, target = Transformed(from_csv, None, lambda im: torch.zeros(1), "val", substitute=False)[0]
    assert target.dtype == torch.float32 and float(target) == rows[0][1]


@pytest.mark.parametrize("cell, said", [("", "no value"), ("three", "'three'"), ("nan", "'nan'")])
def test_a_missing_or_non_numeric_target_names_the_file_and_its_line(counts, cell, said):
    root, rows = counts
    bad = [list(r) for r in rows]
    bad[3][1] = cell
    manifest = write_csv(root / "m.csv", bad)
    with pytest.raises(FinetuneError, match=rf"m\.csv \(column 'count'\): line 5 has {said} where a number belongs"):
        load_numbers(str(manifest), DataConfig())


def test_python_pairs_hugging_face_columns_and_refused_sources(counts, tmp_path):
    root, rows = counts
    pairs = [(str(root / p), c * 1.5) for p, c in rows]
    samples = wrap_numbers_in_memory(pairs, None, DataConfig(), "train_data")
    assert samples.targets == [c * 1.5 for _, c in rows] and samples.class_names == ["value"]
    with pytest.raises(FinetuneError, match="train_data: item 1 has 'x'"):
        wrap_numbers_in_memory([(pairs[0][0], 1.0), (pairs[1][0], "x")], None, DataConfig(), "train_data")
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [str(root / p) for p, _ in rows], "score": [float(c) for _, c in rows]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "score": datasets.Value("float32")}))
    hf = wrap_numbers_in_memory(ds, None, DataConfig(), "train_data")
    assert hf.class_names == ["score"] and hf.targets == [float(c) for _, c in rows]
    with pytest.raises(FinetuneError, match="gives each image a class"):
        load_numbers(str(tmp_path / "img"), DataConfig())  # a folder: classes, not numbers


def test_val_split_spans_the_range_and_constant_targets_are_refused(counts):
    root, rows = counts
    assert rank_bins([5.0, 1.0, 3.0, 2.0] * 5, bins=2) == [1, 0, 1, 0] * 5  # by rank, ties in order
    assert rank_bins([5.0, 1.0, 3.0, 2.0]) == [0] * 4  # too few for two bins of PER_BIN
    splits = build_splits(DataConfig(train=str(write_csv(root / "m.csv", rows)), val_fraction=0.25), 0, task=TASK)
    val = sorted(splits.train.targets[i] for i in splits.val_indices)
    assert len(val) == 6 and val[0] <= 1 and val[-1] >= 3
    same = write_csv(root / "same.csv", [(p, 2) for p, _ in rows])
    with pytest.raises(FinetuneError, match="all with the number 2: there is nothing to learn"):
        build_splits(DataConfig(train=str(same)), 0, task=TASK)


def test_check_data_reports_the_range_of_numbers(counts):
    root, rows = counts
    report = check_data(DataConfig(train=str(write_csv(root / "m.csv", rows))), 0, TASK)
    assert report["trainable"] and report["splits"]["train"]["targets"]["max"] == max(c for _, c in rows)
    low, high = min(c for _, c in rows), max(c for _, c in rows)
    assert f"train: numbers from {low} to {high}" in format_report(report, TASK)


# ---------------------------------------------------------------------------------------------------------
# Loss, metrics, predictions, export


def test_the_loss_standardises_targets_and_leaves_unreadable_images_out():
    task = Regression("mse", mean=10.0, std=2.0)
    outputs, targets = torch.tensor([[0.0], [1.0], [5.0]]), torch.tensor([10.0, 14.0, math.nan])
    assert task.build_loss([], 1, TrainConfig(), False)(outputs, targets).item() == pytest.approx((0 + 1) / 2)
    huber = RegressionLoss("huber", 10.0, 2.0)(torch.tensor([[3.0]]), torch.tensor([10.0]))
    assert huber.item() == pytest.approx(3.0 - 0.5)  # linear beyond one standard deviation
    results = task.results(outputs, targets)
    assert results["pred"].tolist() == [10.0, 12.0, 20.0] and results["loss"][2] == 0  # user units; 0 when ignored


def test_metrics_are_mae_rmse_and_r2_in_the_users_units_and_select_by_lowest_mae():
    task = Regression(mean=0.0, std=1.0)
    results = task.results(torch.tensor([[1.0], [2.0], [4.0], [0.0]]), torch.tensor([1.0, 3.0, 3.0, math.nan]))
    m = task.metrics(results, ["count"], "val")
    assert m["val_images"] == 3 and m["val_mae"] == pytest.approx(2 / 3)
    assert m["val_rmse"] == pytest.approx(math.sqrt(2 / 3)) and m["val_r2"] == pytest.approx(1 - 2 / (8 / 3))
    assert task.better(0.3, 0.5) and not task.better(0.5, 0.3) and task.better(0.9, None)
    assert "MAE 0.6667 (RMSE 0.8165, R² 0.250)" in task.format_epoch(
        {"epoch": 1, "train_loss": 1.0, "exported": "model", "epoch_seconds": 1.0, **m}, 3)


def test_predictions_are_numbers_and_the_export_records_the_standardisation():
    task = Regression("huber", mean=3.0, std=2.0, unit="count")
    assert task.predictions(torch.tensor([[0.5], [-1.0]]), ["count"], 5, None) == [4.0, 1.0]
    with pytest.raises(FinetuneError, match="threshold applies to a multi-label model"):
        task.predictions(torch.zeros(1, 1), ["count"], 5, 0.5)
    assert task.prediction_table([4.0]) == (["prediction"], [["4.000000"]])
    assert task.export_config() == {"task": "regression", "loss": "huber", "target_mean": 3.0, "target_std": 2.0,
                                    "target_name": "count"}
    wrapped = task.output_module(torch.nn.Linear(2, 1))
    assert torch.allclose(wrapped(torch.ones(1, 2)), wrapped.model(torch.ones(1, 2)) * 2 + 3)


@pytest.mark.parametrize("override, key", [({"train.loss": "huber", "task": "single_label"}, "train.loss"),
                                           ({"train.class_weights": "auto"}, "train.class_weights"),
                                           ({"data.sampler": "balanced"}, "data.sampler"),
                                           ({"train.mixup": 0.2}, "train.mixup"),
                                           ({"train.early_stop.patience": 2}, "train.early_stop.metric")])
def test_the_recipe_refuses_what_regression_cannot_use(counts, override, key):
    root, rows = counts
    recipe = {"task": "regression", "model": {"backbone": "test_resnet"},
              "data": {"train": str(write_csv(root / "m.csv", rows))}}
    with pytest.raises(FinetuneError, match=key.replace(".", r"\.")):
        load_recipe(recipe, override)


def test_early_stopping_watches_val_mae_downward(counts):
    from finetune.training.stopping import EarlyStop

    root, rows = counts
    config = load_recipe({"task": "regression", "model": {"backbone": "test_resnet"},
                          "data": {"train": str(write_csv(root / "m.csv", rows))},
                          "train": {"early_stop": {"metric": "val_mae", "patience": 1}}})
    stop = EarlyStop(config.train.early_stop)
    assert not stop.update(1, 5, {"val_mae": 0.5}) and not stop.update(2, 5, {"val_mae": 0.4})
    assert stop.update(3, 5, {"val_mae": 0.45})  # no lower MAE for one epoch: stop


# ---------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_a_counting_run_predicts_evaluates_and_exports_numbers(tmp_path):
    rows = write_counts(tmp_path, 48)
    train, val = write_csv(tmp_path / "train.csv", rows[:36]), write_csv(tmp_path / "val.csv", rows[36:])
    recipe = {"task": "regression", "model": {"backbone": "test_resnet", "pretrained": False},
              "data": {"train": str(train), "val": str(val), "test": str(val), "image_size": 32, "num_workers": 0,
                       "hflip": 0.0},
              "optim": {"lr": 3e-3}, "train": {"epochs": 3, "batch_size": 12, "loss": "huber"}}
    result = finetune.train(recipe, output=tmp_path / "run")
    run = Path(result.run_dir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"val_mae", "val_rmse", "val_r2", "val_loss"} <= set(records[0])
    best = min(r[f"{'ema_' if r['exported'] == 'ema' else ''}val_mae"] for r in records if r["exported"])
    assert result.best_val_acc == pytest.approx(best)  # the selection metric: the lowest MAE
    for name in ("val_report.json", "val_predicted_vs_true.png", "hard_examples.json", "test_metrics.json"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "regression" and config["target_name"] == "count"
    assert config["target_mean"] == pytest.approx(np.mean([c for _, c in rows[:36]]))

    predictor = finetune.load(run, device="cpu")
    images = [str(tmp_path / p) for p, _ in rows[36:40]]
    predicted = predictor.predict(images)
    assert all(isinstance(v, float) for v in predicted)
    raw = predictor.logits(images)[:, 0]
    assert predicted == pytest.approx((raw * config["target_std"] + config["target_mean"]).tolist(), abs=1e-5)
    # docs/tasks.md's task of one's own: a subclass, given again to load, takes the export's standardisation
    whole = finetune.load(run, device="cpu", task=WholeCount()).predict(images)
    assert whole == [max(0, round(v)) for v in predicted]

    evaluated = finetune.evaluate(run, str(val), output=tmp_path / "eval")
    assert evaluated.metrics["mae"] == pytest.approx(result.test["test_mae"], abs=1e-5)
    assert evaluated.summary.startswith("12 images: MAE ")
    assert (tmp_path / "eval" / "predicted_vs_true.png").is_file()

    pytest.importorskip("onnxruntime")
    import onnxruntime

    exported = finetune.export(run, "onnx", tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    batch = torch.stack([predictor.transform(Image.open(images[0]).convert("RGB"))]).numpy()
    assert float(session.run(None, {"pixel_values": batch})[0][0, 0]) == pytest.approx(predicted[0], abs=1e-4)


def test_an_interrupted_regression_run_resumes_with_its_lowest_mae(counts, tmp_path, train_until_epoch_one):
    root, rows = counts
    manifest = write_csv(root / "m.csv", rows)
    result = resume_after_epoch_one("regression", manifest, tmp_path / "run", train_until_epoch_one)
    lowest = min(min(r["val_mae"], r.get("ema_val_mae") or math.inf) for r in result.metrics)
    assert result.best_val_acc == lowest  # lower is better, also across the resume
