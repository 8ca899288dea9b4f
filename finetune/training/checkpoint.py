"""Checkpoints: the training state after the last finished epoch, saved so that a kill at any moment
leaves one complete checkpoint, and found again on `--resume`.

Accelerate's `save_state` writes the model, optimizer and every process's RNG states; `trainer_state.json`
(epoch, update, best epoch, unfreezing phase) is written last, so its presence marks a complete
checkpoint. Why not Accelerate's own rotation (`ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=...)`): it deletes the oldest checkpoint before it writes the new one in place, and
`load_state()` picks the newest folder whether or not it was finished. Here the new state is written
beside the last one and swapped in by renames, so the previous checkpoint survives a kill mid-save.
The accelerator is passed in: only the loop imports Accelerate.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..atomic import write_atomic
from ..errors import FinetuneError
from .rundir import RunDir

STATE_NAME = "trainer_state.json"


def find_checkpoint(run_dir: RunDir) -> Path | None:
    """The complete checkpoint of a run: `checkpoint/`, or `checkpoint.old/` when a kill interrupted the
    swap between the two renames; None before the first epoch finished."""
    for path in (run_dir.checkpoint, run_dir.checkpoint.with_name(run_dir.checkpoint.name + ".old")):
        if (path / STATE_NAME).is_file():
            return path
    return None


def load_checkpoint(accelerator, path: Path, phase_at) -> dict:
    """Restore model, optimizer and RNG states from `path`; return the trainer state. `phase_at(epoch)` is
    the plan's phase rule: a checkpoint saved in another phase means the recipe was edited."""
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_NAME).read_text())
    if state.get("phase", 1) != phase_at(state["epoch"]):
        raise FinetuneError(f"--resume {path.parent}: the checkpoint was saved for unfreezing phase {state['phase']} "
                            f"but the recipe puts epoch {state['epoch'] + 1} in phase {phase_at(state['epoch'])}; "
                            "the run's recipe.yaml was edited. Restore it or start a new run.")
    return state


def save_checkpoint(accelerator, run_dir: RunDir, state: dict) -> None:
    """Write the state beside the last checkpoint, then swap: a kill mid-save keeps the previous one.
    Every process calls this (each writes its own RNG state); the main process does the renames."""
    tmp = run_dir.checkpoint.with_name(run_dir.checkpoint.name + ".tmp")
    old = run_dir.checkpoint.with_name(run_dir.checkpoint.name + ".old")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its own part into tmp
    if accelerator.is_main_process:
        write_atomic(tmp / STATE_NAME, json.dumps(state))
        if run_dir.checkpoint.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(run_dir.checkpoint, old)
        os.replace(tmp, run_dir.checkpoint)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
