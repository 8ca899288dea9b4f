"""finetune/training/step.py: one epoch of optimizer updates (the schedule per update, the unfreezing phases,
the seeds an epoch starts from)."""

from __future__ import annotations

import pytest

import finetune


def test_a_group_that_thaws_warms_up_again(tmp_path, image_folder, tiny_recipe, monkeypatch):
    import finetune.training.step as step

    trace, original = [], step.set_lr

    def record(optimizer, *args):
        original(optimizer, *args)
        trace.append({g["name"]: g["lr"] for g in optimizer.param_groups})

    monkeypatch.setattr(step, "set_lr", record)
    recipe = tiny_recipe(image_folder(classes=3, per_class=12), **{
        "freeze.backbone": True, "freeze.unfreeze_at": 1, "train.epochs": 3, "train.batch_size": 4,
        "train.warmup_epochs": 0.5, "train.hard_examples": 0})
    result = finetune.train(recipe, output=tmp_path / "run")
    per_epoch = result.metrics[0]["step"]
    body = next(name for name in trace[0] if name.startswith("backbone") and ".no_decay" not in name)
    head = [t["head"] for t in trace]
    thawed = [t[body] for t in trace[per_epoch:]]
    assert all(t[body] == 0 for t in trace[:per_epoch])  # frozen in epoch 0
    warmup = round(0.5 * per_epoch)
    peak = json_plan_lr(tmp_path / "run", body)
    # From its thaw it climbs linearly over the warmup (1/(w+1), 2/(w+1), ...) times the cosine the head follows.
    for k in range(warmup):
        cosine = head[per_epoch + k] / head_peak(tmp_path / "run")
        assert thawed[k] == pytest.approx(peak * cosine * (k + 1) / (warmup + 1), rel=1e-9)
    cosine = head[per_epoch + warmup] / head_peak(tmp_path / "run")
    assert thawed[warmup] == pytest.approx(peak * cosine, rel=1e-9)  # then the schedule alone


def json_plan_lr(run, name: str) -> float:
    import json

    return next(g["lr"] for g in json.loads((run / "plan.json").read_text()) if g["name"] == name)


def head_peak(run) -> float:
    return json_plan_lr(run, "head")
