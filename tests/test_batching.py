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
    # ceil(1000 / 64): every image once, the last batch topped up with 24 drawn again, on any process count
    b = derive_batching(64, None, processes, 1000)
    assert b.updates_per_epoch == 16 and b.images_per_epoch == 1024


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


def test_batch_larger_than_the_training_set_makes_one_update_per_epoch():
    b = derive_batching(32, None, 1, 20)
    assert (b.updates_per_epoch, b.images_per_epoch) == (1, 32)


@pytest.mark.parametrize("images, processes, expected", [
    (1088, 1, 64), (5000, 8, 64), (500, 1, 32), (245, 1, 16), (40, 1, 8), (3, 1, 8), (40, 3, 9), (245, 16, 16),
])
def test_auto_batch_aims_for_16_updates_per_epoch_between_8_and_64(images, processes, expected):
    b = derive_batching("auto", None, processes, images)
    assert b.global_batch == expected and b.auto and b.global_batch % processes == 0
    assert b.updates_per_epoch >= 16 or b.global_batch <= 9  # 8 is the floor: BatchNorm needs a few images
    assert "auto: the largest of 64, 32, 16, 8" in b.describe()


def test_describe_names_every_derived_quantity():
    text = derive_batching(64, 8, 2, 1000).describe()
    assert "global batch 64 = 2 process(es) x 8 per device x 4 accumulation step(s)" in text
    assert "16 updates/epoch, the last topped up with 24 image(s) drawn again" in text


# ----------------------------------------------------------------------------------------------------
# A batch larger than the training set: refused when the data is read, before anything is written


def test_a_batch_above_the_training_images_is_refused_with_the_count_and_what_to_set():
    from finetune.training.batching import batch_size_problem

    assert batch_size_problem(16, 16) is None and batch_size_problem("auto", 3) is None
    problem = batch_size_problem(4096, 6)
    assert "train.batch_size=4096" in problem and "6 training images" in problem
    assert "train.batch_size=6" in problem and "\n" not in problem


def test_train_and_lr_find_refuse_it_before_writing_anything(tmp_path, image_folder, tiny_recipe, capsys):
    import finetune
    from finetune import cli

    recipe = tiny_recipe(image_folder(classes=2, per_class=4), **{"train.batch_size": 4096})  # 6 train, 2 val
    for call in (lambda: finetune.train(recipe, output=tmp_path / "run"),
                 lambda: finetune.lr_find(recipe, output=tmp_path / "lrf")):
        with pytest.raises(FinetuneError, match=r"train.batch_size=4096 is more than the 6 training images"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    (tmp_path / "r.yaml").write_text(__import__("yaml").safe_dump(recipe))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "train.batch_size=6" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "r.yaml"]


def test_check_data_says_the_batch_cannot_train(tmp_path, image_folder, tiny_recipe):
    import finetune

    report = finetune.check_data(tiny_recipe(image_folder(classes=2, per_class=4), **{"train.batch_size": 4096}))
    assert not report["trainable"] and any("6 training images" in e for e in report["errors"])
