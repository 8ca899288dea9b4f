"""finetune/training/interrupt.py: checkpoints inside an epoch (train.checkpoint_every) and the graceful stop
on SIGTERM/SIGINT. A run killed with SIGKILL at any update, or stopped by a signal (also under torchrun),
resumes to the same final weights as a run that was never interrupted, repeating at most checkpoint_every
updates of work."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import launcher_env, torchrun
from safetensors.torch import load_file

import finetune
from finetune.training.interrupt import CHECKPOINT, NOTHING, STOP, Pauses

# A training process that obeys two test seams before update `--at` (the updates done so far) begins:
# `--kill` dies there by SIGKILL; `--term` sends SIGTERM, to itself or (`--parent`) to its launcher; under
# torchrun, process `--rank` (default 0) does it.
DRIVER = r'''
import argparse, os, signal, time
from pathlib import Path
from finetune import cli
from finetune.training import step

p = argparse.ArgumentParser()
p.add_argument("recipe"); p.add_argument("output"); p.add_argument("--at", type=int, default=-1)
p.add_argument("--kill", action="store_true"); p.add_argument("--term", action="store_true")
p.add_argument("--parent", action="store_true"); p.add_argument("--mark"); p.add_argument("--rank", default="0")
args = p.parse_args()
original = step.set_lr


def set_lr(optimizer, multiplier, epoch, update, *rest):
    if update == args.at and os.environ.get("RANK", "0") == args.rank:
        if args.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.term:
            args.at = -1  # once
            if args.mark:
                Path(args.mark).write_text(str(time.time()))
            os.kill(os.getppid() if args.parent else os.getpid(), signal.SIGTERM)
    return original(optimizer, multiplier, epoch, update, *rest)


step.set_lr = set_lr
cli.main(["train", args.recipe, "--output", args.output, "--resume", "auto"])  # as a requeued job runs it
'''

EPOCHS, PER_EPOCH, EVERY = 3, 6, 3  # 24 train images, batch 4: 18 updates, a checkpoint every 3
KILLS = {0: 6, 2: 4}  # per loader setting, 10 in all; each is a process launch (5-10 s)


def test_requests_and_when_a_checkpoint_is_due():
    counted = Pauses(EVERY, is_main_process=True)
    assert [u for u in range(1, 10) if counted.read_due(u)] == [3, 6, 9]
    assert counted.checkpoint_due(3, epoch_ended=False) and not counted.checkpoint_due(4, epoch_ended=False)
    assert not counted.checkpoint_due(6, epoch_ended=True)  # the epoch's own checkpoint follows
    clock = Pauses("1s", is_main_process=True)
    other = Pauses("1s", is_main_process=False)
    assert clock.request() == other.request() == NOTHING
    clock.last_save = other.last_save = time.monotonic() - 2
    assert clock.request() == CHECKPOINT and other.request() == NOTHING  # one clock decides: the main process's
    clock.agree(CHECKPOINT)
    assert clock.checkpoint_due(5, epoch_ended=False)
    clock.saved()
    assert clock.request() == NOTHING and not clock.checkpoint_due(5, epoch_ended=False)
    assert not Pauses(None, True).checkpoint_due(500, epoch_ended=False)


def test_a_second_signal_counts_only_after_a_relay_window_and_the_handlers_come_back():
    pauses = Pauses(None, is_main_process=False)
    before = signal.getsignal(signal.SIGTERM)
    with pauses.catching_signals():
        assert signal.getsignal(signal.SIGTERM) == pauses._on_signal
        pauses._on_signal(signal.SIGTERM, None)
        pauses._on_signal(signal.SIGINT, None)  # torchrun passing the terminal's Ctrl-C on: the same stop
        assert pauses.request() == STOP and pauses.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.slow
def test_a_second_signal_later_stops_the_process_at_once(tmp_path):
    code = ("import os, signal, time\nfrom finetune.training.interrupt import Pauses\n"
            "p = Pauses(None, True)\nwith p.catching_signals():\n    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(1.5)\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(5)\nprint('survived')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM and "survived" not in proc.stdout
    assert "SIGTERM received: finishing this update" in proc.stderr


def _recipe(image_folder, tmp_path, workers: int, **extra) -> Path:
    recipe = {"model": {"backbone": "test_resnet", "pretrained": False},
              "data": {"train": str(image_folder(classes=3, per_class=10)), "image_size": 32, "num_workers": workers},
              "train": {"epochs": EPOCHS, "batch_size": 4, "hard_examples": 0, "precision": "fp32",
                        "checkpoint_every": EVERY, **extra}}
    path = tmp_path / f"recipe{workers}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _launch(tmp_path, *args, timeout=300) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(driver), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_kill_9_at_random_updates_resumes_to_the_same_weights(tmp_path, image_folder, workers):
    """One run killed by SIGKILL at random updates (each resume killed again at the next; 6 without loader
    workers, 4 with 2, 10 in all) ends with the uninterrupted run's weights, and no resume repeats more than
    checkpoint_every updates."""
    recipe = _recipe(image_folder, tmp_path, workers)
    whole = finetune.train(yaml.safe_load(recipe.read_text()), output=tmp_path / "whole")
    run = tmp_path / "killed"
    kills = sorted(random.Random(workers).sample(range(1, EPOCHS * PER_EPOCH), KILLS[workers]))
    for at in kills:
        proc = _launch(tmp_path, recipe, run, "--at", at, "--kill")
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        saved = run / "checkpoint" / "trainer_state.json"
        state = json.loads(saved.read_text()) if saved.is_file() else {"step": 0, "epoch": 0}  # none yet: from 0
        assert 0 <= at - state["step"] <= EVERY, (at, state)  # the work a resume repeats
        assert state.get("epoch_updates", 0) == state["step"] - PER_EPOCH * state["epoch"]
    proc = _launch(tmp_path, recipe, run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _max_diff(_final_weights(run), _final_weights(Path(whole.run_dir))) <= 1e-6
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert [m["val_acc"] for m in metrics] == [m["val_acc"] for m in whole.metrics]
    assert [m["train_loss"] for m in metrics] == pytest.approx([m["train_loss"] for m in whole.metrics], abs=1e-6)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_of_the_update_and_exits_with_the_signal(tmp_path, image_folder):
    recipe = _recipe(image_folder, tmp_path, 0, checkpoint_every=None)
    whole = finetune.train(yaml.safe_load(recipe.read_text()), output=tmp_path / "whole")
    run = tmp_path / "stopped"
    proc = _launch(tmp_path, recipe, run, "--at", 8, "--term")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "finetune: stopped by SIGTERM in epoch 2, after update 3 of 6" in proc.stderr  # that update finished
    assert f"finetune train --resume {run}" in proc.stderr.replace("\n", " ")
    assert "Traceback" not in proc.stderr
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert (state["epoch"], state["epoch_updates"], state["step"]) == (1, 3, 9)
    proc = _launch(tmp_path, recipe, run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "and 3 of the 6 updates of epoch 2" in proc.stdout
    assert _max_diff(_final_weights(run), _final_weights(Path(whole.run_dir))) <= 1e-6


def _torchrun(tmp_path, *args, timeout=300) -> subprocess.CompletedProcess:

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return torchrun(driver, *args, cwd=tmp_path, env={**launcher_env(tmp_path), "TQDM_DISABLE": "1"}, timeout=timeout)


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_both_processes_after_one_checkpoint(tmp_path, image_folder):
    """SIGTERM to torchrun (as a scheduler sends it; torchrun passes it on), or to one of its processes
    alone: both processes write one checkpoint together and exit within 30 s; the resumed run ends with
    the uninterrupted run's weights."""
    recipe = _recipe(image_folder, tmp_path, 0, checkpoint_every=None, batch_size=8)
    whole = _torchrun(tmp_path, recipe, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    for name, target in (("torchrun", ["--parent"]), ("process1", ["--rank", "1"])):
        run, mark = tmp_path / name, tmp_path / f"{name}.signalled"
        proc = _torchrun(tmp_path, recipe, run, "--at", 4, "--term", "--mark", mark, *target)
        ended = time.time()
        assert proc.returncode != 0 and ended - float(mark.read_text()) < 30, (name, proc.stderr[-3000:])
        assert "stopped by SIGTERM" in proc.stderr or "stopped by a signal to another process" in proc.stderr, name
        state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
        assert 4 < state["step"] < 9, (name, state)  # after the update that was running (3 an epoch), before the end
        resumed = _torchrun(tmp_path, recipe, run)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert _max_diff(_final_weights(run), _final_weights(tmp_path / "whole")) <= 1e-6, name


@pytest.mark.slow
def test_sigterm_at_the_last_update_stops_after_the_last_checkpoint_and_the_resume_only_scores(tmp_path, image_folder):
    """Issue 27.6: the signal said "stopping", so the run stops (it used to score and exit 0): after the last
    epoch's checkpoint and export, with the signal's exit code; the resume trains nothing and scores."""
    recipe = _recipe(image_folder, tmp_path, 0, checkpoint_every=None)
    run = tmp_path / "stopped"
    proc = _launch(tmp_path, recipe, run, "--at", EPOCHS * PER_EPOCH - 1, "--term")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    said = proc.stderr.replace("\n", " ")
    assert "finetune: stopped by SIGTERM after epoch 3, the last" in said and "finetune: error" not in said
    assert f"finetune train --resume {run}" in said and "Traceback" not in said
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["epoch"] == EPOCHS
    assert (run / "model.safetensors").is_file() and not (run / "val_report.json").exists()  # not scored
    assert (run / "README.md").is_file()  # the model card, written with the export
    proc = _launch(tmp_path, recipe, run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: best val acc" in proc.stdout and (run / "val_report.json").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == EPOCHS  # no epoch trained again


# Sends SIGINT (Ctrl-C) to itself when `finetune train ARGS...` reaches one of three points outside the
# training updates: reading the data (before the run claims its folder), building the session (claimed,
# nothing written yet), scoring after training.
SETUP_DRIVER = r'''
import os, signal, sys
from finetune import api, cli
from finetune.tasks import single_label
from finetune.training import loop, start

module, name = {"data": (api, "build_splits"), "session": (start, "build_session"),
                "scoring": (single_label, "score_after_training")}[sys.argv[1]]
original = getattr(module, name)


def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return original(*args, **kwargs)


setattr(module, name, interrupted)
cli.main(["train", *sys.argv[2:]])
'''


def _interrupt_at(tmp_path, where: str, *args) -> subprocess.CompletedProcess:
    driver = tmp_path / "setup_driver.py"
    driver.write_text(SETUP_DRIVER)
    return subprocess.run([sys.executable, str(driver), where, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TQDM_DISABLE": "1"}, cwd=tmp_path)


@pytest.mark.slow
def test_ctrl_c_during_set_up_says_nothing_was_written_and_to_run_the_command_again(tmp_path, image_folder):
    """Issue 27.6: it used to suggest `--resume` for a folder that was never created."""
    recipe = _recipe(image_folder, tmp_path, 0)
    for where in ("data", "session"):
        run = tmp_path / f"run-{where}"
        proc = _interrupt_at(tmp_path, where, recipe, "--output", run)
        said = proc.stderr.replace("\n", " ")
        assert proc.returncode == 128 + signal.SIGINT, (where, proc.stderr[-2000:])
        assert "finetune: stopped by SIGINT" in said and "nothing was written" in said, (where, said[-1000:])
        assert "run the same command again" in said and "--resume" not in said and "Traceback" not in said, where
        assert not run.exists(), where


@pytest.mark.slow
def test_ctrl_c_while_scoring_names_the_run_to_resume(tmp_path, image_folder):
    recipe = _recipe(image_folder, tmp_path, 0, epochs=1, checkpoint_every=None)
    run = tmp_path / "run"
    proc = _interrupt_at(tmp_path, "scoring", recipe, "--output", run)
    said = proc.stderr.replace("\n", " ")
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    assert "finetune: stopped by SIGINT" in said and f"finetune train --resume {run}" in said
    assert "Traceback" not in said
    assert (run / "checkpoint").is_dir()
