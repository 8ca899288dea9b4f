"""finetune/training/session.py: what a run trains with, built once from the recipe, data and machine."""

from __future__ import annotations

import pytest
import torch

from finetune.data.splits import build_splits
from finetune.recipe.load import load_recipe
from finetune.training.inputs import Place
from finetune.training.plugins import Plugins
from finetune.training.session import build_session


def no_prepare(*objects):
    """Accelerate's prepare, in one process on the CPU: everything as it is."""
    return objects


@pytest.fixture
def build(image_folder, tiny_recipe):
    def make(**overrides):
        overrides = {"data.cache": "none", **overrides}  # the PIL pipeline: test_inputs.py covers the others
        config = load_recipe(tiny_recipe(image_folder(classes=3, per_class=10), **overrides))
        splits = build_splits(config.data, config.train.seed)
        return (build_session(config, splits, Place(), "fp32", None, lambda _: None, Plugins(), no_prepare), config,
                splits)
    return make


def test_the_loss_follows_the_recipe(build):
    s, _, _ = build(**{"train.class_weights": "auto", "train.label_smoothing": 0.2})
    assert s.criterion.label_smoothing == 0.2 and torch.allclose(s.criterion.weight, torch.ones(3))  # balanced data
    plain, config, _ = build()
    assert plain.criterion.weight is None and plain.criterion.label_smoothing == config.train.label_smoothing


def test_warmup_never_takes_more_than_a_fifth_of_the_run_and_the_schedule_spans_every_update(build):
    s, config, splits = build(**{"train.warmup_epochs": 50.0, "train.epochs": 5})
    assert s.total_updates == 5 * s.batching.updates_per_epoch and s.warmup_updates == int(0.2 * s.total_updates)
    lrs = [s.schedule(update) for update in range(s.total_updates)]
    peak = s.warmup_updates  # the first update after the warmup
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1])), lrs  # rises through the whole warmup
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:])), lrs  # then decays at every update to the last
    assert lrs[peak] == pytest.approx(1.0, abs=0.02) and 0 < lrs[-1] < 0.05, lrs


def test_the_optimizer_holds_exactly_the_plans_trainable_groups(build):
    s, _, _ = build(**{"freeze.stages": 1})
    in_optimizer = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    planned = {n for g in s.plan.groups if g.trainable for n in g.params}
    assert in_optimizer == {id(p) for n, p in s.model.named_parameters() if n in planned}
    assert [g["lr"] for g in s.optimizer.param_groups] == [g.lr for g in s.plan.groups if g.trainable]


def test_views_use_the_eval_transform_for_validation(build):
    s, _, splits = build(**{"data.hflip": 1.0})
    val = s.val_loader.dataset
    assert val.substitute is False and val.indices == splits.val_indices
    assert torch.equal(val[0][0], s.eval_view(splits.val, splits.val_indices, "val")[0][0])  # deterministic


def test_every_training_image_is_drawn_each_epoch_and_updates_are_whole(build):
    s, _, splits = build(**{"train.batch_size": 7})  # 24 images: 4 updates of 7, 4 images drawn again
    for epoch in (0, 1):
        s.sampler.set_epoch(epoch)
        drawn = list(s.sampler)  # (index, place in the epoch): augmentation is seeded by the place
        assert [place for _, place in drawn] == list(range(28)) and 28 == s.batching.images_per_epoch
        assert {index for index, _ in drawn} == set(range(24))
    assert list(s.sampler) == drawn  # a pure function of (seed, epoch): a resumed epoch draws the same
    s.sampler.start = 8  # a run resumed after 2 updates of 4 images draws the rest, in the same places
    assert list(s.sampler) == drawn[8:]
