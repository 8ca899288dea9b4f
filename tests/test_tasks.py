"""The task contract (tasks/base.py, tasks/build.py): the recipe's `task` picks a Task and an export's
config.json rebuilds it; the selection metric's direction; and a task of one's own passed to
finetune.train(task=...), trained with the defaults of the base class, exported and loaded again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

import finetune
from finetune.errors import FinetuneError
from finetune.recipe.schema import RecipeConfig, TrainConfig
from finetune.tasks import MultiLabel, Regression, SingleLabel, Task, build_task, load_task


def test_the_recipe_picks_the_task_and_config_json_rebuilds_it():
    assert build_task(RecipeConfig()) == SingleLabel()
    assert build_task(RecipeConfig(task="multi_label", train=TrainConfig(threshold=0.3))) == MultiLabel(0.3)
    assert build_task(RecipeConfig(task="regression", train=TrainConfig(loss="huber"))) == Regression("huber")
    for task in (SingleLabel(), MultiLabel(0.3), Regression("huber", 2.5, 0.5, "age")):
        assert load_task({"label_names": ["x"], **task.export_config()}) == task
    assert SingleLabel().export_config() == {}  # a classifier's config.json is timm's own, nothing added
    with pytest.raises(FinetuneError, match="lacks what it needs"):
        load_task({"task": "regression"})
    with pytest.raises(FinetuneError, match=r"task of your own \('mine'\).*finetune.load\(RUN_DIR, task="):
        load_task({"task": "mine"})


def test_better_follows_the_selection_metrics_direction():
    assert SingleLabel().better(0.9, 0.8) and not SingleLabel().better(0.8, 0.8)
    assert Regression().better(0.2, 0.3) and not Regression().better(0.3, 0.2)
    assert MultiLabel().better(0.1, None) and not MultiLabel().better(None, 0.1)


class Evenness(Task):
    """A task of one's own written from the base class alone: one class per image (the default reading), a
    plain cross-entropy, and its own metric `hits`, which picks the best epoch."""

    name: ClassVar[str] = "evenness"
    selection: ClassVar[str] = "hits"
    selection_name: ClassVar[str] = "hits"
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "hits", "images")

    def build_loss(self, train_targets, num_classes, tc, mixing) -> nn.Module:
        return nn.CrossEntropyLoss()

    def results(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.cross_entropy(logits, labels, reduction="none"), "pred": logits.argmax(-1),
                "label": labels}

    def metrics(self, results: dict, class_names: list[str], prefix: str) -> dict:
        keep = self.kept(results["label"])
        hits = (results["pred"] == results["label"])[keep].float()
        return {f"{prefix}_loss": results["loss"][keep].mean().item(), f"{prefix}_hits": hits.mean().item(),
                f"{prefix}_images": int(keep.sum())}


def test_a_task_of_ones_own_trains_exports_and_loads_again(tmp_path, image_folder, tiny_recipe, capsys):
    data = image_folder(classes=2, per_class=8)
    result = finetune.train(tiny_recipe(data, **{"train.hard_examples": 0}), task=Evenness(),
                            output=tmp_path / "run", test_data=[(str(p), p.parent.name)
                                                                for p in sorted((data / "c0").glob("*.png"))[:2]])
    out = capsys.readouterr().out
    assert "val loss" in out and " hits " in out and "done: best val hits" in out  # the base class's lines
    records = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert "val_hits" in records[0] and "val_acc" not in records[0]
    assert result.test is not None and "test_hits" in result.test
    assert json.loads((Path(result.run_dir) / "config.json").read_text())["task"] == "evenness"
    with pytest.raises(FinetuneError, match="task of your own"):
        finetune.load(result.run_dir, device="cpu")
    predictor = finetune.load(result.run_dir, device="cpu", task=Evenness())
    outputs = predictor.predict([str(next((data / "c0").glob("*.png")))])
    assert len(outputs) == 1 and len(outputs[0]) == 2  # the base class's prediction: the raw outputs


def test_task_takes_a_task_object_or_the_recipes_task_name(tmp_path, tiny_recipe):
    with pytest.raises(TypeError, match="task= takes a finetune.tasks.Task"):
        finetune.train(tiny_recipe(), task=object(), output=tmp_path / "a")
    with pytest.raises(FinetuneError, match="train.loss"):  # "regression" is the recipe's key: its checks apply
        finetune.train(tiny_recipe(**{"train.loss": "huber"}), task="single_label", output=tmp_path / "b")
