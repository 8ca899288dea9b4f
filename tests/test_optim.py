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


# ----------------------------------------------------------------------------------------------------
# timm's optimizers by name


@pytest.mark.parametrize("name", ["lamb", "lion", "adafactor"])
def test_a_timm_optimizer_keeps_every_groups_explicit_lr_and_weight_decay(name):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    optim = OptimConfig(name=name, lr=1e-3, head_lr_mult=10.0, weight_decay=0.02, layer_decay=0.8)
    plan = build_plan(model, optim, FreezeConfig(backbone=False))
    optimizer = build_optimizer(optim, plan.optimizer_groups(model))
    assert type(optimizer).__module__.startswith("timm.optim")
    built = {g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups}
    assert built == {g.name: (g.lr, g.weight_decay, g.tensors) for g in plan.groups if g.trainable}
    assert len({lr for lr, _, _ in built.values()}) > 2  # layer decay: many distinct explicit LRs survived
    set_lr(optimizer, 0.5)
    assert all(g["lr"] == pytest.approx(0.5 * g["peak_lr"]) for g in optimizer.param_groups)


def test_a_timm_optimizer_is_checked_before_every_step():
    """timm's optimizers cannot skip a bad update on the device (no found_inf): Health reads the health
    before each step instead of every FAULT_CHECK_UPDATES updates."""
    from types import SimpleNamespace

    from finetune.training.faults import FAULT_CHECK_UPDATES, Health

    accelerator = SimpleNamespace(device=torch.device("cpu"), scaler=None)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    for name, every in (("adamw", FAULT_CHECK_UPDATES), ("lamb", 1)):
        optim = OptimConfig(name=name, lr=1e-3, weight_decay=0.01)
        optimizer = build_optimizer(optim, build_plan(model, optim, FreezeConfig()).optimizer_groups(model))
        assert Health(accelerator, optimizer).every == every, name


def test_a_timm_optimizer_timm_cannot_build_here_is_a_finetune_error():
    from finetune.errors import FinetuneError

    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    optim = OptimConfig(name="bnbadamw8bit", lr=1e-3, weight_decay=0.01)
    groups = build_plan(model, optim, FreezeConfig()).optimizer_groups(model)
    if torch.cuda.is_available():
        pytest.skip("bitsandbytes may build here")
    with pytest.raises(FinetuneError, match="optim.name=bnbadamw8bit: timm could not create it"):
        build_optimizer(optim, groups)


def test_lamb_trains_a_run_with_the_plans_groups_intact(tmp_path, tiny_recipe, monkeypatch):
    """The acceptance check: a run with timm's lamb keeps every group's explicit lr and weight decay in
    optimizer.param_groups, plan.json lists them, and the LRs logged keep the head's 10x."""
    import json

    import finetune
    from finetune.training import session

    built = []

    def spy(cfg, groups):
        built.append(build_optimizer(cfg, groups))
        return built[-1]

    monkeypatch.setattr(session, "build_optimizer", spy)
    recipe = tiny_recipe(**{"optim.name": "lamb", "optim.lr": 2e-3, "optim.weight_decay": 0.01,
                            "train.epochs": 1, "train.hard_examples": 0})
    result = finetune.train(recipe, output=tmp_path / "run")
    plan = {g["name"]: g for g in json.loads((tmp_path / "run" / "plan.json").read_text())}
    assert plan["head"]["lr"] == pytest.approx(2e-2) and plan["backbone"]["lr"] == pytest.approx(2e-3)
    assert plan["backbone"]["weight_decay"] == 0.01 and plan["backbone.no_decay"]["weight_decay"] == 0.0
    optimizer = built[-1]
    assert type(optimizer).__name__ == "Lamb"
    for group in optimizer.param_groups:
        assert (group["peak_lr"], group["weight_decay"]) == (plan[group["name"]]["lr"],
                                                             plan[group["name"]]["weight_decay"])
    lrs = result.metrics[-1]["lr"]
    assert lrs["head"] / lrs["backbone"] == pytest.approx(10.0)
    assert "optim:\n  name: lamb" in (tmp_path / "run" / "recipe.yaml").read_text().replace("'", "")


def test_a_run_with_a_timm_optimizer_resumes_its_state(tmp_path, tiny_recipe, train_until_epoch_one):
    """Lion's momentum is checkpointed and restored: the resumed run ends where an uninterrupted one does."""
    import finetune

    recipe = tiny_recipe(**{"optim.name": "lion", "train.hard_examples": 0, "train.ema": None})
    whole = finetune.train(recipe, output=tmp_path / "whole")
    train_until_epoch_one(recipe, tmp_path / "cut")
    resumed = finetune.train(resume=tmp_path / "cut")
    assert [r["train_loss"] for r in resumed.metrics] == pytest.approx([r["train_loss"] for r in whole.metrics],
                                                                       abs=1e-5)
    assert resumed.metrics[-1]["val_loss"] == pytest.approx(whole.metrics[-1]["val_loss"], abs=1e-5)
