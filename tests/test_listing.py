"""`finetune runs` (rundir/listing.py): a finished, an interrupted and a running run each labelled as such,
their numbers read from the files the runs wrote, sorting, and the CLI's table and JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import finetune
from finetune import cli
from finetune.errors import FinetuneError
from finetune.rundir.folder import CHECKPOINT_NAME, LOCK_NAME, MARKER_NAME
from finetune.rundir.listing import format_runs, runs
from finetune.rundir.records import METRICS_NAME

# Holds a run directory's lock the way a training process does, until its stdin closes.
HOLDER = ("import sys; from finetune.atomic import take_lock; take_lock(sys.argv[1]); print('locked', flush=True); "
          "sys.stdin.read()")


class Stopped(Exception):
    """Stands for a kill right after the first checkpoint."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory, make_image_folder, make_recipe) -> Path:
    """runs/finished (2 of 2 epochs), runs/interrupted (1 of 2, killed after its checkpoint), and
    runs/project/running: a copy of the interrupted one whose lock a live process holds."""
    from finetune import api
    from finetune.data.splits import build_splits
    from finetune.training import loop

    root = tmp_path_factory.mktemp("runs-listing")
    recipe = make_recipe(make_image_folder(root / "data", classes=2, per_class=6, size=32), **{"train.ema": None})
    finetune.train(recipe, output=root / "runs" / "finished")

    def stop(epoch: int) -> None:
        raise Stopped

    config, run_dir = api.resolve_run(recipe, output=root / "runs" / "interrupted")
    with pytest.raises(Stopped):
        loop.train(config, run_dir, build_splits(config.data, config.train.seed), after_checkpoint=stop)
    shutil.copytree(root / "runs" / "interrupted", root / "runs" / "project" / "running")
    return root / "runs"


@pytest.fixture
def lock_held_by_another_process(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder / "project" / "running" / LOCK_NAME)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def by_name(summaries) -> dict:
    return {r.name: r for r in summaries}


def test_finished_interrupted_and_running_runs_are_labelled(folder, lock_held_by_another_process):
    found = by_name(finetune.runs(folder))
    assert set(found) == {"finished", "interrupted", "project/running"}
    assert found["finished"].status == "finished"
    assert found["interrupted"].status == "interrupted"
    assert found["project/running"].status == "running"
    assert found["project/running"].holder["pid"] == lock_held_by_another_process.pid
    assert (found["finished"].epochs_done, found["finished"].epochs_planned) == (2, 2)
    assert (found["interrupted"].epochs_done, found["interrupted"].epochs_planned) == (1, 2)


def test_a_lock_file_left_by_an_ended_process_is_not_running(folder, lock_held_by_another_process):
    lock_held_by_another_process.stdin.close()
    lock_held_by_another_process.wait(timeout=30)
    assert (folder / "project" / "running" / LOCK_NAME).is_file()  # take_lock's file stays; nobody holds it
    assert by_name(runs(folder))["project/running"].status == "interrupted"


def test_numbers_come_from_the_runs_files(folder):
    run = by_name(runs(folder))["finished"]
    records = [json.loads(line) for line in (folder / "finished" / METRICS_NAME).read_text().splitlines()]
    assert run.backbone == "test_resnet" and run.data.endswith("data")
    assert run.best_val_acc == max(r["val_acc"] for r in records)
    assert run.final_val_acc == records[-1]["val_acc"]
    assert run.seconds == pytest.approx(sum(r["epoch_seconds"] for r in records), abs=0.1)
    assert run.test_acc is None  # no data.test


def test_a_finished_run_whose_checkpoints_were_deleted_is_still_finished(folder, tmp_path):
    copy = tmp_path / "finished"
    shutil.copytree(folder / "finished", copy, ignore=shutil.ignore_patterns(CHECKPOINT_NAME + "*"))
    (summary,) = runs(copy)  # the folder given may be a run directory itself
    assert (summary.status, summary.epochs_done, summary.name) == ("finished", 2, "finished")


def test_test_accuracy_and_sorting(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "runs")
    (tmp_path / "runs" / "finished" / "test_metrics.json").write_text(json.dumps({"epoch": 2, "test_acc": 0.75}))
    assert by_name(runs(tmp_path / "runs"))["finished"].test_acc == 0.75
    assert [r.name for r in runs(tmp_path / "runs", sort="epochs")][-1] == "finished"
    assert [r.name for r in runs(tmp_path / "runs", sort="test")][0] == "finished"  # highest first, unknown last
    assert [r.name for r in runs(tmp_path / "runs", sort="status")][-1] == "finished"


def test_folders_that_are_not_runs_are_skipped_and_mistakes_are_errors(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "recipe.yaml").write_text("model: {backbone: resnet18}\n")  # a recipe alone is no run
    assert runs(tmp_path) == [] and format_runs([], tmp_path) == f"no runs in {tmp_path}"
    with pytest.raises(FinetuneError, match="not a folder"):
        runs(tmp_path / "missing")
    with pytest.raises(FinetuneError, match="cannot sort by 'accuracy'; choose one of name"):
        runs(tmp_path, sort="accuracy")


def test_cli_prints_a_line_per_run_and_json(folder, capsys):
    cli.main(["runs", str(folder), "--sort", "best"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "backbone", "data", "epochs", "best", "final", "test", "time", "status"]
    assert len(lines) == 4
    row = next(line for line in lines if line.startswith("finished "))
    assert " 2/2 " in row and row.endswith("finished")
    cli.main(["runs", str(folder), "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == ["finished", "interrupted", "project/running"]
    assert {"status", "epochs_done", "epochs_planned", "best_val_acc", "final_val_acc", "test_acc",
            "seconds"} <= set(listed[0])


def test_cli_mistake_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["runs", str(tmp_path / "missing")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("finetune: error: runs: ")


def shared_run(folder: Path, recipe_text: str | None = None) -> Path:
    """A run directory as someone might share it: the marker, and recipe.yaml with `recipe_text`."""
    run = folder / "shared"
    run.mkdir(parents=True)
    (run / MARKER_NAME).write_text("{}")
    if recipe_text is not None:
        (run / "recipe.yaml").write_text(recipe_text)
    return run


def test_a_recipe_yaml_alias_bomb_is_read_as_no_recipe(tmp_path):
    # Expanded, backbone would be 9**6 strings (the probe's 9**9 ended in a MemoryError).
    bomb = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n" for a, b in zip("abcde", "bcdef"))
    shared_run(tmp_path, bomb + "model: {backbone: *f}\ntrain: {epochs: 2}\n")
    (summary,) = runs(tmp_path)
    assert (summary.backbone, summary.epochs_planned, summary.status) == (None, None, "interrupted")
    assert len(format_runs([summary], tmp_path)) < 300


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
@pytest.mark.parametrize("name", ["recipe.yaml", "test_metrics.json", f"{CHECKPOINT_NAME}/trainer_state.json"])
def test_a_fifo_in_a_run_folder_does_not_hang_the_listing(tmp_path, name, within):
    run = shared_run(tmp_path, "model: {backbone: test_resnet}\n" if name != "recipe.yaml" else None)
    (run / name).parent.mkdir(exist_ok=True)
    os.mkfifo(run / name)
    assert [r.name for r in within(20, lambda: runs(tmp_path), run / name)] == ["shared"]
