"""finetune/data/balance.py: inverse-frequency loss weights and the balanced sampler (also sharded over
processes), down to short runs with each that log balanced metrics and write hard examples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import finetune
from finetune.data.sampling import BalancedSampler, EpochShuffle, inverse_frequency_weights


@pytest.mark.parametrize("images, per_device, accumulation", [(21, 4, 1), (21, 2, 2), (5, 4, 1)])
def test_every_image_is_drawn_each_epoch_on_two_processes_in_whole_updates(images, per_device, accumulation):
    """An epoch of EpochShuffle through Accelerate's sharding on two processes: together they see every
    image (the remainder is not left out), each the same number of micro-batches (no process waits), and
    every update the same number of images."""
    from accelerate.data_loader import prepare_data_loader

    from finetune.training.batching import derive_batching

    batching = derive_batching(2 * per_device * accumulation, per_device, 2, images)
    shards = []
    for process in range(2):
        loader = DataLoader(list(range(images)), batch_size=batching.per_device,
                            sampler=EpochShuffle(images, batching.images_per_epoch, seed=3))
        prepared = prepare_data_loader(loader, torch.device("cpu"), num_processes=2, process_index=process,
                                       put_on_device=False, use_seedable_sampler=True)
        prepared.set_epoch(2)
        shards.append([batch.tolist() for batch in prepared])
    assert len(shards[0]) == len(shards[1]) == batching.updates_per_epoch * batching.accumulation
    assert all(len(batch) == per_device for shard in shards for batch in shard)
    drawn = [i for shard in shards for batch in shard for i in batch]
    assert set(drawn) == set(range(images)) and len(drawn) == batching.images_per_epoch


def test_epoch_shuffle_changes_order_by_epoch_and_repeats_only_to_fill():
    sampler = EpochShuffle(10, 16, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first[:10]) == list(range(10)) and len(set(first[10:])) == 6  # 6 drawn again, no twice-twice
    assert first != second and len(second) == 16


# ----------------------------------------------------------------------------------------------------
# Pure functions


def test_class_weights_are_inverse_frequency():
    targets = [0] * 6 + [1] * 3 + [2] * 1 + [3] * 0
    weights = inverse_frequency_weights(targets, 4)
    assert weights.tolist() == pytest.approx([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1), 0.0])
    # Each present class contributes the same total weight, and the mean weight per sample is 1.
    assert (weights[0] * 6).item() == pytest.approx((weights[2] * 1).item())
    assert weights[torch.tensor(targets)].mean().item() == pytest.approx(1.0)


def test_balanced_sampler_draws_classes_evenly_and_is_seeded_by_epoch():
    targets = [0] * 900 + [1] * 90 + [2] * 10
    sampler = BalancedSampler(targets, seed=3)
    drawn = np.bincount(np.asarray(targets)[list(sampler)], minlength=3)
    assert len(sampler) == 1000 and drawn.sum() == 1000
    assert np.all(np.abs(drawn / 1000 - 1 / 3) < 0.05), drawn
    first = list(sampler)
    assert list(BalancedSampler(targets, seed=3)) == first  # another process, same seed: same draw
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first  # a resumed epoch draws what the interrupted one drew


def test_balanced_sampler_is_sharded_by_accelerate_and_follows_set_epoch():
    """What accelerate's prepare does with our sampler on two processes: each process gets alternate
    batches of the same sequence (the sampler draws identically everywhere), and the prepared loader's
    set_epoch reaches the sampler through the shard."""
    from accelerate.data_loader import prepare_data_loader

    targets = [0] * 30 + [1] * 6
    sampler = BalancedSampler(targets, seed=0)
    sampler.set_epoch(5)
    expected = list(sampler)
    shards = []
    for process in range(2):
        loader = DataLoader(list(range(36)), batch_size=4, sampler=BalancedSampler(targets, seed=0), drop_last=True)
        prepared = prepare_data_loader(loader, torch.device("cpu"), num_processes=2, process_index=process,
                                       put_on_device=False, use_seedable_sampler=True)
        prepared.set_epoch(5)
        shards.append([batch.tolist() for batch in prepared])
    interleaved = [i for pair in zip(*shards) for batch in pair for i in batch]
    # 9 batches of 4: with drop_last each process takes 4, so the processes stay in step.
    assert interleaved == expected[:32] and len(interleaved) == 32


# ----------------------------------------------------------------------------------------------------
# Short runs


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory, make_image_folder) -> Path:
    """a (30 images) and b (6 images).

    A planted mislabeled image does not rank reliably here: test_resnet from random weights barely
    learns in a few CPU epochs, so the hard-example checks are about structure and order."""
    root = tmp_path_factory.mktemp("imbalance")
    data = make_image_folder(root / "data", ["a"], per_class=30, size=16)
    make_image_folder(root / "b_only", ["b"], per_class=6, size=16)
    (root / "b_only" / "b").rename(data / "b")
    return data


@pytest.fixture(scope="module")
def balanced_run(imbalanced, make_recipe, tmp_path_factory):
    data = imbalanced
    run = tmp_path_factory.mktemp("balanced") / "run"
    recipe = make_recipe(data, **{"train.epochs": 3, "train.class_weights": "auto", "data.sampler": "balanced",
                                  "data.image_size": 16, "train.hard_examples": 5, "optim.lr": 3e-3})
    return finetune.train(recipe, output=run), run


def test_run_with_class_weights_and_balanced_sampler_logs_balanced_metrics(balanced_run):
    result, run = balanced_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert 0.0 <= r["val_balanced_acc"] <= 1.0
        assert set(r["val_per_class_acc"]) == {"a", "b"}
    assert result.metrics == records


def test_hard_examples_are_written_sorted_with_given_and_predicted_labels(balanced_run):
    _, run = balanced_run
    report = json.loads((run / "hard_examples.json").read_text())
    assert set(report) == {"about", "train", "val"}
    for split in ("train", "val"):
        entries = report[split]
        assert 0 < len(entries) <= 5
        assert [e["loss"] for e in entries] == sorted((e["loss"] for e in entries), reverse=True)
        for e in entries:
            assert e["split"] == split and e["given"] in {"a", "b"} and e["predicted"] in {"a", "b"}
            assert Path(e["image"]).is_file() and 0 <= e["given_prob"] <= 1
    with Image.open(run / "hard_examples.png") as png:
        assert png.format == "PNG" and png.size[0] > 100


def test_a_short_run_with_class_weights_only(imbalanced, make_recipe, tmp_path):
    recipe = make_recipe(imbalanced, **{"train.epochs": 1, "train.class_weights": "auto", "data.image_size": 16,
                                  "train.hard_examples": 0})
    result = finetune.train(recipe, output=tmp_path / "run")
    assert result.metrics[0]["val_balanced_acc"] is not None
    assert not (tmp_path / "run" / "hard_examples.json").exists()
