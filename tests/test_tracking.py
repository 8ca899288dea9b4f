"""finetune/training/tracking.py: train.log_with through Accelerate's trackers; TensorBoard read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import finetune
from finetune import FinetuneError


def scalars(folder) -> dict:
    """{tag: [(step, value), ...]} from the TensorBoard event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = [p.parent for p in folder.rglob("events.out.tfevents.*")]
    assert events, f"no event files under {folder}"
    tags: dict = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return tags


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path, image_folder, tiny_recipe):
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 2, "train.hard_examples": 0,
                                            "train.log_with": ["tensorboard"]})
    result = finetune.train(recipe, output=tmp_path / "run")
    tags = scalars(tmp_path / "run" / "tensorboard")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        for key, tag in [("val_acc", "val/acc"), ("val_loss", "val/loss"), ("ema_val_acc", "ema_val/acc"),
                         ("train_loss", "epoch/train_loss")]:
            assert dict(tags[tag])[record["step"]] == pytest.approx(record[key], rel=1e-6), (tag, record["epoch"])
    updates = result.metrics[-1]["step"]
    assert sorted(step for step, _ in tags["train/loss"]) == list(range(1, updates + 1))  # every update
    assert {f"lr/{name}" for name in records[0]["lr"]} <= set(tags)
    # the per-update losses average to the epoch's train loss
    first = [value for step, value in tags["train/loss"] if step <= records[0]["step"]]
    assert sum(first) / len(first) == pytest.approx(records[0]["train_loss"], rel=1e-5)


def test_an_unknown_tracker_is_refused_before_anything_is_written(tmp_path, image_folder, tiny_recipe):
    recipe = tiny_recipe(image_folder(), **{"train.log_with": ["tensorbored"]})
    with pytest.raises(FinetuneError, match="train.log_with"):
        finetune.train(recipe, output=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_overwrite_removes_the_previous_runs_tensorboard_folder(tmp_path, image_folder, tiny_recipe):
    from finetune.recipe.load import load_recipe
    from finetune.rundir.folder import RunDir
    from finetune.training.tracking import tracker_settings

    config = load_recipe(tiny_recipe(image_folder(), **{"train.log_with": ["tensorboard"]}))
    first = RunDir.for_new_run(tmp_path / "run", "test_resnet")
    first.create()
    tracked = Path(tracker_settings(config, first.path)["project_dir"])  # where Accelerate's tracker writes
    (tracked / "finetune").mkdir(parents=True)
    (tracked / "finetune" / "events.out.tfevents.1.host").write_bytes(b"previous run")
    (first.path / "notes.txt").write_text("mine")
    RunDir.for_new_run(first.path, "test_resnet", overwrite=True).create()
    assert not tracked.exists() and (first.path / "notes.txt").read_text() == "mine"
