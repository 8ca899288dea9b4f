"""finetune/batching.py and finetune/launch.py: the global batch split over processes and micro-batches, the
launcher's process count checked against Accelerate's, and `--processes` handed to torchrun."""

from __future__ import annotations

import pytest

import finetune.loop as loop
from finetune import FinetuneError
from finetune.batching import derive_batching
from finetune.config import load_recipe
from finetune.launch import check_process_count, run_processes, without_processes_option


def test_global_batch_is_split_evenly_over_processes():
    b = derive_batching(batch_size=64, micro_batch_size=None, processes=4, train_images=1000)
    assert (b.global_batch, b.processes, b.per_device, b.accumulation) == (64, 4, 16, 1)
    assert b.processes * b.per_device * b.accumulation == b.global_batch


@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_updates_per_epoch_do_not_depend_on_the_process_count(processes):
    # 1000 // 64: the remainder of the shuffled data waits for another epoch's order, on any process count
    assert derive_batching(64, None, processes, 1000).updates_per_epoch == 15


def test_micro_batch_size_caps_the_per_device_batch_and_accumulation_fills_the_rest():
    b = derive_batching(64, micro_batch_size=8, processes=2, train_images=1000)
    assert (b.per_device, b.accumulation) == (8, 4)


def test_micro_batches_are_equal_the_largest_divisor_under_the_cap():
    # a share of 12 with a cap of 5: 4 x 3 (equal micro-batches keep the accumulated mean exact), not 5+5+2
    b = derive_batching(24, micro_batch_size=5, processes=2, train_images=100)
    assert (b.per_device, b.accumulation) == (4, 3)


def test_a_cap_above_the_share_changes_nothing():
    assert derive_batching(32, micro_batch_size=100, processes=2, train_images=100).per_device == 16


def test_batch_that_does_not_divide_over_the_processes_is_refused_with_a_suggestion():
    with pytest.raises(FinetuneError, match=r"batch_size=10 .* 4 processes.*multiple of 4"):
        derive_batching(10, None, 4, 100)


def test_batch_larger_than_the_training_set_is_refused():
    with pytest.raises(FinetuneError, match="larger than the 20 training images"):
        derive_batching(32, None, 1, 20)


def test_describe_names_every_derived_quantity():
    text = derive_batching(64, 8, 2, 1000).describe()
    assert "global batch 64 = 2 process(es) x 8 per device x 4 accumulation step(s)" in text
    assert "15 updates/epoch" in text


# ----------------------------------------------------------------------------------------------------
# The process count


class _OneProcessAccelerator:
    """Stands in for an Accelerate that was configured for fewer processes than the launcher started."""

    num_processes = 1

    def __init__(self, **kwargs):
        pass


def test_launcher_world_size_that_accelerate_does_not_run_is_refused(no_launcher, monkeypatch, image_folder):
    config = load_recipe({"model": {"backbone": "test_vit", "pretrained": False},
                          "data": {"train": str(image_folder())}, "train": {"precision": "fp32"}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(loop, "Accelerator", _OneProcessAccelerator)
    with pytest.raises(FinetuneError, match=r"started 2 processes \(WORLD_SIZE\) but Accelerate runs 1.*torchrun"):
        loop.build_accelerator(config)


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
