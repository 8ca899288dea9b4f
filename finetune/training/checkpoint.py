"""Checkpoints: the training state after the last finished epoch, or the last update saved inside an epoch
(train.checkpoint_every, a stop signal), and the one before, saved so that a kill at any moment leaves a
complete checkpoint, and checked on `--resume` before anything of them is loaded.

A checkpoint holds safetensors files and JSON, nothing that unpickles: run folders are shared and
downloaded, and unpickling runs whatever code a file names. `model.safetensors` (the trained module),
`ema.safetensors` (the moving average, when on), `optimizer.safetensors`, `scaler.safetensors` (fp16) and
one `rng_<process>.safetensors` per process (parts.py); then
`trainer_state.json` (epochs finished, update, best epoch and whether model or EMA, unfreezing phase; inside
an epoch also its updates so far and their losses), and last `manifest.json`: the size and sha256 of every
file, so that a file cut short or a flipped bit is found on resume instead of training on from garbage. A
checkpoint without a manifest is refused unless the user says `--trust-checkpoint`. Checkpoints of finetune
0.1 were Accelerate's `save_state` (pickled optimizer, RNG and EMA files): those are read with
`torch.load(weights_only=True)`, PyTorch's restricted unpickler, which builds tensors and plain containers
and refuses every other object. Why not Accelerate's `save_state`/`load_state`: its custom objects (the
EMA) are loaded with `weights_only=False`. Why not its rotation (`ProjectConfiguration(
automatic_checkpoint_naming=True, total_limit=...)`): it deletes the oldest checkpoint before it writes the
new one in place, and `load_state()` picks the newest folder whether or not it was finished. Here the new state is written
beside the others and swapped in by renames: `checkpoint/` is the newest, `checkpoint.old/` the
one before, so a kill mid-save or a damaged newest checkpoint still leaves one to resume from.
The accelerator is passed in (typed; only finetune/training imports Accelerate).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from accelerate import Accelerator
from safetensors import SafetensorError

from ..atomic import write_atomic
from ..errors import FinetuneError
from ..recipe.userfiles import read_yaml_file
from ..rundir.folder import STATE_NAME, RunDir, is_launch_main_process
from .parts import read_parts, write_parts
from .session import Session
from .state import TrainState

MANIFEST_NAME = "manifest.json"


def find_checkpoint(run_dir: RunDir) -> Path | None:
    """The newest intact checkpoint of a run: `checkpoint/`, else `checkpoint.old/` (a kill between the
    swap's two renames, or a damaged newest one, said so); None before the first epoch finished. Raises
    FinetuneError when checkpoints exist but none is intact, or one belongs after the recipe's last epoch.
    Every process looks, and finds the same: the errors are printed once."""
    damaged: list[tuple[Path, str]] = []
    for path in (run_dir.checkpoint, _sibling(run_dir, ".old")):
        if not path.is_dir():
            continue
        if not (path / MANIFEST_NAME).is_file() and not run_dir.trust_checkpoint:
            raise FinetuneError(f"--resume {run_dir.path}: {path} has no {MANIFEST_NAME}, so whether its files are the "
                                "ones finetune wrote cannot be checked (older finetune versions wrote none; a folder "
                                "copied in part, or edited, has none either). Nothing was loaded. If the run is your "
                                "own, resume with `--trust-checkpoint` as well (its files are still read without "
                                "unpickling anything); otherwise start a new run.", raised_on_every_process=True)
        problem, state = inspect_checkpoint(path)
        if problem is not None:
            damaged.append((path, problem))
            continue
        epochs = _recipe_epochs(run_dir)
        if epochs is not None and state.epoch > epochs:
            raise FinetuneError(f"--resume {run_dir.path}: {path} holds the state after epoch {state.epoch} "
                                f"but the run's {run_dir.saved_recipe().name} says train.epochs is {epochs}; it was "
                                f"edited. Restore train.epochs: {state.epoch} or more, or start a new run.",
                                raised_on_every_process=True)
        if damaged:
            (newest, why), = damaged
            run_dir.damaged_checkpoint = newest
            _note(f"note: {newest} is damaged ({why}); resuming from the previous checkpoint, {path} (after epoch "
                  f"{state.epoch}). The damaged one is kept as {_sibling(run_dir, '.damaged').name} when the "
                  "next checkpoint is saved; delete it once you no longer need it.")
        return path
    if not damaged:
        return None
    reasons = "; ".join(f"{path} is damaged: {why}" for path, why in damaged)
    raise FinetuneError(f"--resume {run_dir.path}: no usable checkpoint ({reasons}). Nothing was changed. Copy "
                        "the run directory again if it came from elsewhere; otherwise start over with `finetune train "
                        f"{run_dir.saved_recipe()} --output {run_dir.path} --overwrite` (or a new --output).",
                        raised_on_every_process=True)


def inspect_checkpoint(path: Path) -> tuple[str | None, TrainState | None]:
    """(what is wrong with the checkpoint in `path`, or None; its trainer state). Every file listed in the
    manifest must have the size and checksum it was written with. A checkpoint without a manifest (accepted
    only with --trust-checkpoint): only its trainer state can be checked."""
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
            expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{MANIFEST_NAME} is unreadable", None
        for name, (size, digest) in sorted(expected.items()):
            file = path / name
            if not file.is_file():
                return f"{name} is missing", None
            if file.stat().st_size != size:
                return f"{name}: {file.stat().st_size} bytes, but {size} were written; it was cut off", None
            if _sha256(file) != digest:
                return f"{name}: its checksum does not match the one saved with it (a bit changed)", None
        if STATE_NAME not in expected:
            return f"{MANIFEST_NAME} does not list {STATE_NAME}", None
    elif not (path / STATE_NAME).is_file():
        return f"no {STATE_NAME}: the save never finished", None
    try:
        state = json.loads((path / STATE_NAME).read_text())
    except (OSError, ValueError):
        return f"{STATE_NAME} is not valid JSON", None
    try:
        return None, TrainState.from_json(state)
    except ValueError as e:
        return f"{STATE_NAME}: {e}", None


def load_checkpoint(accelerator: Accelerator, path: Path, phase_at, s: Session) -> TrainState:
    """Restore the session's model, optimizer, EMA (and fp16 scaler) and this process's RNG states from
    `path`; return the trainer state. `phase_at(epoch)` is the plan's phase rule: a checkpoint saved in
    another phase means the recipe was edited. Nothing is unpickled (see the module docstring)."""
    try:
        read_parts(accelerator, path, s)
        state = TrainState.from_json(json.loads((path / STATE_NAME).read_text()))
    except Exception as e:  # noqa: BLE001 - whatever a damaged or hostile file makes torch or safetensors raise
        why = ("its files are as they were written (checksums match), so the recipe or the installed packages "
               "differ from those that saved it, or the checkpoint was not written by finetune"
               if (path / MANIFEST_NAME).is_file() else
               "it has no checksums, so which file is damaged cannot be told")
        raise FinetuneError(f"--resume {path.parent}: the checkpoint {path} cannot be loaded ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); {why}. Nothing in it was run or changed. Rename "
                            "that folder to resume from the checkpoint before it, if there is one, or start a new "
                            "run.", raised_on_every_process=True) from e
    if state.phase != phase_at(state.epoch):
        raise FinetuneError(f"--resume {path.parent}: the checkpoint was saved for unfreezing phase {state.phase} "
                            f"but the recipe puts epoch {state.epoch + 1} in phase {phase_at(state.epoch)}; "
                            "the run's recipe.yaml was edited. Restore it or start a new run.")
    return state


def save_checkpoint(accelerator: Accelerator, run_dir: RunDir, state: TrainState, s: Session) -> None:
    """Write the state beside the last checkpoint, then swap: a kill mid-save keeps the previous one.
    Every process calls this (each writes its own RNG state); the main process does the renames."""
    tmp, old = _sibling(run_dir, ".tmp"), _sibling(run_dir, ".old")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _writing(run_dir, tmp, state):
        write_parts(accelerator, tmp, s)
    accelerator.wait_for_everyone()  # every process has written its own part into tmp
    if accelerator.is_main_process:
        with _writing(run_dir, tmp, state):
            write_atomic(tmp / STATE_NAME, json.dumps(state.to_json()))
            write_atomic(tmp / MANIFEST_NAME, json.dumps({"files": _manifest(tmp)}, indent=1))  # last: complete
        if run_dir.damaged_checkpoint is not None and run_dir.damaged_checkpoint.is_dir():
            # This run resumed from checkpoint.old because checkpoint/ is damaged: keep the good one.
            shutil.rmtree(_sibling(run_dir, ".damaged"), ignore_errors=True)
            os.replace(run_dir.damaged_checkpoint, _sibling(run_dir, ".damaged"))
        elif run_dir.checkpoint.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(run_dir.checkpoint, old)
        run_dir.damaged_checkpoint = None
        os.replace(tmp, run_dir.checkpoint)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def _writing(run_dir: RunDir, tmp: Path, state: TrainState) -> Iterator[None]:
    """A failed write (a full disk, above all) is a user's problem with a way out: the half-written
    checkpoint is removed to give its space back, and the message names the last good one."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(e) or \
            "No space left" in str(e)
        what = f"disk full at {tmp.parent}" if full else f"cannot write to {tmp} ({' '.join(str(e).split())[:200]})"
        last = next((p for p in (run_dir.checkpoint, _sibling(run_dir, ".old")) if (p / STATE_NAME).is_file()), None)
        if last is None:
            kept = "No checkpoint was complete before this one, so the run would start over."
        else:
            kept = (f"The last good checkpoint, {last} (after epoch {_epoch_of(last)}), is intact: "
                    f"{'free space on that disk' if full else 'fix that'}, then continue with `finetune train "
                    f"--resume {run_dir.path}`.")
        epoch = state.epoch + (1 if state.mid_epoch else 0)  # inside an epoch: the one under way
        raise FinetuneError(f"{what} while saving the checkpoint of epoch {epoch} (update {state.update}); nothing "
                            f"of it was kept. {kept}") from e


def _epoch_of(checkpoint: Path) -> str:
    try:
        return str(json.loads((checkpoint / STATE_NAME).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def _recipe_epochs(run_dir: RunDir) -> int | None:
    """train.epochs of the run's saved recipe (read as plain YAML: resume has loaded and checked it already)."""
    try:
        epochs = (read_yaml_file(run_dir.saved_recipe(), "run recipe") or {}).get("train", {}).get("epochs")
    except (FinetuneError, AttributeError):
        return None
    return epochs if type(epochs) is int else None


def _manifest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sibling(run_dir: RunDir, suffix: str) -> Path:
    return run_dir.checkpoint.with_name(run_dir.checkpoint.name + suffix)


def _note(message: str) -> None:
    if is_launch_main_process():  # every process looks for the checkpoint; one says what it found
        print(message)
