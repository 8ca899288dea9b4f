"""Several processes on CPU (torchrun, gloo): the same recipe trains the same model as one process, one run
directory is written once, the schedule ends at the last update, and a fault on one process stops both.

Each launch costs about 10 s of process start and imports, so the runs are module-scoped and shared: one
process, one process with accumulation, two processes under plain torchrun, two with planted faults, and
`finetune train --processes 2`. The data augmentation is off (full-image crop, no flip, no jitter) and the
model is test_vit (LayerNorm, no dropout), so one and two processes see the same images per update and
must compute the same thing up to float rounding.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import launcher_env, torchrun
from safetensors.torch import load_file, save_file

from finetune.model.optim import lr_multiplier

EPOCHS, BATCH = 2, 8
TRAIN_IMAGES, VAL_IMAGES = 36, 9  # 3 classes x 15, 20% held out; 9 val images do not split over 2 processes
PER_EPOCH = -(-TRAIN_IMAGES // BATCH)  # every image each epoch: the last batch is topped up
UPDATES = EPOCHS * PER_EPOCH
TOLERANCE = 1e-4  # max abs difference between the weights trained on 1 and on 2 processes

# About 100 s of launches in all: the slow tier, which plain `python -m pytest` leaves out and the README's
# test command (`-m ""`) runs.
pytestmark = pytest.mark.slow


def finetune_cli(*args, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def max_abs_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert set(x) == set(y)
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


# ----------------------------------------------------------------------------------------------------
# The shared runs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def env(workdir) -> dict:
    home = workdir / "home"
    home.mkdir()
    return launcher_env(home)


@pytest.fixture(scope="module")
def recipe_file(workdir, make_image_folder, make_recipe) -> Path:
    data = make_image_folder(workdir / "data", classes=3, per_class=15, size=32)
    recipe = make_recipe(data, **{"model.backbone": "test_vit", "train.epochs": EPOCHS, "train.batch_size": BATCH,
                                  "data.scale": [1.0, 1.0], "data.hflip": 0.0, "data.color_jitter": 0.0,
                                  "train.precision": "fp32"})
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def one_process(workdir, recipe_file, env) -> Path:
    proc = finetune_cli("train", recipe_file, "--output", workdir / "one", cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir / "one"


@pytest.fixture(scope="module")
def one_process_accumulating(workdir, recipe_file, env) -> Path:
    proc = finetune_cli("train", recipe_file, f"train.micro_batch_size={BATCH // 2}", "--output",
                        workdir / "one_accumulating", cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"global batch {BATCH} = 1 process(es) x {BATCH // 2} per device x 2 accumulation" in proc.stdout
    return workdir / "one_accumulating"


@pytest.fixture(scope="module")
def two_processes(workdir, recipe_file, env) -> tuple[Path, subprocess.CompletedProcess]:
    """Plain `torchrun --nproc_per_node 2 -m finetune train RECIPE`, no --output: each process picks a
    timestamped default name, and the run must still land in one directory."""
    cwd = workdir / "two_cwd"
    cwd.mkdir()
    proc = torchrun("-m", "finetune", "train", recipe_file, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1, f"expected one run directory, got {runs}"
    return runs[0], proc


# ----------------------------------------------------------------------------------------------------
# Same recipe, same training


def test_torchrun_on_cpu_without_configuration_trains_as_two_processes(two_processes):
    run, proc = two_processes
    # One process group of 2 (not two single-process jobs): each holds half the global batch, the update
    # count is that of one process, and only the main process prints.
    assert "  2 process(es) on cpu in fp32 | " in proc.stdout
    assert f"  global batch {BATCH} = 2 process(es) x {BATCH // 2} per device x 1 accumulation step(s) | " \
           f"{PER_EPOCH} updates/epoch, the last topped up with {PER_EPOCH * BATCH - TRAIN_IMAGES} image(s) drawn " \
           f"again, {UPDATES} total" in proc.stdout
    assert proc.stdout.count("epoch 1/2:") == 1 and proc.stdout.count("done: best val acc") == 1
    assert "1 process(es)" not in proc.stdout


def test_two_processes_write_one_run_once(two_processes, one_process):
    run, _ = two_processes
    assert {p.name for p in run.iterdir()} == {p.name for p in one_process.iterdir()}
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == EPOCHS and len(set(lines)) == EPOCHS
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    # Every process saved its own part of the checkpoint (its random states), the main process the rest.
    saved = {p.name for p in (run / "checkpoint").iterdir()}
    assert {"rng_0.safetensors", "rng_1.safetensors", "model.safetensors", "trainer_state.json"} <= saved


def test_two_processes_train_the_same_model_as_one(two_processes, one_process):
    run, _ = two_processes
    for name in ("model.safetensors", "checkpoint/model.safetensors"):  # the best epoch's export and the last
        assert max_abs_diff(run / name, one_process / name) <= TOLERANCE, name


def test_one_process_accumulating_equals_two_processes(two_processes, one_process_accumulating):
    run, _ = two_processes
    for name in ("model.safetensors", "checkpoint/model.safetensors"):
        assert max_abs_diff(run / name, one_process_accumulating / name) <= TOLERANCE, name
    for two, one in zip(read_metrics(run), read_metrics(one_process_accumulating)):
        assert two["val_acc"] == one["val_acc"]
        assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)


def test_validation_covers_exactly_the_dataset_and_agrees(two_processes, one_process):
    run, _ = two_processes
    two, one = read_metrics(run), read_metrics(one_process)
    assert [r["val_images"] for r in two] == [VAL_IMAGES] * EPOCHS  # no padding duplicates counted
    for a, b in zip(two, one):
        assert (a["epoch"], a["step"], a["val_acc"]) == (b["epoch"], b["step"], b["val_acc"])
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)


def test_schedule_ends_at_the_last_update_on_two_processes(two_processes):
    """The schedule counts optimizer updates, not batches per process: it does not end N times early."""
    run, _ = two_processes
    last = read_metrics(run)[-1]
    assert last["step"] == UPDATES
    warmup = min(PER_EPOCH, int(0.2 * UPDATES))  # train.warmup_epochs 1, at most a fifth of the run
    peak = yaml.safe_load((run / "recipe.yaml").read_text())["optim"]["lr"]
    # metrics.jsonl logs the LR that each epoch's last update used
    assert last["lr"]["backbone"] == pytest.approx(peak * lr_multiplier(UPDATES - 1, UPDATES, warmup), rel=1e-9)


# ----------------------------------------------------------------------------------------------------
# Faults: planted on process 1 by a wrapper that patches the loop, then runs the real CLI under torchrun.

PLANTER = '''
import atexit, dataclasses, json, os, sys, time
from pathlib import Path

import torch

import finetune.data.loaders
import finetune.training.loop as loop
import finetune.training.start as start
import finetune.training.step

finetune.training.step.HOST_DEVICES = ()  # the health read as on GPUs: every 50 updates and at an epoch's end
from finetune.cli import main

fault, at_update, record = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
rank = int(os.environ["RANK"])
seen = {"updates": 0, "init_checksum": None, "epoch_seeds": []}
atexit.register(lambda: (record / f"rank{rank}.json").write_text(json.dumps(seen)))


class PlantedLoss(torch.nn.Module):
    # The session's loss, called once per micro-batch (one per update here: no accumulation).
    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, logits, labels):
        seen["updates"] += 1
        if rank == 1 and seen["updates"] == at_update and fault == "raise":
            seen["fault_time"] = time.time()
            raise RuntimeError("planted fault")
        value = self.loss(logits, labels)
        return value * float("nan") if rank == 1 and seen["updates"] == at_update and fault == "nan" else value


build_session = start.build_session
def planted_build_session(*args, **kwargs):
    session = build_session(*args, **kwargs)
    seen["init_checksum"] = sum(float(p.detach().double().abs().sum()) for p in session.model.parameters())
    return dataclasses.replace(session, criterion=PlantedLoss(session.criterion))
start.build_session = planted_build_session

validate = loop.validate
def planted_validate(*args, **kwargs):
    if rank == 1 and fault == "raise_in_validation":
        seen["fault_time"] = time.time()
        raise RuntimeError("planted fault in validation")
    return validate(*args, **kwargs)
loop.validate = planted_validate

set_epoch_seed = finetune.data.loaders.EpochSeeded.set_epoch_seed
def recorded_set_epoch_seed(self, seed):
    seen["epoch_seeds"].append(seed)
    set_epoch_seed(self, seed)
finetune.data.loaders.EpochSeeded.set_epoch_seed = recorded_set_epoch_seed

main(sys.argv[4:])
'''
FAULT_BATCH = 18  # 2 updates per epoch (36 images): update 3 is in epoch 2, after the checkpoint of epoch 1


def run_with_fault(fault: str, workdir: Path, recipe_file: Path,
                   env: dict) -> tuple[Path, Path, subprocess.CompletedProcess, float]:
    planter = workdir / "planter.py"
    planter.write_text(PLANTER)
    record = workdir / f"record_{fault}"
    record.mkdir()
    run = workdir / f"fault_{fault}"
    started = time.perf_counter()
    proc = torchrun(planter, fault, 3, record, "train", recipe_file, f"train.batch_size={FAULT_BATCH}", "--output", run,
                    cwd=workdir, env=env, timeout=120)
    seconds = time.perf_counter() - started
    (record / "stderr.txt").write_text(proc.stderr)
    return run, record, proc, seconds


@pytest.fixture(scope="module")
def raised(workdir, recipe_file, env):
    return run_with_fault("raise", workdir, recipe_file, env)


@pytest.fixture(scope="module")
def nan_loss(workdir, recipe_file, env):
    return run_with_fault("nan", workdir, recipe_file, env)


def test_exception_on_one_process_stops_every_process_quickly(raised):
    run, record, proc, seconds = raised
    assert proc.returncode != 0
    after_fault = time.time() - json.loads((record / "rank1.json").read_text())["fault_time"]
    print(f"launch with a planted exception: exited after {seconds:.1f} s, {after_fault:.1f} s after the fault")
    assert seconds < 30, f"the launch took {seconds:.1f} s to exit"
    assert after_fault < 15, f"the launch exited {after_fault:.1f} s after the fault"
    assert "RuntimeError: planted fault" in proc.stderr and "[process 1] finetune: update 3 failed" in proc.stderr
    assert "training stopped at update 3: process 1 (of 2) raised an exception" in proc.stderr
    assert proc.stderr.count("finetune: error:") == 1  # the same error on both processes, reported once
    updates = [json.loads((record / f"rank{r}.json").read_text())["updates"] for r in (0, 1)]
    assert updates == [3, 3]


def test_exception_outside_the_update_stops_every_process_through_the_launcher(workdir, recipe_file, env):
    """A process that fails where no loss exchange guards it (here: validation) exits; the launcher stops the
    one waiting in a collective for it, long before any collective timeout."""
    _, record, proc, seconds = run_with_fault("raise_in_validation", workdir, recipe_file, env)
    after_fault = time.time() - json.loads((record / "rank1.json").read_text())["fault_time"]
    assert proc.returncode != 0 and "planted fault in validation" in proc.stderr
    assert seconds < 30 and after_fault < 15, f"exited {after_fault:.1f} s after the fault, {seconds:.1f} s in all"


def test_non_finite_loss_on_one_process_stops_both_at_the_same_update(nan_loss):
    run, record, proc, _ = nan_loss
    assert proc.returncode != 0
    assert "training stopped at update 3: the loss is nan on process 1 (of 2)" in proc.stderr
    assert "nor of the 1 update after it" in proc.stderr  # the health is read at the end of epoch 2
    updates = [json.loads((record / f"rank{r}.json").read_text())["updates"] for r in (0, 1)]
    assert updates == [4, 4]


@pytest.mark.parametrize("fault", ["raised", "nan_loss"])
def test_last_good_checkpoint_is_intact_after_a_fault(fault, request, one_process):
    run, _, proc, _ = request.getfixturevalue(fault)
    assert f"The checkpoint after epoch 1 in {run / 'checkpoint'} is intact" in proc.stderr
    assert not (run / "checkpoint.tmp").exists() and not (run / "checkpoint.old").exists()
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["epoch"] == 1
    assert [r["epoch"] for r in read_metrics(run)] == [1]
    weights = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_resume_after_a_fault_finishes_the_run(nan_loss, workdir, env):
    run, _, _, _ = nan_loss
    proc = finetune_cli("train", "--resume", run, cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]


def test_processes_share_model_init_and_each_epochs_augmentation_seed(nan_loss):
    """One seed per epoch on every process: an image's augmentation depends on its epoch and place in the
    epoch alone (loaders.EpochSeeded), and the processes draw different places, so different crops."""
    _, record, _, _ = nan_loss
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["init_checksum"] == ranks[1]["init_checksum"]
    assert ranks[0]["epoch_seeds"] == ranks[1]["epoch_seeds"] and len(set(ranks[0]["epoch_seeds"])) == 2


# ----------------------------------------------------------------------------------------------------
# The convenience launcher, with a frozen BatchNorm backbone (DDP must not trip over frozen parameters)


def test_processes_option_trains_a_frozen_backbone_on_two_processes(workdir, recipe_file, env):
    """`finetune train --processes 2` on a BatchNorm net whose backbone is frozen: DDP must neither trip over
    the frozen parameters nor let the frozen BatchNorm statistics move."""
    torch.manual_seed(0)
    initial = {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=3).state_dict().items()}
    save_file(initial, str(workdir / "initial.safetensors"))
    run = workdir / "frozen"
    proc = finetune_cli("train", recipe_file, "model.backbone=test_resnet",
                        f"model.pretrained={workdir / 'initial.safetensors'}", "freeze.backbone=true", "freeze.bn=frozen",
                        "train.epochs=1", "data.feature_cache=none",  # the whole model under DDP, not the head alone
                        "--processes", "2", "--output", run, cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout
    assert [r["epoch"] for r in read_metrics(run)] == [1]
    trained = load_file(str(run / "checkpoint" / "model.safetensors"))
    head = {"fc.weight", "fc.bias"}
    assert [k for k in initial if k not in head and not torch.equal(trained[k], initial[k])] == []
    assert not torch.equal(trained["fc.weight"], initial["fc.weight"])


def test_lr_find_on_two_processes_sweeps_the_same_losses_and_writes_once(workdir, recipe_file, env):
    runs = {}
    for processes, launch in ((1, finetune_cli), (2, torchrun)):
        out = workdir / f"lr-find-{processes}"
        args = ("-m", "finetune") if processes == 2 else ()
        # (no --start: torchrun's argument parser takes it for an abbreviation of its own --start-method)
        proc = launch(*args, "lr-find", recipe_file, "--output", out, "--steps", "12", "--end", "1e-2", cwd=workdir,
                      env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.count("train with the override") == 1
        runs[processes] = json.loads((out / "lr_find.json").read_text())
    assert len(runs[2]["losses"]) == 12
    assert runs[2]["losses"] == pytest.approx(runs[1]["losses"], abs=1e-4)
