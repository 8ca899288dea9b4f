"""finetune/lrfind.py: the LR range test (sweep, smoothing, the suggestion rule, its files, its CLI)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

import finetune
from finetune import FinetuneError
from finetune.training.lrfind import smooth, suggest, sweep_lrs


def test_sweep_is_geometric_from_start_to_end():
    lrs = sweep_lrs(1e-6, 1.0, 13)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert all(r == pytest.approx(10 ** 0.5) for r in ratios)


def test_smoothing_is_bias_corrected():
    assert smooth([2.0] * 20) == pytest.approx([2.0] * 20)  # no pull towards zero at the start
    values = smooth([1.0] * 10 + [0.0] * 10)
    assert values[9] == pytest.approx(1.0) and all(b < a for a, b in zip(values[9:], values[10:]))


def test_suggestion_is_the_steepest_descent_in_log_lr():
    lrs = sweep_lrs(1e-6, 1.0, 61)
    # a loss that falls fastest at 1e-3 (a logistic in log10(lr)), then diverges in the last points
    loss = [2.0 - 1.5 / (1 + math.exp(-4 * (math.log10(lr) + 3))) for lr in lrs]
    loss[-5:] = [5, 6, 7, 8, 9]
    assert suggest(lrs, loss) == pytest.approx(1e-3, rel=0.3)


@pytest.fixture
def recipe(image_folder, tiny_recipe):
    return tiny_recipe(image_folder(classes=3, per_class=8), **{"train.batch_size": 4})


def test_lr_find_writes_plot_and_json_into_a_new_folder_only(tmp_path, recipe):
    result = finetune.lr_find(recipe, output=tmp_path / "lrf", start=1e-5, end=10.0, steps=30)
    assert {p.name for p in (tmp_path / "lrf").iterdir()} == {"lr_find.png", "lr_find.json"}
    assert (tmp_path / "lrf" / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "lrf" / "lr_find.json").read_text())
    assert saved["override"] == result.override == f"optim.lr={result.suggestion:.2g}"
    assert "steepest descent" in saved["rule"]
    assert 10 <= len(result.lrs) <= 30 and result.lrs[0] == pytest.approx(1e-5)
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1]
    with pytest.raises(FinetuneError, match="not an empty folder"):  # never writes into an existing run
        finetune.lr_find(recipe, output=tmp_path / "lrf", steps=30)


def test_lr_find_keeps_the_plan_ratios(tmp_path, recipe, monkeypatch):
    import finetune.training.step as step_module

    seen = []
    original = step_module.set_lr

    def record(optimizer, multiplier, epoch=0, *rest):
        original(optimizer, multiplier, epoch, *rest)
        seen.append({g["name"]: (g["lr"], g["peak_lr"]) for g in optimizer.param_groups})

    monkeypatch.setattr(step_module, "set_lr", record)
    recipe["optim"] = {"lr": 1e-3, "head_lr_mult": 10.0, "layer_decay": 0.7}
    recipe["freeze"] = {"stages": 1, "unfreeze_at": 1}
    result = finetune.lr_find(recipe, output=tmp_path / "lrf", start=1e-5, end=1.0, steps=12)
    for step, (lr, groups) in enumerate(zip(result.lrs, seen)):
        for name, (now, peak) in groups.items():
            waiting = name.endswith(".from1")  # thaws at epoch 1: stays at 0 in the sweep of epoch 0
            assert now == (0.0 if waiting else pytest.approx(peak * lr / 1e-3, rel=1e-9)), (step, name)


def test_lr_find_and_train_see_the_same_updates(tmp_path, image_folder, tiny_recipe, monkeypatch):
    """The sweep runs the training step itself: the same images per update (global batch 6 split into
    micro-batches of 3 x 2 accumulation, not 4 + 2), augmented alike, and the same loss before the first
    step (class weights and label smoothing included)."""
    import finetune.training.session as session

    build_model, batches = session.build_model, []

    def recording_build_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inputs: batches.append(
            (inputs[0].shape[0], round(float(inputs[0].double().sum()), 3))) if m.training else None)
        return model

    monkeypatch.setattr(session, "build_model", recording_build_model)
    recipe = tiny_recipe(image_folder(classes=3, per_class=3), **{
        "train.batch_size": 6, "train.micro_batch_size": 4, "train.epochs": 2, "train.class_weights": "auto",
        "data.val_fraction": 0.2, "train.hard_examples": 0})
    trained = finetune.train(recipe, output=tmp_path / "run")  # 6 train images: 1 update of 6 per epoch
    train_batches, batches[:] = list(batches), []
    found = finetune.lr_find(recipe, output=tmp_path / "lrf", start=1e-6, end=1e-5, steps=10)
    assert [n for n, _ in train_batches] == [3] * 4  # 2 epochs x 1 update x 2 micro-batches of 3
    assert batches[:4] == train_batches  # the first two sweep updates: same images, same augmentation
    assert found.losses[0] == pytest.approx(trained.metrics[0]["train_loss"], abs=1e-6)


@pytest.mark.slow
def test_lr_find_cli_prints_the_override(tmp_path, recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "finetune", "lr-find", str(path), "--output", str(tmp_path / "o"),
                           "--steps", "20", "--start", "1e-4"], capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train with the override: optim.lr=" in proc.stdout and "steepest descent" in proc.stdout
