"""finetune/training/batching.py: the global batch split over processes and micro-batches."""

from __future__ import annotations

import pytest

from finetune import FinetuneError
from finetune.training.batching import derive_batching


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
