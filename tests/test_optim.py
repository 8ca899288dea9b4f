"""finetune/optim.py: the optimizer over the plan's groups, and the schedule as a multiplier on each group's LR."""

from __future__ import annotations

import pytest
import timm
import torch

from finetune.model.groups import build_plan
from finetune.model.optim import build_optimizer, lr_multiplier, set_lr
from finetune.recipe.schema import FreezeConfig, OptimConfig

TOTAL, WARMUP = 100, 10


def schedule(total: int = TOTAL, warmup: int = WARMUP) -> list[float]:
    return [lr_multiplier(u, total, warmup) for u in range(total)]


def test_warmup_increases_strictly_from_near_zero():
    values = schedule()[:WARMUP + 1]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert 0 < values[0] <= 1 / WARMUP


def test_peak_is_one_right_after_warmup():
    values = schedule()
    assert max(values) == values[WARMUP]
    assert values[WARMUP] == pytest.approx(1.0, abs=1e-3)
    assert all(v <= 1.0 for v in values)


def test_cosine_decreases_to_near_zero_at_the_last_update():
    values = schedule()[WARMUP:]
    assert all(b < a for a, b in zip(values, values[1:]))
    assert values[len(values) // 2] == pytest.approx(0.5, abs=0.05)  # cosine: half way down at half way
    assert 0 < values[-1] < 1e-3


def test_no_warmup_starts_at_the_peak():
    values = schedule(total=50, warmup=0)
    assert values[0] == pytest.approx(1.0, abs=1e-2)
    assert all(b < a for a, b in zip(values, values[1:]))


def test_schedule_is_a_pure_function_of_the_update():
    """A resumed run asks for update k without having computed 0..k-1: no hidden state may matter."""
    backwards = [lr_multiplier(u, TOTAL, WARMUP) for u in reversed(range(TOTAL))][::-1]
    assert backwards == schedule()


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_group_lr_ratio_survives_the_schedule(name):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    optim = OptimConfig(name=name, lr=1e-3, head_lr_mult=10.0, weight_decay=1e-4)
    plan = build_plan(model, optim, FreezeConfig(backbone=False))
    optimizer = build_optimizer(optim, plan.optimizer_groups(model))
    assert isinstance(optimizer, torch.optim.AdamW if name == "adamw" else torch.optim.SGD)
    groups = {g["name"]: g for g in optimizer.param_groups}
    for update in (0, WARMUP // 2, WARMUP, TOTAL // 2, TOTAL - 1):
        multiplier = lr_multiplier(update, TOTAL, WARMUP)
        set_lr(optimizer, multiplier)
        assert groups["head"]["lr"] / groups["backbone"]["lr"] == pytest.approx(10.0, rel=1e-12)
        assert groups["backbone"]["lr"] == pytest.approx(1e-3 * multiplier, rel=1e-12)
        assert groups["head.no_decay"]["lr"] == groups["head"]["lr"]
    # the peak itself is never overwritten, so the next multiplier still starts from it
    assert groups["backbone"]["peak_lr"] == 1e-3 and groups["head"]["peak_lr"] == pytest.approx(1e-2, rel=1e-15)


def test_sgd_uses_nesterov_momentum_and_decay_per_group():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    optim = OptimConfig(name="sgd", lr=0.01, head_lr_mult=10.0, weight_decay=1e-4, momentum=0.9)
    plan = build_plan(model, optim, FreezeConfig(backbone=False))
    optimizer = build_optimizer(optim, plan.optimizer_groups(model))
    assert optimizer.defaults["nesterov"] is True and optimizer.defaults["momentum"] == 0.9
    decays = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decays["backbone"] == 1e-4 and decays["backbone.no_decay"] == 0.0
