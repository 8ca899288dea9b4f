"""finetune/rundir/folder.py: choosing, creating and writing a run directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from finetune import FinetuneError
from finetune.rundir.folder import LOCK_NAME, MARKER_NAME, RunDir


def test_default_run_folders_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("finetune.rundir.folder.time.strftime", lambda fmt: "20250101-120000")
    first = RunDir.for_new_run(None, "test_resnet").path
    assert first == tmp_path / "runs" / "20250101-120000-test_resnet"
    first.mkdir(parents=True)
    second = RunDir.for_new_run(None, "test_resnet").path
    assert second != first and second.parent == first.parent and not second.exists()


def test_default_run_folder_for_hub_backbone_on_collision(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("finetune.rundir.folder.time.strftime", lambda fmt: "20250101-120000")
    first = RunDir.for_new_run(None, "hf-hub:timm/resnet18.a1_in1k").path
    first.mkdir(parents=True)
    second = RunDir.for_new_run(None, "hf-hub:timm/resnet18.a1_in1k").path
    assert second.parent == first.parent == tmp_path / "runs" and second != first


def test_metrics_are_appended_whole_and_trimmed_on_resume(tmp_path):
    run = RunDir(tmp_path)
    for epoch in (1, 2, 3):
        run.append_metrics({"epoch": epoch, "val_acc": epoch / 10})
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3]
    assert [r["epoch"] for r in run.keep_metrics_through(2)] == [1, 2]  # epoch 3 had no checkpoint
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_output_that_is_a_file_or_holds_other_files_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FinetuneError, match="is a file"):
        RunDir.for_new_run(tmp_path / "file", "test_resnet")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FinetuneError, match="already holds files"):
        RunDir.for_new_run(tmp_path / "notes", "test_resnet")
    with pytest.raises(FinetuneError, match="only replaces a previous run directory"):
        RunDir.for_new_run(tmp_path / "notes", "test_resnet", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------
# Issue 14: a run directory is recognisably finetune's, owned by one run at a time, and read back with care


def write_run(path, extra_user_files: bool = False) -> RunDir:
    """A finished run's files as the loop writes them, in a directory claimed as finetune.train does."""
    run = RunDir.for_new_run(path, "test_resnet")
    run.claim()
    run.create()
    run.append_metrics({"epoch": 1})
    for name in ("recipe.yaml", "plan.json", "curves.png", "model.safetensors", "config.json", "data_report.json",
                 "hard_examples.json", "hard_examples.png", "test_metrics.json", ".skipped-0.jsonl"):
        (path / name).write_text("run output")
    for folder in ("checkpoint", "checkpoint.old"):
        (path / folder).mkdir()
        (path / folder / "model.safetensors").write_text("state")
    run.release()
    return run


def test_overwrite_never_touches_a_folder_finetune_did_not_create(tmp_path):
    """Issue 14.1: a project folder with the user's own recipe.yaml is not a previous run."""
    project = tmp_path / "proj"
    (project / "data" / "c0").mkdir(parents=True)
    (project / "data" / "c0" / "0.png").write_bytes(b"an image")
    (project / "notes.txt").write_text("notes")
    (project / "recipe.yaml").write_text("data: {train: data}\n")
    before = sorted(str(p.relative_to(project)) for p in project.rglob("*"))
    with pytest.raises(FinetuneError, match="was not created by finetune"):
        RunDir.for_new_run(project, "test_resnet", overwrite=True).create()
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == before
    assert (project / "notes.txt").read_text() == "notes"


def test_overwrite_removes_only_what_a_run_wrote(tmp_path):
    out = tmp_path / "out"
    first = write_run(out)
    (out / "my_notes.txt").write_text("keep me")
    (out / "analysis").mkdir()
    (out / "analysis" / "plot.py").write_text("keep me too")
    again = RunDir.for_new_run(out, "test_resnet", overwrite=True)
    again.claim()
    again.create()
    try:
        assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, LOCK_NAME, "analysis", "my_notes.txt"]
        assert json.loads((out / MARKER_NAME).read_text())["run_id"] != first.run_id
        assert (out / "analysis" / "plot.py").read_text() == "keep me too"
    finally:
        again.release()
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "analysis", "my_notes.txt"]  # lock gone


def test_the_marker_names_the_run(tmp_path):
    run = write_run(tmp_path / "out")
    marker = json.loads((tmp_path / "out" / MARKER_NAME).read_text())
    assert set(marker) >= {"run_id", "created", "host", "pid", "finetune_version"}
    assert marker["run_id"] == run.run_id and marker["pid"] == os.getpid()


def test_a_second_run_into_one_directory_is_refused_naming_the_first(tmp_path):
    """Issue 14.2: both pass the checks before either writes; the one that claims second is refused."""
    out = tmp_path / "out"
    first, second = RunDir.for_new_run(out, "test_resnet"), RunDir.for_new_run(out, "test_resnet")
    first.claim()  # finetune.train claims before the session is built; the loop's create() writes later
    try:
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(FinetuneError, match=f"in use by another finetune run.*{holder}"):
            second.claim()
        first.create()
        with pytest.raises(FinetuneError, match=f"in use by another finetune run.*{holder}"):
            RunDir.for_new_run(out, "test_resnet", overwrite=True)
        with pytest.raises(FinetuneError, match=f"in use by another finetune run.*{holder}"):
            RunDir.for_resume(out).claim()
    finally:
        first.release()
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME]


