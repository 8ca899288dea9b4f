"""finetune/rundir/card.py: the run's README.md in the Hugging Face model-card format, written with every
export (the loop's): YAML front matter that parses (and that huggingface_hub reads as evaluation results), the exported
epoch's metrics, the recipe, the data, and how to load the model with timm."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import yaml

from finetune.model.backbone import build_model
from finetune.model.export import save_export
from finetune.recipe.load import dump_recipe, load_recipe
from finetune.recipe.schema import ModelConfig
from finetune.rundir import card

RECORDS = [  # metrics.jsonl as the loop writes it (per-class accuracy and timing left out)
    {"epoch": 1, "train_loss": 1.05, "val_loss": 0.9, "val_acc": 0.5, "val_balanced_acc": 0.45,
     "ema_val_loss": 1.0, "ema_val_acc": 0.4, "ema_val_balanced_acc": 0.35, "exported": "model"},
    {"epoch": 2, "train_loss": 0.7, "val_loss": 0.6, "val_acc": 0.75, "val_balanced_acc": 0.7,
     "ema_val_loss": 0.5, "ema_val_acc": 0.875, "ema_val_balanced_acc": 0.8125, "exported": "ema"},
    {"epoch": 3, "train_loss": 0.5, "val_loss": 0.7, "val_acc": 0.625, "val_balanced_acc": 0.6,
     "ema_val_loss": 0.6, "ema_val_acc": 0.75, "ema_val_balanced_acc": 0.7, "exported": None},
]


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.fixture
def run(tmp_path, image_folder, monkeypatch):
    """A run directory after three epochs: recipe, metrics, data report, then an export and its card, as
    the loop writes them."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "20260101-000000-test_resnet"
    folder.mkdir(parents=True)
    recipe = {"model": {"backbone": "test_resnet", "pretrained": False},
              "data": {"train": str(image_folder()), "image_size": 32}, "train": {"epochs": 3}}
    (folder / "recipe.yaml").write_text(dump_recipe(load_recipe(recipe)))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (folder / "data_report.json").write_text(json.dumps({"images": {"train": 19, "val": 5, "test": None},
                                                         "skipped_count": 0, "skipped": []}))
    model = build_model(ModelConfig(backbone="test_resnet", pretrained=False), 3, lambda _: None)
    save_export(model, folder, ["c0", "c1", "c2"], timm.data.resolve_model_data_config(model))
    card.save_card(folder)
    return folder


def test_an_export_in_a_run_writes_the_environment_beside_the_card(run):
    assert {"README.md", "environment.json", "config.json", "model.safetensors"} <= {p.name for p in run.iterdir()}


def test_front_matter_is_valid_yaml_with_the_hub_fields_and_the_exported_metrics(run):
    front, _ = split_card((run / "README.md").read_text())
    assert front["library_name"] == "timm" and front["pipeline_tag"] == "image-classification"
    assert {"image-classification", "timm", "finetune"} <= set(front["tags"])
    # random weights: neither a base model nor a license is claimed
    assert "base_model" not in front and "license" not in front
    [entry] = front["model-index"]
    assert entry["name"] == run.name
    [result] = entry["results"]
    assert result["task"]["type"] == "image-classification" and result["dataset"]["split"] == "validation"
    assert result["dataset"]["type"] == "imagefolder"
    # epoch 2 is the exported one, and its EMA weights were exported
    assert [(m["name"], m["value"]) for m in result["metrics"]] == [("Validation accuracy", 0.875),
                                                                   ("Validation balanced accuracy", 0.8125)]


def test_huggingface_hub_reads_the_metrics_as_eval_results(run):
    hub = pytest.importorskip("huggingface_hub")
    data = hub.ModelCard((run / "README.md").read_text()).data
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification"
    assert [(r.metric_type, r.metric_value, r.dataset_split) for r in data.eval_results] == [
        ("accuracy", 0.875, "validation"), ("accuracy", 0.8125, "validation")]


def test_body_has_usage_data_metrics_table_and_recipe(run):
    _, body = split_card((run / "README.md").read_text())
    assert 'timm.create_model("local-dir:runs/20260101-000000-test_resnet", pretrained=True)' in body
    assert 'timm.create_model("hf-hub:YOUR_NAME/20260101-000000-test_resnet", pretrained=True)' in body
    assert "hf upload YOUR_NAME/20260101-000000-test_resnet runs/20260101-000000-test_resnet" in body
    assert "moving average (EMA) of the weights after epoch 2 of 3, the best by validation accuracy (87.50%) of the " \
        "3 epoch(s) finished" in body
    assert "| 2 | 0.7000 | 0.6000 | 75.00% | 70.00% | 87.50% | ema |" in body
    assert "| 3 | 0.5000 | 0.7000 | 62.50% | 60.00% | 75.00% |  |" in body
    assert "| train |" in body and "| 19 |" in body and "20% of train, stratified (seed 0)" in body
    assert "```yaml\n" + (run / "recipe.yaml").read_text().rstrip() + "\n```" in body
    assert "`c0`, `c1`, `c2`" in body and "random weights" in body
    assert "## Environment" in body and "environment.json" in body


def test_test_metrics_and_curves_appear_once_written(run):
    (run / "test_metrics.json").write_text(json.dumps({"epoch": 2, "test_acc": 0.9, "test_balanced_acc": 0.85,
                                                       "test_images": 20}))
    (run / "curves.png").write_bytes(b"")
    card.save_card(run)
    front, body = split_card((run / "README.md").read_text())
    test = front["model-index"][0]["results"][1]
    assert test["dataset"]["split"] == "test" and [m["value"] for m in test["metrics"]] == [0.9, 0.85]
    assert "accuracy 90.00%, balanced accuracy 85.00% (20 images)" in body and "![" in body and "(curves.png)" in body


def test_hub_weights_name_the_base_model_and_their_license():
    config = {"architecture": "efficientnet_lite0", "pretrained_cfg": {"tag": "ra_in1k", "license": "apache-2.0"}}
    recipe = {"model": {"backbone": "efficientnet_lite0", "pretrained": True}, "data": {"train": "sklearn:digits"}}
    data = card.card_data("run", recipe, config, RECORDS[0], None)
    assert data.base_model == "timm/efficientnet_lite0.ra_in1k" and data.license == "apache-2.0"
    assert data.eval_results[0].dataset_type == "digits"
    assert card.base_model("hf-hub:someone/model@v2", True, {}) == "someone/model"
    assert card.base_model("efficientnet_lite0", "weights.pth", config) is None


def test_the_export_knows_a_run_directory_by_the_recipe_the_run_directory_writes():
    from finetune.model import export
    from finetune.rundir import folder

    assert export.RECIPE_NAME == folder.RECIPE_NAME  # model may not import rundir: the name is written twice


def test_the_card_of_a_run_without_metrics_yet_still_renders(run):
    (run / "metrics.jsonl").unlink()
    front, body = split_card(card.render_card(run))
    assert "model-index" not in front and "## Results" not in body and torch.__version__ in body
