"""finetune/training/state.py: the training state survives trainer_state.json exactly, reads finetune 0.1's
states, and refuses impossible ones with what is wrong."""

from __future__ import annotations

import json

import pytest

from finetune.training.state import EarlyStopCounters, TrainState


def through_json(state: TrainState) -> TrainState:
    return TrainState.from_json(json.loads(json.dumps(state.to_json())))


def test_every_field_survives_the_file():
    mid_epoch = TrainState(epoch=2, update=17, phase=2, best_metric=0.75, best_epoch=2, best_from="ema",
                           epoch_updates=3, epoch_losses=(0.5, 0.25, 0.125), stopped_early=False,
                           early_stop=EarlyStopCounters(0.75, 2, 0))
    assert through_json(mid_epoch) == mid_epoch
    fresh = TrainState()
    assert fresh.best_metric is None and through_json(fresh.replace(epoch=1)) == fresh.replace(epoch=1)


def test_finetune_0_1_states_still_read():
    old = {"epoch": 3, "step": 9, "best_val_acc": 0.5, "best_epoch": 2}  # before phases and best_from
    state = TrainState.from_json(old)
    assert (state.epoch, state.update, state.phase, state.best_metric, state.best_from) == (3, 9, 1, 0.5, "model")
    assert TrainState.from_json({**old, "best_epoch": 0, "best_val_acc": -1.0}).best_metric is None


@pytest.mark.parametrize("state, why", [
    ([1, 2], "not a JSON object"),
    ({"epoch": 1.5, "step": 3, "best_val_acc": 0.5, "best_epoch": 1}, "whole numbers for epoch"),
    ({"epoch": 1, "step": 3, "best_val_acc": "high", "best_epoch": 1}, "best_val_acc"),
    ({"epoch": 1, "step": 3, "best_val_acc": 0.5, "best_epoch": 4}, "impossible values"),
    ({"epoch": 1, "step": -1, "best_val_acc": 0.5, "best_epoch": 1}, "impossible values"),
    ({"epoch": 1, "step": 3, "best_val_acc": 0.5, "best_epoch": 1, "best_from": "os.system"}, "best_from"),
    ({"epoch": 1, "step": 3, "best_val_acc": 0.5, "best_epoch": 1, "epoch_updates": 2, "epoch_losses": ["x"]},
     "epoch_losses"),
    ({"epoch": 1, "step": 3, "best_val_acc": 0.5, "best_epoch": 1, "early_stop": {"best": "x"}}, "early_stop"),
])
def test_impossible_states_are_refused_saying_why(state, why):
    with pytest.raises(ValueError, match=why):
        TrainState.from_json(state)