def test_default_names_are_claimed_atomically(tmp_path, monkeypatch):
    """Issue 14.2: two runs started in the same second pick the same free name; claiming it is atomic."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("finetune.rundir.folder.time.strftime", lambda fmt: "20250101-120000")
    first, second = RunDir.for_new_run(None, "test_resnet"), RunDir.for_new_run(None, "test_resnet")
    assert first.path == second.path  # neither has written anything yet
    first.claim()
    second.claim()
    try:
        assert first.path.name == "20250101-120000-test_resnet" and second.path.name == "20250101-120000-test_resnet-2"
    finally:
        first.release()
        second.release()
    assert not first.path.exists() and not second.path.exists()  # claimed, never written: removed again


def test_a_lock_left_by_a_dead_process_is_reported_and_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    write_run(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "earlier"}))
    run = RunDir.for_resume(out)
    run.claim()
    try:
        assert f"pid {pid} on {socket.gethostname()}" in capsys.readouterr().out
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        run.release()


def test_a_cut_off_last_metrics_line_is_set_aside_on_resume(tmp_path, capsys):
    """Issue 14.3: a copy cut short, or a disk that filled up, leaves half a line."""
    run = RunDir(tmp_path)
    for epoch in (1, 2):
        run.append_metrics({"epoch": epoch, "val_acc": 0.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "val_a')
    assert [r["epoch"] for r in run.keep_metrics_through(3)] == [1, 2]
    out = capsys.readouterr().out
    assert "metrics.jsonl line 3" in out and "metrics.jsonl.damaged" in out
    assert (tmp_path / "metrics.jsonl.damaged").read_text() == '{"epoch": 3, "val_a\n'
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# Looks at a lock in a tight loop the way `finetune runs` and --resume's pre-check do, until `stop` exists;
# prints how many looks found it held.
PROBER = r'''
import sys
from pathlib import Path
from finetune.atomic import lock_holder
path, stop = Path(sys.argv[1]), Path(sys.argv[2])
print("probing", flush=True)
looks = held = 0
while not stop.exists():
    for _ in range(20):
        held += lock_holder(path) is not None
        looks += 1
print(looks, held, flush=True)
'''
CLAIMS = 300


def _probing(lock, tmp_path) -> tuple[subprocess.Popen, object]:
    stop = tmp_path / "stop-probing"
    proc = subprocess.Popen([sys.executable, "-c", PROBER, str(lock), str(stop)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "probing"

    def finish() -> tuple[int, int]:
        stop.touch()
        looks, held = map(int, proc.communicate(timeout=60)[0].split())
        return looks, held
    return proc, finish


def _left_by_a_kill(lock) -> None:
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 999_999_999, "started": "earlier"}))


@pytest.mark.slow
def test_looking_at_the_lock_never_makes_a_claim_fail(tmp_path):
    """Issue 27.6: a resume claims a killed run's folder while `finetune runs` looks at its lock in a tight
    loop; looking must not take the lock from the claim (it refused 1,139 of 2,000 such claims)."""
    out = tmp_path / "out"
    write_run(out)
    _, finish = _probing(out / LOCK_NAME, tmp_path)
    refused = []
    try:
        for _ in range(CLAIMS):
            _left_by_a_kill(out / LOCK_NAME)
            try:
                run = RunDir.for_resume(out)
                run.claim(log=lambda _: None)
            except FinetuneError as e:
                refused.append(str(e))
            else:
                run.release()
    finally:
        looks, _ = finish()
    assert looks > CLAIMS and refused == [], f"{len(refused)} of {CLAIMS} claims refused: {refused[:1]}"


@pytest.mark.slow
def test_two_looks_at_a_free_lock_never_see_each_other_as_a_run(tmp_path):
    """Issue 27.6: two `finetune runs` (or one and a --resume pre-check) at once: a lock file left by a kill is
    free, whoever else is looking at it."""
    lock = tmp_path / LOCK_NAME
    _left_by_a_kill(lock)
    from finetune.atomic import lock_holder

    _, finish = _probing(lock, tmp_path)
    try:
        mine = sum(lock_holder(lock) is not None for _ in range(20 * CLAIMS))
    finally:
        looks, theirs = finish()
    assert looks > CLAIMS and (mine, theirs) == (0, 0)


def test_a_resume_removes_what_a_kill_left_half_written_and_nothing_else(tmp_path, capsys):
    """Issue 27.6: a kill during an export (or any write) leaves its scratch folder or temporary file; the
    resume, which owns the folder now, removes them. A user's own dot-files stay."""
    out = tmp_path / "out"
    write_run(out)
    (out / ".export.tmp4242").mkdir()
    (out / ".export.tmp4242" / "model.safetensors").write_text("half")
    (out / f".export.tmp{os.getpid()}").mkdir()  # a container's pids repeat: the same number, an ended process
    (out / ".metrics.tmp4242.jsonl").write_text("half")
    kept = [".notes.tmp1.txt", ".export.tmp", "export.tmp12"]  # not what a run writes
    for name in kept:
        (out / name).write_text("mine")
    run = RunDir.for_resume(out)
    run.claim()
    run.release()
    left = {".export.tmp4242", f".export.tmp{os.getpid()}", ".metrics.tmp4242.jsonl"}
    assert not left & {p.name for p in out.iterdir()}
    assert all((out / name).read_text() == "mine" for name in kept)
    assert ".export.tmp4242" in capsys.readouterr().out
