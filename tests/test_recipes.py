"""The recipe gallery (recipes/*.yaml): every shipped recipe explains itself, loads, builds its plan on
its own backbone, and trains offline with a tiny backbone swapped in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import finetune
from finetune.recipe.load import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
GALLERY = ["hotdog-resnet18", "linear-probe", "fastai-style", "vit-layer-decay", "partial-freeze", "mixup",
           "early-stop", "multi-label", "lion"]


def test_the_gallery_is_complete():
    """Every shipped recipe is in GALLERY, so each one is checked below; the quickstart is the README's own run
    (loaded in test_recipe.py, trained in full with real weights in test_mixing.py)."""
    assert sorted(GALLERY) == sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem != "quickstart")


@pytest.fixture(scope="module")
def data(tmp_path_factory, make_image_folder) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("gallery") / "data", classes=3, per_class=6, size=32)


def _local_data(data: Path) -> dict:
    return {"data.train": str(data), "data.val": None}


@pytest.mark.parametrize("name", GALLERY)
def test_recipe_starts_with_a_comment_that_explains_it(name):
    lines = (RECIPES / f"{name}.yaml").read_text().splitlines()
    comment = [line for line in lines[:lines.index(next(x for x in lines if not x.startswith("#")))]]
    assert len(comment) >= 4 and all(line.startswith("#") for line in comment)
    text = " ".join(line.lstrip("# ") for line in comment)
    assert re.search(r"\bUse it (for|as|when)\b[^.]{20,}\.", text), "the comment must say when to use the recipe"


@pytest.mark.parametrize("name", GALLERY)
def test_recipe_loads_and_plans_on_its_own_backbone(name, data):
    config = load_recipe(RECIPES / f"{name}.yaml", _local_data(data))
    plan = finetune.plan(config)  # builds the real architecture (no weights) and checks freeze/lr keys on it
    assert any(g.trainable for g in plan.groups)
    if config.freeze.backbone and config.freeze.unfreeze_at is None:
        assert {n for g in plan.groups if g.trainable for n in g.params} <= {"fc.weight", "fc.bias", "head.weight",
                                                                           "head.bias", "classifier.weight",
                                                                           "classifier.bias"}
    if config.optim.layer_decay:
        assert len({g.layer for g in plan.groups if g.layer is not None}) > 5


@pytest.mark.slow
@pytest.mark.parametrize("name", GALLERY)
def test_recipe_trains_offline_with_a_tiny_backbone(name, data, tmp_path):
    tiny = "test_vit" if "vit" in name else "test_resnet"
    overrides = {**_local_data(data), "model.backbone": tiny, "model.pretrained": False, "data.image_size": 32,
                 "data.num_workers": 0, "train.batch_size": 4, "train.epochs": 2}
    result = finetune.train(RECIPES / f"{name}.yaml", output=tmp_path / "run", **overrides)
    assert len(result.metrics) == 2 and all(r["train_loss"] > 0 for r in result.metrics)
    config = load_recipe(RECIPES / f"{name}.yaml", overrides)
    if config.freeze.unfreeze_at:
        assert [r["phase"] for r in result.metrics] == [1, 2]
