"""finetune/training/stopping.py and train.early_stop: the rule (patience, min_delta, direction, model or its
average), the recipe key (null by default, a sub-section a dotted override turns on), and a run on a
plateau that stops early, says so, leaves a complete run directory whose export is the best epoch's, and
refuses to be resumed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

import finetune
from finetune import FinetuneError
from finetune.recipe.load import dump_recipe, load_recipe
from finetune.recipe.schema import EarlyStopConfig
from finetune.rundir.listing import summarise
from finetune.training.state import TrainState
from finetune.training.stopping import EarlyStop


def run_rule(values: list[float], epochs: int = 100, **config) -> list[bool]:
    stop = EarlyStop(EarlyStopConfig(**config))
    return [stop.update(epoch, epochs, {config.get("metric", "val_acc"): v}) for epoch, v in enumerate(values, 1)]


# ----------------------------------------------------------------------------------------------------
# The rule


def test_stops_after_patience_epochs_without_improvement():
    assert run_rule([0.5, 0.6, 0.6, 0.55], patience=2) == [False, False, False, True]
    assert run_rule([0.5, 0.6, 0.6, 0.7, 0.7], patience=2) == [False] * 5  # improving resets the count
    assert run_rule([0.5, 0.5], patience=1) == [False, True]


def test_min_delta_is_the_smallest_change_that_counts():
    assert run_rule([0.5, 0.505, 0.509], patience=2, min_delta=0.01) == [False, False, True]
    assert run_rule([0.5, 0.52, 0.53], patience=2, min_delta=0.01) == [False, False, False]


def test_val_loss_improves_by_falling():
    assert run_rule([1.0, 0.9, 0.95, 0.91], metric="val_loss", patience=2) == [False, False, False, True]


def test_the_better_of_model_and_average_counts():
    stop = EarlyStop(EarlyStopConfig(patience=1))
    assert not stop.update(1, 10, {"val_acc": 0.5, "ema_val_acc": 0.4})
    assert not stop.update(2, 10, {"val_acc": 0.4, "ema_val_acc": 0.6})
    assert (stop.best, stop.best_epoch) == (0.6, 2)


def test_the_last_epoch_is_no_early_stop():
    assert run_rule([0.5, 0.5], epochs=2, patience=1) == [False, False]


def test_off_it_adds_nothing(tmp_path):
    stop = EarlyStop(None)
    assert not stop.update(1, 2, {"val_acc": 0.1}) and stop.record() == {} and stop.counters() is None
    stop.resume(TrainState(epoch=1, best_epoch=1), tmp_path)
    assert not stop.stopped


def test_a_resumed_run_counts_on_from_the_checkpoint(tmp_path):
    before = EarlyStop(EarlyStopConfig(patience=2))
    before.update(1, 10, {"val_acc": 0.5})
    before.update(2, 10, {"val_acc": 0.4})
    saved = TrainState(epoch=2, best_epoch=1, best_metric=0.5, early_stop=before.counters())
    state = TrainState.from_json(json.loads(json.dumps(saved.to_json())))  # through trainer_state.json
    after = EarlyStop(EarlyStopConfig(patience=2))
    after.resume(state, tmp_path)
    assert after.update(3, 10, {"val_acc": 0.45})
    assert after.record() == {"epochs_without_improvement": 2, "stopped_early": True}


def test_resume_of_a_run_that_stopped_early_and_finished_is_refused(tmp_path):
    state = TrainState(epoch=3, best_epoch=1, stopped_early=True)
    unscored = EarlyStop(EarlyStopConfig())
    unscored.resume(state, tmp_path)  # killed before its scoring after training: that is left to do
    assert unscored.stopped
    (tmp_path / "val_report.json").write_text("{}")  # written by the scoring after training
    with pytest.raises(FinetuneError, match="stopped early after epoch 3 .* is finished"):
        EarlyStop(EarlyStopConfig()).resume(state, tmp_path)
    with pytest.raises(FinetuneError, match="stopped early"):  # even when the recipe no longer asks for it
        EarlyStop(None).resume(state, tmp_path)


# ----------------------------------------------------------------------------------------------------
# The recipe key


def test_off_by_default_and_a_dotted_override_turns_it_on(tiny_recipe):
    assert load_recipe(tiny_recipe()).train.early_stop is None
    stop = load_recipe(tiny_recipe(), ["train.early_stop.patience=3"]).train.early_stop
    assert stop == EarlyStopConfig(metric="val_acc", patience=3, min_delta=0.0)
    config = load_recipe(tiny_recipe(**{"train.early_stop": {"metric": "val_loss", "min_delta": 0.01}}))
    assert config.train.early_stop == EarlyStopConfig("val_loss", 5, 0.01)
    assert load_recipe(yaml.safe_load(dump_recipe(config))) == config  # the saved recipe loads back
    assert load_recipe(tiny_recipe(**{"train.early_stop": {"patience": 2}}), ["train.early_stop=null"]) \
        .train.early_stop is None


@pytest.mark.parametrize("value, message", [
    ({"patience": 0}, "train.early_stop.patience: 0 must be between 1 and"),
    ({"min_delta": -1}, "train.early_stop.min_delta: -1.0 must be in [0,"),
    ({"metric": "val_top5"}, "train.early_stop.metric: got 'val_top5', expected one of val_acc"),
    ({"patiense": 2}, "train.early_stop.patiense: unknown key; did you mean train.early_stop.patience?"),
    (3, "train.early_stop: expected a mapping of keys, got 3"),
])
def test_bad_values_are_refused_naming_the_key(tiny_recipe, value, message):
    with pytest.raises(FinetuneError) as e:
        load_recipe(tiny_recipe(**{"train.early_stop": value}))
    assert message in str(e.value)


# ----------------------------------------------------------------------------------------------------
# A run on a plateau


@pytest.fixture
def plateau(tmp_path) -> Path:
    """Two classes of the very same images: no model can tell them apart, so validation accuracy is the
    same every epoch while the weights keep changing."""
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        for name in ("a", "b"):
            (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    return tmp_path / "data"


def test_a_run_on_a_plateau_stops_early_and_finishes(tiny_recipe, plateau, tmp_path, capsys):
    recipe = tiny_recipe(plateau, **{"train.epochs": 5, "train.ema": None,
                                     "train.early_stop": {"patience": 1}, "optim.lr": 1e-2})
    result = finetune.train(recipe, output=tmp_path / "run")
    run = Path(result.run_dir)
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["val_acc"] == records[1]["val_acc"]
    assert records[-1]["stopped_early"] is True and records[-1]["epochs_without_improvement"] == 1
    assert "stopped_early" not in records[0]
    assert ("early stop: val_acc has not improved by more than 0 for 1 epoch(s) (best 50.00% at epoch 1); stopping "
            "after epoch 2 of 5") in out
    # Complete: the export, the after-training scoring, the model card.
    for name in ("model.safetensors", "hard_examples.json", "val_report.json", "README.md", "data_report.json"):
        assert (run / name).is_file(), name
    assert result.best_epoch == 1
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert state["stopped_early"] is True and state["epoch"] == 2 and state["early_stop"]["bad_epochs"] == 1
    # The export is epoch 1's weights (checkpoint.old), not those of epoch 2 where it stopped.
    exported = load_file(str(run / "model.safetensors"))
    epoch_1 = load_file(str(run / "checkpoint.old" / "model.safetensors"))
    epoch_2 = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert all(np.array_equal(exported[k].numpy(), epoch_1[k].numpy()) for k in exported)
    assert any(not np.array_equal(exported[k].numpy(), epoch_2[k].numpy()) for k in exported)

    assert summarise(run).status == "finished"  # finetune runs: not "interrupted" at 2 of 5 epochs

    # Killed between its stop and the end of its scoring: a resume trains no epoch and finishes the scoring.
    (run / "val_report.json").unlink()
    finished = finetune.train(resume=run)
    assert [r["epoch"] for r in finished.metrics] == [1, 2] and (run / "val_report.json").is_file()
    again = load_file(str(run / "model.safetensors"))
    assert all(np.array_equal(again[k].numpy(), epoch_1[k].numpy()) for k in epoch_1)  # still epoch 1's

    before = sorted(p.name for p in run.iterdir())
    card = (run / "README.md").read_text()
    with pytest.raises(FinetuneError, match="stopped early after epoch 2 .* is finished"):
        finetune.train(resume=run)
    assert sorted(p.name for p in run.iterdir()) == before and (run / "README.md").read_text() == card
    shutil.rmtree(run)
