"""Fine-tuning strategies in training (the plan itself is tested in test_groups.py): the recipe and CLI checks
of the freeze keys, LR ratios kept by the schedule, groups waiting for their phase, frozen stages bit for bit
under each BatchNorm policy, and exact resume across an unfreeze boundary."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

import finetune
from finetune import FinetuneError
from finetune.model.groups import build_plan
from finetune.model.optim import build_optimizer, drop_waiting_grads, lr_multiplier, set_lr
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import FreezeConfig, OptimConfig

OPTIM = OptimConfig(name="adamw", lr=1e-3, head_lr_mult=10.0, weight_decay=0.05)
BACKBONES = ["test_resnet", "test_vit", "test_efficientnet", "convnext_tiny"]


# ----------------------------------------------------------------------------------------------------
# Strategies the recipe and the CLI check


@pytest.mark.slow
def test_cli_plan_with_unmatched_pattern_exits_nonzero_naming_it(tmp_path, image_folder, tiny_recipe):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(image_folder())))
    proc = subprocess.run([sys.executable, "-m", "finetune", "plan", str(recipe), "freeze.patterns=[nomatch.*]"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "'nomatch.*'" in proc.stderr and "Traceback" not in proc.stderr


def test_recipe_checks_for_unfreezing_keys(tiny_recipe):
    with pytest.raises(FinetuneError) as e:
        load_recipe(tiny_recipe(**{"freeze.unfreeze_at": 5, "train.epochs": 3, "optim.layer_decay": 1.5,
                                   "freeze.bn": "eva"}))
    text = str(e.value)
    assert "freeze.unfreeze_at" in text and "optim.layer_decay" in text and "freeze.bn" in text
    with pytest.raises(FinetuneError, match="freeze.stages: 2 and freeze.backbone=true both set"):
        load_recipe(tiny_recipe(**{"freeze.stages": 2, "freeze.backbone": True}))
    with pytest.raises(FinetuneError, match="set one of them"):
        load_recipe(tiny_recipe(**{"freeze.unfreeze_at": 1}))
    config = load_recipe(tiny_recipe(), ["freeze.phases={0: 3, 1: 0}", "optim.lr_mult.layer1.*=0.5"])
    assert config.freeze.phases == {0: 3, 1: 0} and config.optim.lr_mult == {"layer1.*": 0.5}


# ----------------------------------------------------------------------------------------------------
# The schedule keeps every ratio


def test_lr_ratio_between_any_two_groups_is_the_same_at_every_step():
    model = timm.create_model("test_vit", pretrained=False, num_classes=4)
    optim = OptimConfig(name="adamw", lr=1e-3, head_lr_mult=10.0, weight_decay=0.05, layer_decay=0.7,
                        lr_mult={"*.proj.*": 0.5})
    plan = build_plan(model, optim, FreezeConfig(stages=2, phases={1: 0}))
    optimizer = build_optimizer(optim, plan.optimizer_groups(model))
    total, warmup = 100, 10
    for epoch, update in itertools.product((0, 1), (0, 5, warmup, 50, 98, 99)):  # warmup, middle, end
        set_lr(optimizer, lr_multiplier(update, total, warmup), epoch)
        training = [g for g in optimizer.param_groups if epoch >= g["trains_from"]]
        waiting = [g for g in optimizer.param_groups if epoch < g["trains_from"]]
        assert len(training) > 5 and (waiting if epoch == 0 else not waiting)
        assert all(g["lr"] == 0.0 for g in waiting)
        for a, b in itertools.combinations(training, 2):
            assert a["lr"] / b["lr"] == pytest.approx(a["peak_lr"] / b["peak_lr"], rel=1e-12), (a["name"], b["name"])


def test_waiting_groups_are_skipped_by_the_optimizer():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    plan = build_plan(model, OPTIM, FreezeConfig(backbone=True, unfreeze_at=1, bn="frozen"))
    optimizer = build_optimizer(OPTIM, plan.optimizer_groups(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    set_lr(optimizer, 1.0, epoch=0)
    drop_waiting_grads(optimizer, epoch=0)
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"fc.weight", "fc.bias"}
    waiting = [p for g in optimizer.param_groups if g["trains_from"] == 1 for p in g["params"]]
    assert waiting and all(p not in optimizer.state for p in waiting)  # no Adam moments built up


# ----------------------------------------------------------------------------------------------------
# Training: frozen stages bit for bit, the BatchNorm policy, exact resume across an unfreeze boundary


@pytest.mark.parametrize("bn", ["eval", "frozen"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_frozen_stages_bitwise_unchanged_after_training_steps(backbone, bn):
    """Two AdamW steps as the loop takes them (model.train(), then eval for the plan's BatchNorm layers)."""
    torch.manual_seed(0)
    model = timm.create_model(backbone, pretrained=False, num_classes=4)
    plan = build_plan(model, OPTIM, FreezeConfig(stages=2, bn=bn))
    plan.apply_freezing(model)
    optimizer = build_optimizer(OPTIM, plan.optimizer_groups(model))
    stage = timm.models.group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    first_two = sorted(set(stage.values()))[:2]
    frozen_modules = {m for m, mod in model.named_modules()
                      if any(stage.get(f"{m}.{p}") in first_two for p, _ in mod.named_parameters(recurse=False))}
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    for _ in range(2):
        model.train()
        for module in plan.frozen_norm_modules(model):
            module.eval()
        size = model.pretrained_cfg["input_size"][-1] if "vit" in model.default_cfg["architecture"] else 32
        nn.functional.cross_entropy(model(torch.randn(4, 3, size, size)), torch.tensor([0, 1, 2, 3])).backward()
        set_lr(optimizer, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = model.state_dict()
    in_frozen = [k for k in before if k.rsplit(".", 1)[0] in frozen_modules]
    assert in_frozen
    batch_norm = {f"{m}." for m, mod in model.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
    for k in in_frozen:
        is_bn_affine = any(k.startswith(p) for p in batch_norm) and k.endswith((".weight", ".bias"))
        if is_bn_affine and bn == "eval":
            continue  # eval: the affine trains; checked to move below
        assert torch.equal(before[k], after[k]), k
    moved = [k for k in before if k not in in_frozen and "num_batches" not in k and not torch.equal(before[k], after[k])]
    assert moved  # the rest did train
    if bn == "eval" and batch_norm:
        affine = [k for k in in_frozen if any(k.startswith(p) for p in batch_norm) and k.endswith(".weight")]
        assert affine and any(not torch.equal(before[k], after[k]) for k in affine)


def test_batch_norm_without_affine_parameters_keeps_its_statistics_when_frozen():
    """An affine=False BatchNorm in the frozen backbone has no parameter to freeze, yet freeze.bn=frozen
    holds it in eval mode too: with the loop's rule (model.train(), then eval for the plan's norm layers)
    its loaded running statistics survive training forward passes. Under bn=train they follow the batches."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    norm = model.layer2[0].bn1 = nn.BatchNorm2d(model.layer2[0].bn1.num_features, affine=False)
    with torch.no_grad():  # loaded statistics that a batch of noise would visibly move
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    for bn in ("frozen", "train"):
        plan = build_plan(model, OPTIM, FreezeConfig(backbone=True, bn=bn))
        assert (("layer2.0.bn1", None) in plan.eval_norms) == (bn == "frozen")
        before = copy.deepcopy(norm.state_dict())
        for _ in range(3):
            model.train()
            for module in plan.frozen_norm_modules(model):
                module.eval()
            model(torch.randn(4, 3, 32, 32))
        kept = all(torch.equal(before[k], v) for k, v in norm.state_dict().items())
        assert kept == (bn == "frozen"), bn


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory) -> Path:
    """test_resnet weights with non-trivial BatchNorm statistics, so keeping them is a real check."""
    torch.manual_seed(123)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "initial.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, make_image_folder) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("strategies") / "data", classes=3, per_class=8, size=32)


_RESNET = timm.create_model("test_resnet", pretrained=False, num_classes=3)
_STAGE = timm.models.group_parameters(_RESNET, _RESNET.group_matcher(coarse=True), reverse=True)
# test_resnet's tensors by kind: BatchNorm statistics, BatchNorm affine, and the rest (conv weights, fc)
BN_STATS = {f"{m}.{b}" for m, mod in _RESNET.named_modules() if isinstance(mod, nn.BatchNorm2d)
            for b in ("running_mean", "running_var")}
BN_AFFINE = {f"{m}.{p}" for m, mod in _RESNET.named_modules() if isinstance(mod, nn.BatchNorm2d)
             for p in ("weight", "bias")}
OTHER = {n for n, _ in _RESNET.named_parameters()} - BN_AFFINE


def _stage_of(name: str) -> int:
    """timm's coarse stage of a state-dict key (the head is stage 5)."""
    return _STAGE[name.rsplit(".", 1)[0] + ".weight"]


@pytest.mark.parametrize("bn", ["frozen", "eval", "train"])
def test_frozen_stages_unchanged_after_training_under_each_bn_policy(tmp_path, data, make_recipe, initial_weights, bn):
    recipe = make_recipe(data, **{"model.pretrained": str(initial_weights), "freeze.stages": 2, "freeze.bn": bn,
                                  "train.epochs": 1})
    finetune.train(recipe, output=tmp_path / "run")
    before, after = load_file(str(initial_weights)), load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    frozen_stage = [k for k in before if _stage_of(k) < 2]
    stats = [k for k in frozen_stage if k in BN_STATS]
    affine = [k for k in frozen_stage if k in BN_AFFINE]
    weights = [k for k in frozen_stage if k in OTHER]
    assert stats and affine and weights
    assert all(torch.equal(before[k], after[k]) for k in weights)  # conv weights: frozen under every policy
    assert all(torch.equal(before[k], after[k]) for k in stats) == (bn != "train")
    assert all(torch.equal(before[k], after[k]) for k in affine) == (bn == "frozen")
    trained = [k for k in before if 2 <= _stage_of(k) < 5 and k in OTHER]
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    frozen_groups = {n for g in plan if not g["trainable"] for n in g["params"]}
    assert frozen_groups == set(weights) | (set(affine) if bn == "frozen" else set())


@pytest.mark.slow  # six epochs in three runs
def test_resume_across_unfreeze_boundary_matches_uninterrupted_run(tmp_path, data, make_recipe, initial_weights,
                                                                   train_until_epoch_one):
    recipe = make_recipe(data, **{"model.pretrained": str(initial_weights), "freeze.backbone": True,
                                  "freeze.unfreeze_at": 1, "freeze.bn": "eval", "train.epochs": 3,
                                  "optim.layer_decay": 0.8, "train.warmup_epochs": 0.5})
    whole = finetune.train(recipe, output=tmp_path / "whole")
    assert [r["phase"] for r in whole.metrics] == [1, 2, 2]

    train_until_epoch_one(recipe, tmp_path / "cut")
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["phase"] == 2  # the next epoch trains in the thawed phase
    first = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    initial = load_file(str(initial_weights))
    body = [k for k in OTHER if not k.startswith("fc.")]
    changed = [k for k in body if not torch.equal(first[k], initial[k])]
    assert not changed, f"phase 1 must leave the body's weights alone: {changed}"
    assert all(torch.equal(first[k], initial[k]) for k in BN_STATS), "bn eval keeps statistics"

    resumed = finetune.train(resume=tmp_path / "cut")
    assert [r["train_loss"] for r in resumed.metrics] == [r["train_loss"] for r in whole.metrics]
    expected = load_file(str(tmp_path / "whole" / "checkpoint" / "model.safetensors"))
    got = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert set(got) == set(expected)
    worst = max((got[k].double() - expected[k].double()).abs().max().item() for k in expected)
    assert worst <= 1e-6
    assert any(not torch.equal(expected[k], initial[k]) for k in body), "the body trained after the boundary"
    assert json.loads((tmp_path / "cut" / "plan.json").read_text()) == json.loads(
        (tmp_path / "whole" / "plan.json").read_text())


@pytest.mark.slow  # six epochs in three runs
def test_resume_across_a_thawing_phase_matches_uninterrupted_run(tmp_path, data, make_recipe, initial_weights,
                                                                  train_until_epoch_one):
    """freeze.phases thaws stages 1-2 at epoch 1 (stem stays frozen): cut after epoch 1, resume, same end."""
    recipe = make_recipe(data, **{"model.pretrained": str(initial_weights), "freeze.phases": {0: 3, 1: 1},
                                  "freeze.bn": "eval", "train.epochs": 3, "optim.layer_decay": 0.8,
                                  "train.warmup_epochs": 0.5})
    whole = finetune.train(recipe, output=tmp_path / "whole")
    assert [r["phase"] for r in whole.metrics] == [1, 2, 2]

    train_until_epoch_one(recipe, tmp_path / "cut")
    first = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    initial = load_file(str(initial_weights))
    thawing = [k for k in OTHER if 1 <= _stage_of(k) < 3]
    assert thawing and all(torch.equal(first[k], initial[k]) for k in thawing), "stages 1-2 wait in phase 1"

    resumed = finetune.train(resume=tmp_path / "cut")
    assert [r["train_loss"] for r in resumed.metrics] == [r["train_loss"] for r in whole.metrics]
    expected = load_file(str(tmp_path / "whole" / "checkpoint" / "model.safetensors"))
    got = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert max((got[k].double() - expected[k].double()).abs().max().item() for k in expected) <= 1e-6
    assert any(not torch.equal(expected[k], initial[k]) for k in thawing), "stages 1-2 trained after the thaw"
    stem = [k for k in OTHER if _stage_of(k) == 0]
    assert stem and all(torch.equal(expected[k], initial[k]) for k in stem), "the stem never thaws"


@pytest.mark.slow
def test_two_processes_train_through_an_unfreeze_boundary(tmp_path, data, make_recipe, initial_weights):
    """DDP (gloo, 2 CPU processes): groups that thaw at epoch 1 are registered with DDP from the start and
    wait with their gradients dropped; a pattern-frozen stage stays outside DDP. No unused-parameter
    error, and the pattern-frozen stage is bit for bit as loaded."""
    recipe = make_recipe(data, **{"model.pretrained": str(initial_weights), "freeze.backbone": True,
                                  "freeze.unfreeze_at": 1, "freeze.bn": "frozen", "freeze.patterns": ["layer4.*"],
                                  "train.epochs": 2, "optim.layer_decay": 0.8})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "finetune", "train", str(path), "--output", str(tmp_path / "run"),
                           "--processes", "2"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in metrics] == [1, 2]
    assert all(v == 0.0 for k, v in metrics[0]["lr"].items() if k.endswith(".from1"))
    assert all(v > 0.0 for v in metrics[1]["lr"].values())
    before = load_file(str(initial_weights))
    after = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("layer4."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("layer2.") and k in OTHER)
