"""finetune/training/rundir.py: choosing, creating and writing a run directory."""

from __future__ import annotations

import json

import pytest

from finetune import FinetuneError
from finetune.training.rundir import RunDir


def test_default_run_folders_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("finetune.training.rundir.time.strftime", lambda fmt: "20250101-120000")
    first = RunDir.for_new_run(None, "test_resnet").path
    assert first == tmp_path / "runs" / "20250101-120000-test_resnet"
    first.mkdir(parents=True)
    second = RunDir.for_new_run(None, "test_resnet").path
    assert second != first and second.parent == first.parent and not second.exists()


def test_default_run_folder_for_hub_backbone_on_collision(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("finetune.training.rundir.time.strftime", lambda fmt: "20250101-120000")
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
