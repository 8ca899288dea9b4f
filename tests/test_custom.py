"""finetune/model/custom.py: the checks a module of one's own passes before a run builds on it, its label
in the recipe, and its export. (Training one end to end: test_plugins.py.)"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from finetune.errors import FinetuneError
from finetune.model.backbone import build_model
from finetune.model.custom import (
    backbone_label,
    check_custom_model,
    is_timm_like,
    refuse_custom_export,
    save_custom_export,
)
from finetune.recipe.schema import ModelConfig


class Pooled(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_the_check_passes_a_fitting_module_and_leaves_its_mode_and_statistics():
    model = Pooled().train()
    before = model.bn.running_mean.clone()
    check_custom_model(model, 3, (3, 16, 16))
    assert model.training and torch.equal(model.bn.running_mean, before)  # eval mode, no gradient, no update


def test_the_check_names_what_does_not_fit():
    with pytest.raises(FinetuneError, match=r"returns \(1, 3\).*5 classes"):
        check_custom_model(Pooled(3), 5, (3, 16, 16))
    with pytest.raises(FinetuneError, match="failed on a batch of one 3x8x8 image.*data.image_size"):
        check_custom_model(nn.Sequential(nn.Conv2d(3, 3, 9), nn.Flatten()), 3, (3, 8, 8))
    frozen = Pooled().requires_grad_(False)
    with pytest.raises(FinetuneError, match="nothing would train"):
        check_custom_model(frozen, 3, (3, 16, 16))


def test_labels_and_timm_likeness():
    resnet = timm.create_model("test_resnet", num_classes=3)
    assert backbone_label(resnet) == "test_resnet" and is_timm_like(resnet)
    assert backbone_label(Pooled()) == "custom:Pooled" and not is_timm_like(Pooled())
    with pytest.raises(FinetuneError, match="pass it again"):  # a label never reaches timm
        build_model(ModelConfig(backbone="custom:Pooled", pretrained=False), 3)


def test_the_export_round_trips_and_loading_it_through_timm_is_refused(tmp_path):
    model = Pooled()
    save_custom_export(model, tmp_path, {"label_names": ["a", "b", "c"]},
                       {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5)})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "custom" and config["module_class"].endswith("Pooled")
    assert config["label_names"] == ["a", "b", "c"] and config["pretrained_cfg"]["input_size"] == [3, 16, 16]
    fresh = Pooled()
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    with pytest.raises(FinetuneError, match="Pooled.*load_state_dict"):
        refuse_custom_export(config, tmp_path)
    refuse_custom_export({"architecture": "resnet18"}, tmp_path)  # timm's own: nothing to refuse
