"""task: multi_label end to end and piece by piece: label lists from CSV/JSONL manifests, Hugging Face
Sequence(ClassLabel) and Python objects (tasks/label_sets.py); the BCE loss (tasks/multi_label.py); mAP and
F1 (tasks/multi_label_reports.py); the recipe's checks; and a CPU run on generated coloured shapes that must
reach mAP 0.9, export a model timm loads, and predict every label above the threshold."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import timm
import torch
from helpers import SHAPES, resume_after_epoch_one, write_shapes
from PIL import Image

import finetune
from finetune.data.checkdata import check_data, format_report
from finetune.data.samples import IGNORE_LABEL
from finetune.data.splits import build_splits
from finetune.errors import FinetuneError
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import DataConfig, TrainConfig
from finetune.tasks import MultiLabel
from finetune.tasks.label_sets import (
    cooccurrence,
    load_label_sets,
    multi_hot,
    positive_weights,
    split_labels,
    stratify_keys,
    wrap_label_sets_in_memory,
)
from finetune.tasks.multi_label import MultiLabelLoss
from finetune.tasks.multi_label_reports import multi_label_metrics, multi_label_report

TASK = MultiLabel()


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label"])
        writer.writerows([[row["image"], "|".join(row["labels"])] for row in rows])
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"image": row["image"], "label": row["labels"]}) + "\n" for row in rows))
    return path


@pytest.fixture
def shapes(tmp_path) -> tuple[Path, list[dict]]:
    rows = write_shapes(tmp_path, 24, size=32, empty_every=8)
    return tmp_path, rows


# ---------------------------------------------------------------------------------------------------------
# Data


def test_a_csv_cell_splits_at_bars_and_a_json_list_is_taken_as_it_is():
    assert split_labels("cat| dog |") == ["cat", "dog"]
    assert split_labels(["cat", "dog"]) == ["cat", "dog"]
    assert split_labels("") == [] and split_labels(None) == [] and split_labels([]) == []


def test_csv_and_jsonl_manifests_give_the_same_label_sets(shapes):
    root, rows = shapes
    from_csv = load_label_sets(str(write_csv(root / "m.csv", rows)), DataConfig())
    from_jsonl = load_label_sets(str(write_jsonl(root / "m.jsonl", rows)), DataConfig())
    assert from_csv.class_names == from_jsonl.class_names == sorted({n for r in rows for n in r["labels"]})
    assert from_csv.targets == from_jsonl.targets
    names = from_csv.class_names
    assert [[names[t] for t in target] for target in from_csv.targets] == [sorted(r["labels"]) for r in rows]
    assert from_csv.targets[0] == ()  # an image with no positive label is allowed


@pytest.mark.parametrize("label, problem", [("[null]", "null"), ('["cat", true]', "true"), ("true", "true"),
                                            ("2.5", "2.5"), ('[["cat"]]', '["cat"]')])
def test_a_jsonl_label_that_names_no_label_is_an_error_naming_its_line(shapes, label, problem):
    root, rows = shapes
    path = write_jsonl(root / "m.jsonl", rows)
    with path.open("a") as f:
        f.write(f'{{"image": "img/1.png", "label": {label}}}\n')
    with pytest.raises(FinetuneError) as info:
        load_label_sets(str(path), DataConfig())
    assert f"{path}, line {len(rows) + 1}" in str(info.value) and problem in str(info.value)
    assert "\n" not in str(info.value)


def test_a_null_label_like_a_blank_cell_means_no_label_and_integers_are_names(shapes):
    root, _ = shapes
    path = root / "m.jsonl"
    path.write_text('{"image": "img/0.png", "label": null}\n{"image": "img/1.png", "label": [3, "cat"]}\n'
                    '{"image": "img/2.png", "label": 3}\n')
    samples = load_label_sets(str(path), DataConfig())
    assert samples.class_names == ["3", "cat"] and samples.targets == [(), (0, 1), (0,)]


def test_a_csv_row_with_more_fields_than_the_header_is_an_error_naming_its_line(shapes):
    root, rows = shapes
    path = write_csv(root / "m.csv", rows)
    path.write_text(path.read_text().replace("img/3.png,", "img/3.png,cat,dog,", 1))
    with pytest.raises(FinetuneError, match=r"m\.csv, line 5 has 2 more fields than its header"):
        load_label_sets(str(path), DataConfig())


def test_a_sample_becomes_a_multi_hot_vector_and_batches_stack(shapes):
    root, rows = shapes
    recipe = load_recipe({"task": "multi_label", "model": {"backbone": "test_resnet", "pretrained": False},
                          "data": {"train": str(write_csv(root / "m.csv", rows))}})
    splits = build_splits(recipe.data, 0, task=TASK)
    assert multi_hot((0, 2), 4).tolist() == [1, 0, 1, 0]
    assert multi_hot((0,), 3, ignored=True).tolist() == [IGNORE_LABEL] * 3
    from finetune.data.device_augment import collate_crops
    from finetune.data.loaders import Transformed

    view = Transformed(splits.train, splits.train_indices, lambda image: torch.zeros(3, 4, 4))
    _, label = view[0]
    assert label.shape == (5,) and label.dtype == torch.float32
    crops = [((torch.zeros(4, 4, 3, dtype=torch.uint8), torch.zeros(8)), view[i][1]) for i in range(3)]
    assert collate_crops(crops)[2].shape == (3, 5)


def test_val_is_split_off_by_each_images_rarest_label():
    targets = [(0,)] * 8 + [(0, 1)] * 2 + [()] * 2
    assert stratify_keys(targets, 2) == [0] * 8 + [1] * 2 + [-1] * 2
    splits_keys = stratify_keys(targets, 2)
    from finetune.data.splits import stratified_split

    _, val = stratified_split(splits_keys, 0.25, 0)
    assert any(targets[i] == (0, 1) for i in val)  # the rare label reaches val


def test_an_unknown_label_in_val_is_named(shapes):
    root, rows = shapes
    train = write_csv(root / "train.csv", rows)
    val = write_csv(root / "val.csv", [{"image": "img/1.png", "labels": ["circle", "hexagon"]}])
    with pytest.raises(FinetuneError, match="hexagon"):
        build_splits(DataConfig(train=str(train), val=str(val)), 0, task=TASK)


def test_a_val_set_without_any_label_is_refused_before_training(shapes):
    """val mAP picks the best epoch; with no positive in val it is undefined: said before anything trains."""
    root, rows = shapes
    train = write_csv(root / "train.csv", rows)
    val = write_csv(root / "val.csv", [{"image": "img/1.png", "labels": []}, {"image": "img/2.png", "labels": []}])
    with pytest.raises(FinetuneError, match=r"val.csv has no image with a label, so val mAP"):
        build_splits(DataConfig(train=str(train), val=str(val)), 0, task=TASK)


def test_a_hugging_face_sequence_of_class_labels(shapes):
    datasets = pytest.importorskip("datasets")
    root, rows = shapes
    names = ["triangle", "circle", "square", "cross", "bar"]  # ClassLabel's own order is kept
    features = datasets.Features({"image": datasets.Image(),
                                  "tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    ds = datasets.Dataset.from_dict({"image": [str(root / r["image"]) for r in rows],
                                     "tags": [[names.index(n) for n in r["labels"]] for r in rows]}, features=features)
    samples = wrap_label_sets_in_memory(ds, None, DataConfig(), "train_data")
    assert samples.class_names == names
    assert [sorted(names[t] for t in target) for target in samples.targets] == [sorted(r["labels"]) for r in rows]
    image, target = samples[3]
    assert image.size == (32, 32) and target == samples.targets[3]
    ds.save_to_disk(str(root / "hf"))  # the recipe's hf:FOLDER reads the same label sets
    from_disk = load_label_sets(f"hf:{root / 'hf'}", DataConfig())
    assert from_disk.class_names == names and from_disk.targets == samples.targets


def test_python_objects_with_label_lists(shapes):
    root, rows = shapes
    pairs = [(str(root / r["image"]), r["labels"]) for r in rows]
    samples = wrap_label_sets_in_memory(pairs, None, DataConfig(), "train_data")
    assert samples.class_names == sorted(SHAPES, key=str.lower)
    by_index = wrap_label_sets_in_memory([(Image.new("RGB", (8, 8)), [1, 0]), (Image.new("RGB", (8, 8)), [])],
                                          ["a", "b"], DataConfig(), "train_data")
    assert by_index.targets == [(0, 1), ()]
    with pytest.raises(FinetuneError, match="outside 0..1"):
        wrap_label_sets_in_memory([(Image.new("RGB", (8, 8)), [2])], ["a", "b"], DataConfig(), "train_data")


def test_a_single_label_manifest_of_lists_points_to_the_task(shapes):
    root, rows = shapes
    with pytest.raises(FinetuneError, match="task: multi_label"):
        build_splits(DataConfig(train=str(write_jsonl(root / "m.jsonl", rows))), 0)


def test_positive_weights_and_cooccurrence():
    targets = [(0,), (0, 1), (0, 1), ()]
    # a: 1 negative / 3 positives; c has no positive: weight 1
    assert torch.allclose(positive_weights(targets, 3), torch.tensor([1 / 3, 1.0, 1.0]))
    report = cooccurrence(targets, ["a", "b", "c"])
    assert report["labels_per_image"] == {"0": 1, "1": 1, "2": 2}
    assert report["top_pairs"] == [{"labels": ["a", "b"], "images": 2}]
    assert report["no_positives"] == ["c"]


def test_check_data_reports_cooccurrence_and_labels_without_positives(shapes):
    root, rows = shapes
    report = check_data(DataConfig(train=str(write_csv(root / "m.csv", rows))), 0, task=TASK)
    assert report["trainable"]
    labels = report["splits"]["train"]["labels"]
    assert sum(labels["labels_per_image"].values()) == report["splits"]["train"]["readable"]
    assert "0" in labels["labels_per_image"]  # the images without a label are counted, not refused
    assert labels["no_positives"] == []
    assert "most frequent pairs" in format_report(report, TASK)
    readable = report["splits"]["train"]["readable"] + report["splits"]["val"]["readable"]
    assert readable == len(rows)
    positives = {name: report["splits"]["train"]["classes"][name] + report["splits"]["val"]["classes"][name]
                 for name in SHAPES}
    assert positives == {name: sum(name in r["labels"] for r in rows) for name in SHAPES}  # positives per label


# ---------------------------------------------------------------------------------------------------------
# Loss and metrics


def test_the_loss_is_bce_with_logits_and_leaves_ignored_rows_out():
    logits, targets = torch.randn(4, 3), torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 0], [0, 1, 1]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(MultiLabelLoss()(logits, targets), expected)
    ignored = torch.cat([targets[:2], torch.full((2, 3), float(IGNORE_LABEL))])
    assert torch.allclose(MultiLabelLoss()(logits, ignored),
                          torch.nn.functional.binary_cross_entropy_with_logits(logits[:2], targets[:2]))
    smoothed = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets * 0.8 + 0.1)
    assert torch.allclose(MultiLabelLoss(smoothing=0.2)(logits, targets), smoothed)
    weight = torch.tensor([2.0, 1.0, 3.0])
    assert torch.allclose(MultiLabelLoss(weight)(logits, targets), torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=weight))
    loss = TASK.build_loss([(0,), (0, 1)], 3, TrainConfig(class_weights="auto", label_smoothing=0.0), False)
    assert loss.weight.tolist() == [1.0, 1.0, 1.0] and loss.smoothing == 0.0  # always or never present: 1


def test_metrics_map_f1_and_labels_without_positives():
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float)
    perfect = TASK.results(torch.where(labels > 0, 5.0, -5.0), labels)
    metrics = multi_label_metrics(perfect, ["a", "b", "c"], "val", 0.5)
    assert metrics["val_map"] == 1.0 and metrics["val_f1_micro"] == 1.0 and metrics["val_exact_match"] == 1.0
    assert metrics["val_per_class_ap"] == {"a": 1.0, "b": 1.0, "c": None}  # no positive: no AP, not 0
    assert metrics["val_images"] == 4
    wrong = TASK.results(torch.where(labels > 0, -5.0, 5.0), labels)
    assert multi_label_metrics(wrong, ["a", "b", "c"], "val", 0.5)["val_f1_micro"] == 0.0
    ignored = {**perfect, "label": torch.cat([labels[:3], torch.full((1, 3), float(IGNORE_LABEL))])}
    assert multi_label_metrics(ignored, ["a", "b", "c"], "val", 0.5)["val_images"] == 3
    report = multi_label_report(perfect, ["a", "b", "c"], 0.5)
    assert report["per_class"]["a"] == {"ap": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert report["per_class"]["c"]["recall"] is None and report["map"] == 1.0


# ---------------------------------------------------------------------------------------------------------
# The recipe


def test_task_is_a_top_level_key_and_an_override(shapes):
    root, rows = shapes
    base = {"model": {"backbone": "test_resnet", "pretrained": False},
            "data": {"train": str(write_csv(root / "m.csv", rows))}}
    assert load_recipe(base).task == "single_label"
    assert load_recipe(base, ["task=multi_label"]).task == "multi_label"
    with pytest.raises(FinetuneError, match="task"):
        load_recipe({**base, "task": "multilabel"})


@pytest.mark.parametrize("override, key", [({"data.sampler": "balanced"}, "data.sampler"),
                                           ({"optim.name": "lbfgs", "freeze.backbone": True}, "optim.name"),
                                           ({"train.head_init": "probe"}, "train.head_init"),
                                           ({"train.threshold": 1.0}, "train.threshold")])
def test_single_label_ideas_are_refused_with_multi_label(shapes, override, key):
    root, rows = shapes
    base = {"task": "multi_label", "model": {"backbone": "test_resnet", "pretrained": False},
            "data": {"train": str(write_csv(root / "m.csv", rows))}}
    with pytest.raises(FinetuneError, match=key):
        load_recipe(base, override)


# ---------------------------------------------------------------------------------------------------------
# The acceptance run


@pytest.mark.slow
def test_shapes_reach_map_0_9_and_the_export_predicts_label_sets(tmp_path):
    rows = write_shapes(tmp_path / "data", 300, empty_every=25)
    manifest = write_csv(tmp_path / "data" / "train.csv", rows)
    result = finetune.train({"task": "multi_label", "model": {"backbone": "test_resnet", "pretrained": False},
                             "data": {"train": str(manifest), "image_size": 32, "num_workers": 0},
                             "optim": {"lr": 1e-3}, "train": {"epochs": 10, "batch_size": 16, "hard_examples": 4}},
                            output=tmp_path / "run")
    run = Path(result.run_dir)
    best = result.metrics[result.best_epoch - 1]
    assert result.best_val_acc >= 0.9 and max(best["val_map"], best.get("ema_val_map") or 0) == result.best_val_acc
    assert set(best["val_per_class_ap"]) == set(SHAPES)
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "multi_label" and config["threshold"] == 0.5
    model = timm.create_model(f"local-dir:{run}", pretrained=True)  # the export still loads in timm
    assert model.num_classes == 5
    report = json.loads((run / "val_report.json").read_text())
    assert report["map"] >= 0.9 and set(report["per_class"]) == set(SHAPES)
    hard = json.loads((run / "hard_examples.json").read_text())
    assert len(hard["train"]) == 4 and isinstance(hard["train"][0]["given"], list)

    predictor = finetune.load(run, device="cpu")
    images = [str(tmp_path / "data" / rows[i]["image"]) for i in range(1, 40)]
    predicted = predictor.predict(images)
    assert all(p["prob"] >= 0.5 for row in predicted for p in row)
    right = sum(sorted(p["label"] for p in row) == sorted(rows[i]["labels"]) for i, row in zip(range(1, 40), predicted))
    assert right >= 30  # most images get exactly their label set
    assert all(len(row) == 5 for row in predictor.predict(images[:3], threshold=1e-6))


def test_python_label_lists_train_a_frozen_body_without_cached_features_and_eval_scores_it(shapes, tmp_path):
    root, rows = shapes
    pairs = [(str(root / r["image"]), r["labels"]) for r in rows]
    result = finetune.train({"model": {"backbone": "test_resnet", "pretrained": False},
                             "data": {"image_size": 32, "num_workers": 0, "cache": "none"},
                             "freeze": {"backbone": True}, "train": {"epochs": 1, "batch_size": 8, "hard_examples": 2}},
                            train_data=pairs, test_data=pairs[:6], task="multi_label", output=tmp_path / "run")
    record = result.metrics[0]
    assert result.test["test_images"] == 6 and "test_map" in result.test
    assert json.loads((Path(result.run_dir) / "test_metrics.json").read_text())["test_map"] == result.test["test_map"]
    assert record["features_cached"] is False  # cached features serve a softmax head only
    assert {"val_map", "val_f1_micro", "val_f1_macro", "val_per_class_ap"} <= set(record) and "val_acc" not in record
    assert result.best_val_acc == max(record["val_map"], record.get("ema_val_map") or 0)
    card = (Path(result.run_dir) / "README.md").read_text()
    assert "| val mAP |" in card and ".sigmoid()" in card and "best by validation mAP" in card
    evaluated = finetune.evaluate(result.run_dir, str(write_csv(root / "m.csv", rows)), output=tmp_path / "eval")
    assert evaluated.metrics["images"] == len(rows) and evaluated.metrics["threshold"] == 0.5
    assert {"map", "f1_micro", "f1_macro", "per_class"} <= set(evaluated.metrics)
    assert "mAP" in evaluated.summary  # what `finetune eval` prints
    table = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()
    assert table[0].split(",")[:3] == ["path", "labels", "predicted"] and len(table) == len(rows) + 1
    assert table[1].split(",")[1] == ""  # the image with no label
    from finetune import cli

    cli.main(["predict", result.run_dir, str(root / rows[1]["image"]), "--threshold", "0.01", "--csv",
              str(tmp_path / "p.csv")])
    written = (tmp_path / "p.csv").read_text().splitlines()
    assert written[0] == "path,labels,probabilities" and len(written[1].split(",")[1].split("|")) == 5
    with pytest.raises(FinetuneError, match="hexagon"):
        finetune.evaluate(result.run_dir, [(str(root / rows[1]["image"]), ["hexagon"])], output=tmp_path / "e2")


def test_an_interrupted_multi_label_run_resumes_with_its_best_map(shapes, tmp_path, train_until_epoch_one):
    root, rows = shapes
    manifest = write_csv(root / "m.csv", rows)
    result = resume_after_epoch_one("multi_label", manifest, tmp_path / "run", train_until_epoch_one)
    best = max((r for r in result.metrics), key=lambda r: max(r["val_map"], r.get("ema_val_map") or 0))
    assert result.best_val_acc == max(best["val_map"], best.get("ema_val_map") or 0)
