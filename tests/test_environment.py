"""finetune/model/environment.py: environment.json records the versions, devices, process count, command line
and the working directory's git commit of the process that wrote a run's weights."""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import accelerate
import datasets
import pytest
import timm
import torch

import finetune
from finetune.model import environment


def test_environment_json_has_versions_devices_processes_and_command(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    environment.save_environment(tmp_path, torch.device("cpu"))
    record = json.loads((tmp_path / environment.ENVIRONMENT_NAME).read_text())
    assert record["python"] == platform.python_version()
    versions = record["versions"]
    assert versions["torch"] == torch.__version__ and versions["timm"] == timm.__version__
    assert [versions[name] for name in ("finetune", "accelerate", "datasets")] == [
        finetune.__version__, accelerate.__version__, datasets.__version__]
    assert record["training_device"] == "cpu" and record["processes"] == 1
    assert record["devices"]["cpu_count"] >= 1 and isinstance(record["devices"]["gpus"], list)
    assert record["argv"] == sys.argv and shlex.split(record["command_line"])[1:] == sys.argv[1:]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_environment_json_records_the_working_directorys_commit(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    commit = commit_a_recipe(project)
    monkeypatch.chdir(project)
    environment.describe_environment.cache_clear()  # read once per process: read it again in `project`
    try:
        environment.save_environment(tmp_path, torch.device("cpu"))
    finally:
        environment.describe_environment.cache_clear()
    record = json.loads((tmp_path / environment.ENVIRONMENT_NAME).read_text())
    assert record["git"] == {"commit": commit, "dirty": False} and record["working_directory"] == str(project.resolve())


def test_the_command_line_reads_as_typed():
    typed = environment.command_line
    assert typed(["/venv/bin/finetune", "train", "my recipe.yaml"]) == "finetune train 'my recipe.yaml'"
    assert typed(["/src/finetune/__main__.py", "train", "r.yaml"]) == "python -m finetune train r.yaml"
    assert typed(["train.py", "--lr", "1"]) == "train.py --lr 1"


def test_the_launchers_world_size_is_the_process_count(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert environment.process_count() == 4


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_of_the_working_directory_and_whether_it_had_changes(tmp_path):
    commit = commit_a_recipe(tmp_path)
    assert environment.git_state(tmp_path) == {"commit": commit, "dirty": False}
    (tmp_path / "recipe.yaml").write_text("model: {backbone: resnet50}\n")
    assert environment.git_state(tmp_path) == {"commit": commit, "dirty": True}


def commit_a_recipe(folder: Path) -> str:
    """A new git repository in `folder` with recipe.yaml committed; returns the commit."""
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (folder / "recipe.yaml").write_text("model: {backbone: resnet18}\n")
    git("add", "recipe.yaml")
    git("commit", "-q", "-m", "recipe")
    return git("rev-parse", "HEAD")


def test_no_git_state_outside_a_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # do not find a repository above tmp
    assert environment.git_state(tmp_path) is None
