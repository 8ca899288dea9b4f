"""finetune/training/checkpoint.py: a kill at any moment leaves one complete checkpoint, and resume finds it.

The accelerator is a stand-in that writes a file for `save_state`; the real one is exercised end to end
in test_end_to_end.py and test_strategies.py (resume gives the uninterrupted run's weights)."""

from __future__ import annotations

import json

import pytest

from finetune import FinetuneError
from finetune.training.checkpoint import STATE_NAME, find_checkpoint, load_checkpoint, save_checkpoint
from finetune.training.rundir import RunDir


class StandInAccelerator:
    is_main_process = True

    def __init__(self, fail_in_save: bool = False):
        self.fail_in_save, self.loaded = fail_in_save, None

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        from pathlib import Path

        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_text("weights")
        if self.fail_in_save:
            raise KeyboardInterrupt  # a kill while Accelerate writes

    def load_state(self, folder: str) -> None:
        self.loaded = folder


def test_save_swaps_the_new_state_in_and_leaves_nothing_else(tmp_path):
    run = RunDir(tmp_path)
    for epoch in (1, 2):
        save_checkpoint(StandInAccelerator(), run, {"epoch": epoch, "step": 3 * epoch, "phase": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert json.loads((tmp_path / "checkpoint" / STATE_NAME).read_text())["epoch"] == 2
    assert find_checkpoint(run) == tmp_path / "checkpoint"


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint(StandInAccelerator(), run, {"epoch": 1, "step": 3, "phase": 1})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(StandInAccelerator(fail_in_save=True), run, {"epoch": 2, "step": 6, "phase": 1})
    found = find_checkpoint(run)
    assert found == tmp_path / "checkpoint" and json.loads((found / STATE_NAME).read_text())["epoch"] == 1


def test_a_kill_between_the_two_renames_resumes_from_the_old_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint(StandInAccelerator(), run, {"epoch": 1, "step": 3, "phase": 1})
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # first rename done, second not
    assert find_checkpoint(run) == tmp_path / "checkpoint.old"
    assert find_checkpoint(RunDir(tmp_path / "fresh")) is None


def test_load_restores_the_state_and_refuses_a_checkpoint_from_another_phase(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint(StandInAccelerator(), run, {"epoch": 2, "step": 6, "phase": 2})
    accelerator = StandInAccelerator()
    state = load_checkpoint(accelerator, run.checkpoint, phase_at=lambda epoch: 2)
    assert state["step"] == 6 and accelerator.loaded == str(run.checkpoint)
    with pytest.raises(FinetuneError, match="saved for unfreezing phase 2 but the recipe puts epoch 3 in phase 1"):
        load_checkpoint(accelerator, run.checkpoint, phase_at=lambda epoch: 1)
