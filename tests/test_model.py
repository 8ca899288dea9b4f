"""finetune/model: the backbone (backbone.py), the export in timm's format (export.py) and loading it for
prediction (predict.py). Weights: test_weights.py; the plan: test_groups.py; the schedule: test_optim.py."""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import finetune
from finetune import FinetuneError
from finetune.model.backbone import build_model, fixed_input_size
from finetune.model.export import CONFIG_NAME, WEIGHTS_NAME, save_export
from finetune.recipe.schema import ModelConfig


def test_backbones_built_for_one_input_size_take_the_recipes_size():
    assert fixed_input_size("test_vit") and not fixed_input_size("test_resnet")
    model = build_model(ModelConfig(backbone="test_vit", pretrained=False), 3, lambda _: None, image_size=48)
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 3)


def test_export_loads_in_timm_and_in_finetune_with_identical_logits(tmp_path):
    model = build_model(ModelConfig(backbone="test_resnet", pretrained=False), 3, lambda _: None).eval()
    torch.nn.init.normal_(model.get_classifier().weight)  # not the zero head: logits must differ per image
    data_cfg = timm.data.resolve_model_data_config(model)
    save_export(model, tmp_path, ["cat", "dog", "owl"], data_cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no scratch folder left
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["architecture"] == "test_resnet" and config["label_names"] == ["cat", "dog", "owl"]
    images = torch.randn(2, 3, *data_cfg["input_size"][1:])
    with torch.no_grad():
        expected = model(images)
        reloaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()(images)
    assert torch.equal(reloaded, expected)
    predictor = finetune.load(tmp_path, device="cpu")
    assert predictor.label_names == ["cat", "dog", "owl"]
    assert torch.allclose(predictor.logits(images), expected)
    top = predictor.predict(Image.new("RGB", (40, 30), (10, 200, 30)), top_k=2)[0]
    assert len(top) == 2 and top[0]["prob"] >= top[1]["prob"] and top[0]["label"] in predictor.label_names


def test_a_channels_last_model_exports_the_same_weights_in_the_standard_layout(tmp_path):
    """safetensors refuses strided tensors; the export must neither fail nor change the training model."""
    model = build_model(ModelConfig(backbone="test_resnet", pretrained=False), 3, lambda _: None).eval()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(memory_format=torch.channels_last)
    save_export(model, tmp_path, ["a", "b", "c"], timm.data.resolve_model_data_config(model))
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], v) for k, v in expected.items())
    assert next(model.parameters()).is_contiguous(memory_format=torch.channels_last)  # the model is untouched


def test_loading_a_folder_without_an_export_says_what_it_needs(tmp_path):
    with pytest.raises(FinetuneError, match=f"has no {CONFIG_NAME}.*written by `finetune train`"):
        finetune.load(tmp_path)


@pytest.mark.parametrize("damage", ["truncated weights", "garbage weights", "garbage config"])
def test_loading_a_damaged_export_says_so(tmp_path, damage):
    """Issue 14.3: a copy cut short gives a FinetuneError, not a SafetensorError traceback."""
    model = build_model(ModelConfig(backbone="test_resnet", pretrained=False), 3, lambda _: None).eval()
    save_export(model, tmp_path, ["a", "b", "c"], timm.data.resolve_model_data_config(model))
    weights = tmp_path / WEIGHTS_NAME
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage weights":
        weights.write_bytes(b"\x00" * 64)
    else:
        (tmp_path / CONFIG_NAME).write_text('{"architecture": ')
    with pytest.raises(FinetuneError, match=f"cannot be read from {re.escape(str(tmp_path))}.*damaged or incomplete"):
        finetune.load(tmp_path)


@pytest.mark.parametrize("pretrained,keeps_tag", [(True, True), (False, False), ("weights.pth", False)])
def test_config_names_the_hub_weights_tag_only_when_the_run_started_from_them(tmp_path, pretrained, keeps_tag):
    """timm copies the backbone's default weights' tag and license into config.json; a run whose recipe
    loaded a file or started from random weights must not claim them. (Built here without weights: only
    what recipe.yaml says decides.)"""
    model = build_model(ModelConfig(backbone="test_resnet", pretrained=False), 3, lambda _: None)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"model": {"backbone": "test_resnet",
                                                                     "pretrained": pretrained}}))
    save_export(model, tmp_path, ["a", "b", "c"], timm.data.resolve_model_data_config(model))
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())["pretrained_cfg"]
    assert ("tag" in cfg, "license" in cfg) == (keeps_tag, keeps_tag)
    if keeps_tag:
        assert cfg["tag"] == "r160_in1k"
    assert timm.create_model(f"local-dir:{tmp_path}", pretrained=True).num_classes == 3  # still loads
