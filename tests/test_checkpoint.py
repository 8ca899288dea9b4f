"""finetune/training/checkpoint.py: a kill at any moment leaves one complete checkpoint, resume finds it, and
no file of a checkpoint can run code when it is loaded.

The accelerator is a stand-in (one process, no wrapping) around a real tiny model and optimizer; the real
one is exercised end to end in test_end_to_end.py and test_strategies.py (resume gives the uninterrupted
run's weights)."""

from __future__ import annotations

import json
import os
import pickle
from types import SimpleNamespace

import pytest
import torch

from finetune import FinetuneError
from finetune.training.checkpoint import MANIFEST_NAME, STATE_NAME, find_checkpoint, load_checkpoint, save_checkpoint
from finetune.rundir.folder import RunDir
from finetune.training.state import TrainState


class StandInAccelerator:
    is_main_process = True
    process_index = 0
    scaler = None

    def wait_for_everyone(self) -> None:
        pass

    def unwrap_model(self, model, keep_torch_compile=True):
        return model


class KilledWhileSaving(torch.optim.SGD):
    def state_dict(self):
        raise KeyboardInterrupt  # a kill while the optimizer state is written


def parts(seed: int = 0, optimizer=torch.optim.SGD, ema: bool = False) -> SimpleNamespace:
    """What a checkpoint saves of a session: the module, its optimizer (with state), the moving average."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    opt = optimizer(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    torch.optim.SGD.step(opt)
    return SimpleNamespace(model=model, optimizer=opt, ema=torch.nn.Sequential(model) if ema else None)


def state(epoch: int, phase: int = 1) -> TrainState:
    return TrainState(epoch=epoch, update=3 * epoch, best_metric=0.5, best_epoch=1, phase=phase)


def test_save_swaps_the_new_state_in_and_keeps_the_previous_one(tmp_path):
    run = RunDir(tmp_path)
    for epoch in (1, 2, 3):
        save_checkpoint(StandInAccelerator(), run, state(epoch), parts())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.old"]
    assert json.loads((tmp_path / "checkpoint" / STATE_NAME).read_text())["epoch"] == 3
    assert json.loads((tmp_path / "checkpoint.old" / STATE_NAME).read_text())["epoch"] == 2
    assert find_checkpoint(run) == tmp_path / "checkpoint"


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint(StandInAccelerator(), run, state(1), parts())
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(StandInAccelerator(), run, state(2), parts(optimizer=KilledWhileSaving))
    found = find_checkpoint(run)
    assert found == tmp_path / "checkpoint" and json.loads((found / STATE_NAME).read_text())["epoch"] == 1


def test_a_kill_between_the_two_renames_resumes_from_the_old_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint(StandInAccelerator(), run, state(1), parts())
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # first rename done, second not
    assert find_checkpoint(run) == tmp_path / "checkpoint.old"
    assert find_checkpoint(RunDir(tmp_path / "fresh")) is None


def test_load_restores_weights_optimizer_and_moving_average_and_refuses_another_phase(tmp_path):
    run = RunDir(tmp_path)
    saved = parts(seed=0, ema=True)
    save_checkpoint(StandInAccelerator(), run, state(2, phase=2), saved)
    fresh = parts(seed=1, ema=True)
    loaded = load_checkpoint(StandInAccelerator(), run.checkpoint, lambda epoch: 2, fresh)
    assert loaded.update == 6
    for a, b in zip(saved.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    momentum = [fresh.optimizer.state[p]["momentum_buffer"] for p in fresh.model.parameters()]
    assert all(torch.equal(m, saved.optimizer.state[p]["momentum_buffer"])
               for m, p in zip(momentum, saved.model.parameters()))
    assert {k for k in os.listdir(run.checkpoint)} == {"model.safetensors", "optimizer.safetensors", "ema.safetensors",
                                                       "rng_0.safetensors", STATE_NAME, MANIFEST_NAME}
    with pytest.raises(FinetuneError, match="saved for unfreezing phase 2 but the recipe puts epoch 3 in phase 1"):
        load_checkpoint(StandInAccelerator(), run.checkpoint, lambda epoch: 1, parts())


# ----------------------------------------------------------------------------------------------------
# Issue 14.3: damaged checkpoints are found before they are loaded, and the previous one is used


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated weights": lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:50]),
    "truncated optimizer": lambda c: (c / "optimizer.safetensors").write_bytes(b""),
    "one bit flipped": lambda c: flip_a_byte(c / "optimizer.safetensors"),
    "empty trainer state": lambda c: (c / STATE_NAME).write_text(""),
    "garbage trainer state": lambda c: (c / STATE_NAME).write_text("{not json"),
    "trainer state edited": lambda c: (c / STATE_NAME).write_text(json.dumps(state(99).to_json())),
    "file missing": lambda c: (c / "model.safetensors").unlink(),
    "garbage manifest": lambda c: (c / MANIFEST_NAME).write_text("[1, 2"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_saying_why(tmp_path, capsys, damage):
    run = RunDir(tmp_path)
    for epoch in (1, 2):
        save_checkpoint(StandInAccelerator(), run, state(epoch), parts())
    DAMAGES[damage](run.checkpoint)
    assert find_checkpoint(run) == tmp_path / "checkpoint.old"
    out = capsys.readouterr().out
    assert f"{tmp_path / 'checkpoint'} is damaged" in out
    assert f"resuming from the previous checkpoint, {tmp_path / 'checkpoint.old'} (after epoch 1)" in out


def test_both_checkpoints_damaged_is_an_error_that_says_what_to_do(tmp_path):
    run = RunDir(tmp_path)
    for epoch in (1, 2):
        save_checkpoint(StandInAccelerator(), run, state(epoch), parts())
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
        save_checkpoint(StandInAccelerator(), run, state(epoch), parts())  # checksums intact: recipe.yaml was edited
    with pytest.raises(FinetuneError, match=r"epoch 99 .*train.epochs is 4"):
        find_checkpoint(run)


def test_a_checkpoint_that_fails_to_load_is_a_finetune_error(tmp_path):
    """Checksums that match but weights of another model (the recipe changed): one paragraph, no traceback."""
    run = RunDir(tmp_path)
    save_checkpoint(StandInAccelerator(), run, state(1), parts())
    other = parts()
    other.model = torch.nn.Linear(4, 3)
    with pytest.raises(FinetuneError, match=r"cannot be loaded.*checksums match.*Nothing in it was run"):
        load_checkpoint(StandInAccelerator(), run.checkpoint, lambda epoch: 1, other)


# ----------------------------------------------------------------------------------------------------
# Issue 27.1: a shared run folder never runs code. The planted pickle would create MARKER when unpickled.


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path, marker) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def rewrite_manifest(folder) -> None:
    """What an attacker can do: the manifest is a checksum against damage, not a signature."""
    from finetune.training.checkpoint import _manifest

    (folder / MANIFEST_NAME).write_text(json.dumps({"files": _manifest(folder)}))


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scaler.pt",
                                  "model.bin", "sampler.bin"])
@pytest.mark.parametrize("manifest", ["rewritten", "deleted"])
def test_a_planted_pickle_in_a_checkpoint_never_runs(tmp_path, name, manifest):
    run = RunDir(tmp_path / "run")
    save_checkpoint(StandInAccelerator(), run, state(1), parts(ema=True))
    marker = tmp_path / "ran"
    plant(run.checkpoint / name, marker)
    if manifest == "rewritten":
        rewrite_manifest(run.checkpoint)
    else:
        (run.checkpoint / MANIFEST_NAME).unlink()
        run.trust_checkpoint = True  # even the user's explicit trust loads nothing that unpickles
    found = find_checkpoint(run)
    load_checkpoint(StandInAccelerator(), found, lambda epoch: 1, parts(ema=True))
    assert not marker.exists()


def test_a_checkpoint_without_a_manifest_is_refused_unless_trusted(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint(StandInAccelerator(), run, state(1), parts())
    (run.checkpoint / MANIFEST_NAME).unlink()
    with pytest.raises(FinetuneError, match=r"has no manifest.json.*Nothing was loaded.*--trust-checkpoint"):
        find_checkpoint(run)
    run.trust_checkpoint = True
    assert find_checkpoint(run) == run.checkpoint


@pytest.mark.parametrize("failure", [
    OSError(28, "No space left on device"),
    __import__("safetensors").SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_a_full_disk_during_a_save_names_the_last_good_checkpoint_and_keeps_it(tmp_path, monkeypatch, failure):
    from finetune.training import parts as parts_module

    run = RunDir(tmp_path)
    save_checkpoint(StandInAccelerator(), run, state(1), parts())
    before = {p.name: p.read_bytes() for p in run.checkpoint.iterdir()}

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(parts_module, "save_tree", full)
    with pytest.raises(FinetuneError, match=rf"disk full at {tmp_path} while saving the checkpoint of epoch 2 "
                                            rf"\(update 6\).*last good checkpoint, {run.checkpoint} \(after epoch 1\), "
                                            r"is intact: free space.*--resume"):
        save_checkpoint(StandInAccelerator(), run, state(2), parts())
    assert {p.name: p.read_bytes() for p in run.checkpoint.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # the half-written one is gone
