"""finetune/groups.py: the parameter-group plan (head LR ratio, freezing, no-decay rules, coverage)."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from torch import nn

from finetune.config import FreezeConfig, OptimConfig
from finetune.groups import NORM_TYPES, ParamGroup, Plan, build_plan, check_coverage

BACKBONES = ["test_resnet", "test_vit", "test_efficientnet"]
OPTIM = OptimConfig(name="adamw", lr=2e-4, head_lr_mult=10.0, weight_decay=0.05)


@pytest.fixture(scope="module", params=BACKBONES)
def model(request) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(request.param, pretrained=False, num_classes=4)


def head_names(model: nn.Module) -> set[str]:
    ids = {id(p) for p in model.get_classifier().parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def group_of(plan: Plan) -> dict[str, ParamGroup]:
    return {n: g for g in plan.groups for n in g.params}


@pytest.mark.parametrize("mult", [10.0, 3.0])
def test_head_lr_is_exactly_mult_times_backbone_lr(model, mult):
    optim = OptimConfig(name="adamw", lr=2e-4, head_lr_mult=mult, weight_decay=0.05)
    plan = build_plan(model, optim, FreezeConfig(backbone=False))
    by_param = group_of(plan)
    heads = head_names(model)
    assert heads
    for name, _ in model.named_parameters():
        expected = optim.lr * mult if name in heads else optim.lr
        assert by_param[name].lr == expected, name
    head_lrs = {g.lr for g in plan.groups if "head" in g.name}
    body_lrs = {g.lr for g in plan.groups if "head" not in g.name}
    assert head_lrs == {2e-4 * mult} and body_lrs == {2e-4}


def test_head_groups_hold_exactly_the_classifier(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=False))
    in_head_groups = {n for g in plan.groups if "head" in g.name for n in g.params}
    assert in_head_groups == head_names(model)


def test_every_parameter_in_exactly_one_group(model):
    for freeze in (False, True):
        plan = build_plan(model, OPTIM, FreezeConfig(backbone=freeze))
        listed = [n for g in plan.groups for n in g.params]
        assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
        assert sum(g.numel for g in plan.groups) == sum(p.numel() for p in model.parameters())


def test_freeze_backbone_leaves_only_the_head_trainable(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=True, bn="frozen"))
    trainable = {n for g in plan.groups if g.trainable for n in g.params}
    assert trainable == head_names(model)
    for g in plan.groups:
        if "head" not in g.name:
            assert g.trainable is False and g.lr == 0.0, g.name
        else:
            assert g.trainable is True and g.lr == OPTIM.lr * OPTIM.head_lr_mult


def test_apply_freezing_turns_gradients_off_for_the_backbone(model):
    model = copy.deepcopy(model)  # the module-scoped model stays untouched for the other tests
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=True, bn="frozen"))
    plan.apply_freezing(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head_names(model)


def test_optimizer_groups_exclude_frozen_groups(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=True, bn="frozen"))
    groups = plan.optimizer_groups(model)
    assert {g["name"] for g in groups} == {g.name for g in plan.groups if g.trainable}
    params = [p for g in groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.get_classifier().parameters()}
    for g in groups:
        assert g["lr"] == g["peak_lr"] == OPTIM.lr * OPTIM.head_lr_mult


def test_optimizer_groups_carry_each_groups_lr_and_decay(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=False))
    groups = {g["name"]: g for g in plan.optimizer_groups(model)}
    assert set(groups) == {g.name for g in plan.groups}
    for g in plan.groups:
        assert groups[g.name]["lr"] == g.lr and groups[g.name]["weight_decay"] == g.weight_decay
        assert len(groups[g.name]["params"]) == len(g.params)


def test_no_decay_rules(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=False))
    by_param = group_of(plan)
    norm_params = {f"{m_name}.{p_name}" if m_name else p_name
                   for m_name, module in model.named_modules() if isinstance(module, NORM_TYPES)
                   for p_name, _ in module.named_parameters(recurse=False)}
    declared = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    for name, param in model.named_parameters():
        expect_no_decay = name in norm_params or param.ndim <= 1 or name in declared
        assert (by_param[name].weight_decay == 0.0) == expect_no_decay, name
        if not expect_no_decay:
            assert by_param[name].weight_decay == OPTIM.weight_decay
            assert "no_decay" not in by_param[name].name


def test_conv_and_linear_weights_decay_and_their_biases_do_not(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=False))
    by_param = group_of(plan)
    checked = 0
    for m_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert by_param[f"{m_name}.weight"].weight_decay == OPTIM.weight_decay, m_name
            if module.bias is not None:
                assert by_param[f"{m_name}.bias"].weight_decay == 0.0, m_name
            checked += 1
    assert checked > 0


def test_norm_weights_and_biases_do_not_decay(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=False))
    by_param = group_of(plan)
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]
    assert norms
    for m_name, module in norms:
        for p_name, _ in module.named_parameters(recurse=False):
            assert by_param[f"{m_name}.{p_name}"].weight_decay == 0.0


def test_vit_position_embedding_and_class_token_do_not_decay():
    vit = timm.create_model("test_vit", pretrained=False, num_classes=4)
    by_param = group_of(build_plan(vit, OPTIM, FreezeConfig(backbone=False)))
    assert by_param["pos_embed"].weight_decay == 0.0
    assert by_param["cls_token"].weight_decay == 0.0
    assert vit.pos_embed.ndim == 3  # so it is the model's declaration, not the rank rule, that exempts it
    assert by_param["patch_embed.proj.weight"].weight_decay == OPTIM.weight_decay


def test_check_coverage_raises_on_missing_parameter(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=False))
    first = plan.groups[0]
    short = ParamGroup(first.name, first.params[1:], first.numel, first.lr, first.weight_decay, first.trainable)
    with pytest.raises(RuntimeError, match="no group"):
        check_coverage(Plan((short, *plan.groups[1:])), model)


def test_check_coverage_raises_on_duplicated_parameter(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=False))
    first, last = plan.groups[0], plan.groups[-1]
    dup = ParamGroup(last.name, last.params + first.params[:1], last.numel, last.lr, last.weight_decay, last.trainable)
    with pytest.raises(RuntimeError, match="two groups"):
        check_coverage(Plan((*plan.groups[:-1], dup)), model)


def test_check_coverage_raises_on_unknown_parameter(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=False))
    last = plan.groups[-1]
    extra = ParamGroup(last.name, last.params + ("no.such.weight",), last.numel, last.lr, last.weight_decay, True)
    with pytest.raises(RuntimeError, match="does not have"):
        check_coverage(Plan((*plan.groups[:-1], extra)), model)


def test_check_coverage_accepts_the_built_plan(model):
    check_coverage(build_plan(model, OPTIM, FreezeConfig(backbone=True, bn="frozen")), model)


def test_plan_to_json(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=True, bn="frozen"))
    rows = json.loads(plan.dumps())
    assert rows == plan.to_json()
    assert len(rows) == len(plan.groups)
    for row, group in zip(rows, plan.groups):
        assert {"name", "lr", "weight_decay", "params", "trainable"} <= set(row)
        assert row["name"] == group.name and row["lr"] == group.lr and row["trainable"] == group.trainable
        assert row["params"] == list(group.params)
    assert any("head" in row["name"] and row["trainable"] for row in rows)


def test_plan_table_lists_every_group(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=True, bn="frozen"))
    table = plan.table()
    for g in plan.groups:
        assert g.name in table
    assert "frozen" in table


def test_frozen_norm_modules_are_every_backbone_norm_with_statistics():
    for name in ("test_resnet", "test_efficientnet"):
        model = timm.create_model(name, pretrained=False, num_classes=4)
        plan = build_plan(model, OPTIM, FreezeConfig(backbone=True, bn="frozen"))
        expected = {id(m) for m in model.modules() if getattr(m, "track_running_stats", False)}
        assert expected
        assert {id(m) for m in plan.frozen_norm_modules(model)} == expected
        unfrozen = build_plan(model, OPTIM, FreezeConfig(backbone=False))
        assert unfrozen.frozen_norm_modules(model) == []
