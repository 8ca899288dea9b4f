"""finetune/training/launch.py: the launcher's process count checked against Accelerate's, and
`--processes` handed to torchrun."""

from __future__ import annotations

import pytest

import finetune.training.start as start
from finetune import FinetuneError
from finetune.recipe.load import load_recipe
from finetune.training.launch import (
    check_process_count,
    run_processes,
    without_processes_option,
)


class _OneProcessAccelerator:
    """Stands in for an Accelerate that was configured for fewer processes than the launcher started."""

    num_processes = 1

    def __init__(self, **kwargs):
        pass


def test_launcher_world_size_that_accelerate_does_not_run_is_refused(no_launcher, monkeypatch, image_folder):
    config = load_recipe({"model": {"backbone": "test_vit", "pretrained": False},
                          "data": {"train": str(image_folder())}, "train": {"precision": "fp32"}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(start, "Accelerator", _OneProcessAccelerator)
    with pytest.raises(FinetuneError, match=r"started 2 processes \(WORLD_SIZE\) but Accelerate runs 1.*torchrun"):
        start.build_accelerator(config)


@pytest.fixture
def no_launcher(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "MASTER_ADDR",
                 "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_without_a_launcher_passes(no_launcher):
    check_process_count(1)


def test_mpi_world_size_is_read_like_accelerate_reads_it(no_launcher):
    no_launcher.setenv("PMI_SIZE", "2")
    check_process_count(2)
    with pytest.raises(FinetuneError, match=r"started 2 processes \(PMI_SIZE\) but Accelerate runs 1"):
        check_process_count(1)


def test_accelerate_launch_cpu_with_several_processes_but_one_started_is_refused(no_launcher):
    # what `accelerate launch --cpu --num_processes 2 -m finetune train ...` leaves in the environment
    no_launcher.setenv("ACCELERATE_USE_CPU", "True")
    no_launcher.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(FinetuneError, match=r"started only this one.*torchrun --nproc_per_node N"):
        check_process_count(1)


def test_processes_option_is_removed_from_what_torchrun_runs():
    argv = ["train", "r.yaml", "--processes", "2", "optim.lr=1e-3", "--processes=4", "--output", "o"]
    assert without_processes_option(argv) == ["train", "r.yaml", "optim.lr=1e-3", "--output", "o"]


def test_processes_option_under_a_launcher_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FinetuneError, match="already started by a launcher"):
        run_processes(2, ["train", "r.yaml"])
