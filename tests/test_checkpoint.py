"""finetune/training/checkpoint.py: a kill at any moment leaves one complete checkpoint, and resume finds it.

The accelerator is a stand-in that writes a file for `save_state`; the real one is exercised end to end
in test_end_to_end.py and test_strategies.py (resume gives the uninterrupted run's weights)."""

from __future__ import annotations

import json

import pytest
from safetensors import SafetensorError

from finetune import FinetuneError
from finetune.training.checkpoint import MANIFEST_NAME, STATE_NAME, find_checkpoint, load_checkpoint, save_checkpoint
from finetune.training.rundir import RunDir


class StandInAccelerator:
    is_main_process = True

    def __init__(self, fail_in_save: bool = False, fail_in_load: Exception | None = None):
        self.fail_in_save, self.fail_in_load, self.loaded = fail_in_save, fail_in_load, None

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        from pathlib import Path

        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_text("weights " * 100)
        (Path(folder) / "optimizer.bin").write_bytes(bytes(range(256)))
        if self.fail_in_save:
            raise KeyboardInterrupt  # a kill while Accelerate writes

    def load_state(self, folder: str) -> None:
        if self.fail_in_load is not None:
            raise self.fail_in_load
        self.loaded = folder


def state(epoch: int, phase: int = 1) -> dict:
    return {"epoch": epoch, "step": 3 * epoch, "best_val_acc": 0.5, "best_epoch": 1, "phase": phase}


def test_save_swaps_the_new_state_in_and_keeps_the_previous_one(tmp_path):
    run = RunDir(tmp_path)
    for epoch in (1, 2, 3):
        save_checkpoint(StandInAccelerator(), run, state(epoch))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.old"]
    assert json.loads((tmp_path / "checkpoint" / STATE_NAME).read_text())["epoch"] == 3
    assert json.loads((tmp_path / "checkpoint.old" / STATE_NAME).read_text())["epoch"] == 2
    assert find_checkpoint(run) == tmp_path / "checkpoint"


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint(StandInAccelerator(), run, state(1))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(StandInAccelerator(fail_in_save=True), run, state(2))
    found = find_checkpoint(run)
    assert found == tmp_path / "checkpoint" and json.loads((found / STATE_NAME).read_text())["epoch"] == 1


def test_a_kill_between_the_two_renames_resumes_from_the_old_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint(StandInAccelerator(), run, state(1))
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # first rename done, second not
    assert find_checkpoint(run) == tmp_path / "checkpoint.old"
    assert find_checkpoint(RunDir(tmp_path / "fresh")) is None


def test_load_restores_the_state_and_refuses_a_checkpoint_from_another_phase(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint(StandInAccelerator(), run, state(2, phase=2))
    accelerator = StandInAccelerator()
    loaded = load_checkpoint(accelerator, run.checkpoint, phase_at=lambda epoch: 2)
    assert loaded["step"] == 6 and accelerator.loaded == str(run.checkpoint)
    with pytest.raises(FinetuneError, match="saved for unfreezing phase 2 but the recipe puts epoch 3 in phase 1"):
        load_checkpoint(accelerator, run.checkpoint, phase_at=lambda epoch: 1)


# ----------------------------------------------------------------------------------------------------
# Issue 14.3: damaged checkpoints are found before they are loaded, and the previous one is used


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated weights": lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:50]),
    "truncated optimizer": lambda c: (c / "optimizer.bin").write_bytes(b""),
    "one bit flipped": lambda c: flip_a_byte(c / "optimizer.bin"),
    "empty trainer state": lambda c: (c / STATE_NAME).write_text(""),
    "garbage trainer state": lambda c: (c / STATE_NAME).write_text("{not json"),
    "trainer state edited": lambda c: (c / STATE_NAME).write_text(json.dumps(state(99))),
    "file missing": lambda c: (c / "model.safetensors").unlink(),
    "garbage manifest": lambda c: (c / MANIFEST_NAME).write_text("[1, 2"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_saying_why(tmp_path, capsys, damage):
    run = RunDir(tmp_path)
    for epoch in (1, 2):
        save_checkpoint(StandInAccelerator(), run, state(epoch))
    DAMAGES[damage](run.checkpoint)
    assert find_checkpoint(run) == tmp_path / "checkpoint.old"
    out = capsys.readouterr().out
    assert f"{tmp_path / 'checkpoint'} is damaged" in out
    assert f"resuming from the previous checkpoint, {tmp_path / 'checkpoint.old'} (after epoch 1)" in out


def test_both_checkpoints_damaged_is_an_error_that_says_what_to_do(tmp_path):
    run = RunDir(tmp_path)
    for epoch in (1, 2):
        save_checkpoint(StandInAccelerator(), run, state(epoch))
    DAMAGES["truncated weights"](run.checkpoint)
    DAMAGES["empty trainer state"](tmp_path / "checkpoint.old")
    with pytest.raises(FinetuneError, match=r"no usable checkpoint.*model.safetensors.*trainer_state.json.*overwrite"):
        find_checkpoint(run)


def test_a_checkpoint_beyond_the_recipes_epochs_is_refused(tmp_path, tiny_recipe):
    """A trainer state saying epoch 99 of 4 must not end the run as done after 2 epochs."""
    from finetune.recipe.load import load_recipe

    run = RunDir(tmp_path)
    run.write_recipe(load_recipe(tiny_recipe(**{"train.epochs": 4})))
    for epoch in (98, 99):
        save_checkpoint(StandInAccelerator(), run, state(epoch))  # checksums intact: recipe.yaml was edited
    with pytest.raises(FinetuneError, match=r"epoch 99 .*train.epochs is 4"):
        find_checkpoint(run)


def test_a_checkpoint_that_fails_to_load_is_a_finetune_error(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint(StandInAccelerator(), run, state(1))
    (run.checkpoint / MANIFEST_NAME).unlink()  # written by an older finetune: nothing to verify against
    with pytest.raises(FinetuneError, match=r"cannot be loaded.*SafetensorError"):
        load_checkpoint(StandInAccelerator(fail_in_load=SafetensorError("invalid header")), run.checkpoint,
                        phase_at=lambda epoch: 1)
