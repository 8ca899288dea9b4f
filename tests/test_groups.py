"""finetune/model/groups.py and plan.py: the parameter-group plan on four architectures (head LR ratio,
layer decay, lr_mult, freezing by stage and pattern, no-decay rules, the BatchNorm policy, coverage) and
what a plan turns into (optimizer groups, requires_grad, norm layers in eval mode, its table and JSON).
Training with a plan is tested in test_strategies.py."""

from __future__ import annotations

import copy
import fnmatch
import json
import math

import pytest
import timm
import torch
from torch import nn

from finetune import FinetuneError
from finetune.model.groups import NORM_TYPES, build_plan, describe_parameters
from finetune.model.plan import ParamGroup, Plan, check_coverage
from finetune.recipe.schema import FreezeConfig, OptimConfig

BACKBONES = ["test_resnet", "test_vit", "test_efficientnet", "convnext_tiny"]
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


def resnet_with_affine_less_norms() -> nn.Module:
    """test_resnet with three BatchNorm layers (stem, layer1, layer4) replaced by affine=False ones: they
    have running statistics but no parameter, so only their names place them in a stage."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    for parent, child in ((model, "bn1"), (model.layer1[0], "bn1"), (model.layer4[0], "bn2")):
        setattr(parent, child, nn.BatchNorm2d(getattr(parent, child).num_features, affine=False))
    return model


# ----------------------------------------------------------------------------------------------------
# Learning rates: every factor shows, and their product is the LR


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


@pytest.mark.parametrize("decay", [0.65, 0.9])
def test_layer_decay_lrs_strictly_increase_with_depth_and_head_sits_mult_above_top(model, decay):
    optim = OptimConfig(name="adamw", lr=1e-3, head_lr_mult=10.0, weight_decay=0.05, layer_decay=decay)
    plan = build_plan(model, optim, FreezeConfig())
    body = [g for g in plan.groups if "head" not in g.name]
    lr_of_layer = {}
    for g in body:
        assert g.layer is not None, g.name
        assert lr_of_layer.setdefault(g.layer, g.lr) == g.lr, "one LR per layer"
    layers = sorted(lr_of_layer)
    assert layers == list(range(len(layers))) and len(layers) >= 5
    assert all(lr_of_layer[a] < lr_of_layer[b] for a, b in zip(layers, layers[1:]))
    top = lr_of_layer[layers[-1]]
    assert top == pytest.approx(1e-3, rel=1e-12)
    assert lr_of_layer[0] == pytest.approx(1e-3 * decay ** layers[-1], rel=1e-12)
    heads = [g for g in plan.groups if "head" in g.name]
    assert {n for g in heads for n in g.params} == head_names(model)
    for g in heads:
        assert g.lr == pytest.approx(10.0 * top, rel=1e-12)
        assert g.factors["head_lr_mult"] == 10.0 and "layer_decay" not in g.factors
    for g in plan.groups:  # every factor shows, and their product is the LR
        assert g.lr == pytest.approx(torch.tensor(list(g.factors.values()), dtype=torch.float64).prod().item())


def test_each_parameter_is_described_with_exactly_the_factors_of_its_groups_lr(model):
    """The describe step names every factor of a parameter's LR, no more, and its group's LR is their product
    (0, with no factors shown, when the group never trains)."""
    optim = OptimConfig(name="adamw", lr=1e-3, head_lr_mult=5.0, weight_decay=0.05, layer_decay=0.8,
                        lr_mult={"*.weight": 2.0, "*.bias": 0.5, "*1*": 3.0})  # "*1*" overlaps both
    freeze = FreezeConfig(stages=1, patterns=["*.bias"], phases={2: 0})
    params, _, _ = describe_parameters(model, optim, freeze)
    group = group_of(build_plan(model, optim, freeze))
    heads = head_names(model)
    top = max(p.layer for p in params if p.layer is not None)
    assert [p.name for p in params] == [n for n, _ in model.named_parameters()]
    for p in params:
        expected = {"optim.lr": 1e-3}
        if p.name in heads:
            assert p.stage is None and p.layer is None and p.label == "head", p.name
            expected["head_lr_mult"] = 5.0
        else:
            expected["layer_decay"] = 0.8 ** (top - p.layer)
        expected |= {f"lr_mult[{g}]": v for g, v in optim.lr_mult.items() if fnmatch.fnmatchcase(p.name, g)}
        assert p.factors == expected, p.name
        g = group[p.name]
        assert g.lr == (math.prod(p.factors.values()) if p.trains_from is not None else 0.0), p.name
        assert g.factors == (p.factors if p.trains_from is not None else {}), p.name
        assert g.trains_from == p.trains_from and g.weight_decay == (0.05 if p.decay and g.trainable else 0.0)
    assert any(p.trains_from is None for p in params) and any(p.trains_from == 2 for p in params)


def test_lr_mult_and_patterns_show_as_factors_and_multiply():
    model = timm.create_model("test_vit", pretrained=False, num_classes=4)
    optim = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5,
                        lr_mult={"blocks.5.*": 3.0, "*.qkv.*": 0.5})
    plan = build_plan(model, optim, FreezeConfig(patterns=["patch_embed.*"]))
    g = group_of(plan)
    qkv = g["blocks.5.attn.qkv.weight"]
    assert qkv.factors == {"optim.lr": 1e-3, "layer_decay": 1.0, "lr_mult[blocks.5.*]": 3.0, "lr_mult[*.qkv.*]": 0.5}
    assert qkv.lr == pytest.approx(1e-3 * 1.5)
    assert g["blocks.4.attn.qkv.weight"].lr == pytest.approx(1e-3 * 0.5 * 0.5)
    assert g["patch_embed.proj.weight"].trains_from is None and g["patch_embed.proj.weight"].lr == 0
    assert g["cls_token"].trainable


# ----------------------------------------------------------------------------------------------------
# Weight decay


def test_no_decay_rules(model):
    """Norm parameters, biases, other tensors of rank <= 1 and the model's no_weight_decay() names do not
    decay and sit in .no_decay groups; conv and linear weights decay."""
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=False))
    by_param = group_of(plan)
    norm_params = {f"{m_name}.{p_name}" if m_name else p_name
                   for m_name, module in model.named_modules() if isinstance(module, NORM_TYPES)
                   for p_name, _ in module.named_parameters(recurse=False)}
    assert norm_params
    declared = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    checked = 0
    for m_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            name = f"{m_name}.{p_name}" if m_name else p_name
            expect_no_decay = name in norm_params or param.ndim <= 1 or name in declared
            assert (by_param[name].weight_decay == 0.0) == expect_no_decay, name
            assert ("no_decay" in by_param[name].name) == expect_no_decay, name
            if not expect_no_decay:
                assert by_param[name].weight_decay == OPTIM.weight_decay
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                assert by_param[name].weight_decay == (OPTIM.weight_decay if p_name == "weight" else 0.0), name
                checked += 1
    assert checked > 0


def test_vit_position_embedding_and_class_token_do_not_decay():
    vit = timm.create_model("test_vit", pretrained=False, num_classes=4)
    by_param = group_of(build_plan(vit, OPTIM, FreezeConfig(backbone=False)))
    assert by_param["pos_embed"].weight_decay == 0.0
    assert by_param["cls_token"].weight_decay == 0.0
    assert vit.pos_embed.ndim == 3 and vit.cls_token.ndim == 3  # the model's declaration exempts them, not their rank
    assert by_param["patch_embed.proj.weight"].weight_decay == OPTIM.weight_decay


# ----------------------------------------------------------------------------------------------------
# Freezing: backbone, stages, patterns, phases


def test_freeze_backbone_leaves_only_the_head_trainable(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=True, bn="frozen"))
    trainable = {n for g in plan.groups if g.trainable for n in g.params}
    assert trainable == head_names(model)
    for g in plan.groups:
        if "head" not in g.name:
            assert g.trainable is False and g.lr == 0.0, g.name
        else:
            assert g.trainable is True and g.lr == OPTIM.lr * OPTIM.head_lr_mult


def test_freeze_stages_follow_timms_group_matcher(model):
    plan = build_plan(model, OPTIM, FreezeConfig(stages=2, bn="frozen"))
    stages = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    first_two = {n for k in sorted(stages)[:2] for n in stages[k]}
    frozen = {n for g in plan.groups if not g.trainable for n in g.params}
    assert frozen == first_two
    for g in plan.groups:
        assert (g.lr == 0.0) == (not g.trainable)
        if not g.trainable:
            assert g.stage in (0, 1) and g.name.endswith(".frozen")
    optimizer_params = {id(p) for g in plan.optimizer_groups(model) for p in g["params"]}
    assert not optimizer_params & {id(p) for n, p in model.named_parameters() if n in frozen}


def test_unfreeze_at_plan_keeps_every_group_from_step_zero():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=True, unfreeze_at=2, bn="frozen"))
    body = [g for g in plan.groups if "head" not in g.name]
    assert body and all(g.trains_from == 2 and g.trainable and g.lr == OPTIM.lr for g in body)
    assert {g["name"] for g in plan.optimizer_groups(model)} == {g.name for g in plan.groups}
    assert plan.phase_at(0) == plan.phase_at(1) == 1 and plan.phase_at(2) == 2
    assert plan.frozen_norm_modules(model, 1) and plan.frozen_norm_modules(model, 2) == []
    table = plan.table()
    assert "from epoch 2 (phase 2)" in table and "phases:" in table


@pytest.mark.parametrize("key", ["freeze.patterns", "optim.lr_mult"])
def test_a_glob_matching_nothing_is_an_error_naming_it(key):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    optim, freeze = OPTIM, FreezeConfig()
    if key == "freeze.patterns":
        freeze = FreezeConfig(patterns=["layer1.*", "nomatch.*"])
    else:
        optim = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, lr_mult={"nomatch.*": 2.0})
    with pytest.raises(FinetuneError, match=r"nomatch\.\*.*no parameter"):
        build_plan(model, optim, freeze)


def test_freezing_everything_is_an_error():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    with pytest.raises(FinetuneError, match="no parameter to train"):
        build_plan(model, OPTIM, FreezeConfig(backbone=True, patterns=["fc.*"], bn="frozen"))


def test_too_many_stages_and_refreezing_are_errors():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4)  # 5 body stages
    with pytest.raises(FinetuneError, match="5 stages"):
        build_plan(model, OPTIM, FreezeConfig(stages=6))
    with pytest.raises(FinetuneError, match="only thaw"):
        build_plan(model, OPTIM, FreezeConfig(stages=2, phases={1: 3}))
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=True, phases={2: 3, 4: 0}))
    assert plan.phases == ((0, 5), (2, 3), (4, 0))


# ----------------------------------------------------------------------------------------------------
# BatchNorm layers held in eval mode


def test_frozen_norm_modules_are_every_backbone_norm_with_statistics():
    for name in ("test_resnet", "test_efficientnet"):
        model = timm.create_model(name, pretrained=False, num_classes=4)
        plan = build_plan(model, OPTIM, FreezeConfig(backbone=True, bn="frozen"))
        expected = {id(m) for m in model.modules() if getattr(m, "track_running_stats", False)}
        assert expected
        assert {id(m) for m in plan.frozen_norm_modules(model)} == expected
        unfrozen = build_plan(model, OPTIM, FreezeConfig(backbone=False))
        assert unfrozen.frozen_norm_modules(model) == []


@pytest.mark.parametrize(("freeze", "expected"), [
    # stage 0 is the stem (bn1), stage 1 layer1, stage 4 layer4
    (FreezeConfig(backbone=True, bn="frozen"), {"bn1": None, "layer1.0.bn1": None, "layer4.0.bn2": None}),
    (FreezeConfig(stages=2, bn="eval"), {"bn1": None, "layer1.0.bn1": None}),
    (FreezeConfig(phases={0: 5, 1: 2, 3: 0}, bn="frozen"), {"bn1": 3, "layer1.0.bn1": 3, "layer4.0.bn2": 1}),
    (FreezeConfig(backbone=True, unfreeze_at=2, bn="eval"), {"bn1": 2, "layer1.0.bn1": 2, "layer4.0.bn2": 2}),
    (FreezeConfig(patterns=["layer1.*"], bn="frozen"), {"layer1.0.bn1": None}),  # a pattern holds its statistics
    (FreezeConfig(backbone=True, bn="train"), {}),
])
def test_batch_norm_without_affine_parameters_is_held_with_its_stage(freeze, expected):
    model = resnet_with_affine_less_norms()
    plan = build_plan(model, OPTIM, freeze)
    held = dict(plan.eval_norms)
    assert {name: held[name] for name in ("bn1", "layer1.0.bn1", "layer4.0.bn2") if name in held} == expected
    names = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert [name for name, _ in plan.eval_norms] == [n for n in names if n in held], "in model order"


# ----------------------------------------------------------------------------------------------------
# Coverage and what a plan turns into


@pytest.mark.parametrize(("optim", "freeze"), [
    (OPTIM, FreezeConfig()),
    (OPTIM, FreezeConfig(backbone=True, bn="frozen")),
    (OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8, lr_mult={"*.weight": 2.0}),
     FreezeConfig(stages=1, patterns=["*.bias"], bn="eval", phases={1: 0})),
])
def test_every_parameter_in_exactly_one_group(model, optim, freeze):
    plan = build_plan(model, optim, freeze)
    listed = [n for g in plan.groups for n in g.params]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    assert sum(g.numel for g in plan.groups) == sum(p.numel() for p in model.parameters())
    assert len({g.name for g in plan.groups}) == len(plan.groups)


def test_head_groups_hold_exactly_the_classifier(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=False))
    in_head_groups = {n for g in plan.groups if "head" in g.name for n in g.params}
    assert in_head_groups == head_names(model)


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


def test_plan_json_lists_each_groups_settings():
    """What plan.json and `finetune plan --json` hold, on test_resnet with its stem and layer1 frozen for
    one epoch and BatchNorm in eval mode until then."""
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    rows = json.loads(build_plan(model, OPTIM, FreezeConfig(stages=2, unfreeze_at=1, bn="eval")).dumps())
    assert [r["name"] for r in rows] == ["stage0.from1", "stage0.no_decay", "stage1.from1", "stage1.no_decay",
                                         "stage2", "stage2.no_decay", "stage3", "stage3.no_decay", "stage4",
                                         "stage4.no_decay", "head", "head.no_decay"]
    assert all(set(r) == {"name", "params", "numel", "tensors", "lr", "weight_decay", "trainable", "factors",
                          "stage", "layer", "trains_from", "bn"} for r in rows)
    row = {r["name"]: r for r in rows}
    assert row["stage0.from1"] | {"params": None} == {
        "name": "stage0.from1", "params": None, "numel": 7344, "tensors": 3, "lr": 2e-4, "weight_decay": 0.05,
        "trainable": True, "factors": {"optim.lr": 2e-4}, "stage": 0, "layer": 0, "trains_from": 1, "bn": "-"}
    assert row["stage0.from1"]["params"] == ["conv1.0.weight", "conv1.3.weight", "conv1.6.weight"]
    # eval: the affine of a frozen stage trains from the start, its statistics stay until the stage thaws
    assert row["stage1.no_decay"]["trains_from"] == 0 and row["stage1.no_decay"]["bn"] == "eval until epoch 1"
    assert row["stage2.no_decay"]["bn"] == "train" and row["stage2"]["trains_from"] == 0
    assert row["head"]["params"] == ["fc.weight"] and row["head.no_decay"]["params"] == ["fc.bias"]
    assert row["head"]["lr"] == pytest.approx(2e-3) and row["head"]["factors"] == {"optim.lr": 2e-4, "head_lr_mult": 10.0}


def test_plan_table_lists_every_group(model):
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=True, bn="frozen"))
    table = plan.table()
    for g in plan.groups:
        assert g.name in table
    assert "frozen" in table


def test_plan_table_names_the_batchnorm_policy_only_when_something_is_frozen():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    nothing_frozen = build_plan(model, OPTIM, FreezeConfig()).table()
    assert "BatchNorm in frozen parts" not in nothing_frozen and "stages: 0=" in nothing_frozen
    for freeze in (FreezeConfig(stages=1, bn="eval"), FreezeConfig(backbone=True, unfreeze_at=1, bn="frozen"),
                   FreezeConfig(patterns=["layer1.*"], bn="train")):
        assert "BatchNorm in frozen parts: " + freeze.bn in build_plan(model, OPTIM, freeze).table(), freeze
