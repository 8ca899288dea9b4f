"""finetune/training/inputs.py: which input pipeline a run uses, and that the decoded-image pipeline trains,
resumes and reports bad files like the PIL one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import finetune
from finetune import FinetuneError
from finetune.data import decoded
from finetune.training.inputs import model_inputs


def set_up(capsys) -> str:
    """The `input:` line of the set-up printed by the last run."""
    out = capsys.readouterr().out
    return next(line.strip() for line in out.splitlines() if line.strip().startswith("input:"))


def test_auto_decodes_folders_once_and_says_so(tmp_path, image_folder, tiny_recipe, capsys):
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 1, "train.hard_examples": 0,
                                            "data.cache_dir": str(tmp_path / "cache")})
    finetune.train(recipe, output=tmp_path / "run1")
    assert set_up(capsys).startswith("input: decoded-image cache (data.cache=auto: decoded-image cache about")
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [n.rsplit(".", 1)[1] for n in cached if n.endswith((".u8", ".json"))] == ["json", "u8"]
    finetune.train(recipe, output=tmp_path / "run2")  # a second run reads the same cache
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached


def test_in_memory_images_and_auto_augment_keep_the_pil_pipeline(tmp_path, image_folder, tiny_recipe, capsys):
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 1, "train.hard_examples": 0})
    pairs = [(Image.new("RGB", (20, 20), (60 * (i % 3), 90, 30)), i % 3) for i in range(12)]
    finetune.train(recipe, train_data=pairs, val_data=pairs[:6], class_names=["a", "b", "c"], output=tmp_path / "r1")
    assert "PIL decoding in loader workers (data.cache=auto: the data has no lasting identity" in set_up(capsys)
    finetune.train({**recipe, "data": {**recipe["data"], "auto_augment": "rand-m9-mstd0.5"}}, output=tmp_path / "r2")
    assert "data.auto_augment 'rand-m9-mstd0.5' runs on PIL images" in set_up(capsys)
    with pytest.raises(FinetuneError, match="data.cache=decoded cannot be used here: data.auto_augment"):
        finetune.train({**recipe, "data": {**recipe["data"], "auto_augment": "rand-m9-mstd0.5", "cache": "decoded"}},
                       output=tmp_path / "r3")
    assert not (tmp_path / "r3").exists()


def test_a_cache_over_the_budget_is_not_built(tmp_path, image_folder, tiny_recipe, capsys, monkeypatch):
    monkeypatch.setattr(decoded, "RAM_SHARE", 1e-12)
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 1, "train.hard_examples": 0,
                                            "data.cache_dir": str(tmp_path / "cache")})
    finetune.train(recipe, output=tmp_path / "run")
    assert "PIL decoding in loader workers (data.cache=auto: decoded-image cache about" in set_up(capsys)
    assert "does not fit the budget" in capsys.readouterr().out or not (tmp_path / "cache").exists()


# With loader workers (processes): the slow tier.
@pytest.mark.parametrize("cache, workers", [("decoded", 0), pytest.param("decoded", 1, marks=pytest.mark.slow),
                                            pytest.param("none", 1, marks=pytest.mark.slow)])
def test_resume_matches_the_uninterrupted_run(tmp_path, image_folder, tiny_recipe, train_until_epoch_one, cache,
                                              workers):
    """Crops are drawn in loader workers reseeded per epoch, so a resumed epoch draws the same ones."""
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 2, "train.hard_examples": 0, "data.cache": cache,
                                            "data.num_workers": workers})
    full = finetune.train(recipe, output=tmp_path / "full")
    train_until_epoch_one(recipe, tmp_path / "part")
    resumed = finetune.train(resume=tmp_path / "part")
    assert [r["train_loss"] for r in resumed.metrics] == [r["train_loss"] for r in full.metrics]
    expected, got = (load_file(str(p / "checkpoint" / "model.safetensors")) for p in (tmp_path / "full",
                                                                                     tmp_path / "part"))
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6


def test_bad_files_are_reported_the_same_by_both_pipelines(tmp_path, make_bad_image_folder, tiny_recipe):
    root = tmp_path / "data"
    make_bad_image_folder(root)
    reports = {}
    for cache in ("none", "decoded"):
        recipe = tiny_recipe(root, **{"train.epochs": 1, "train.hard_examples": 4, "data.cache": cache})
        result = finetune.train(recipe, output=tmp_path / cache)
        report = json.loads((tmp_path / cache / "data_report.json").read_text())
        reports[cache] = sorted((Path(e["file"]).name, e["reason"]) for e in report["skipped"])
        assert result.skipped_images == 2
    assert reports["decoded"] == reports["none"] and [n for n, _ in reports["none"]] == ["empty.png", "truncated.jpg"]


def test_model_inputs_from_either_pipeline():
    images, labels = torch.zeros(2, 3, 4, 4), torch.tensor([0, 1])
    out, same = model_inputs((images, labels), None, channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last) and same is labels
    crops, params = torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.zeros(2, 8)
    out, _ = model_inputs((crops, params, labels), lambda c, p: torch.ones(len(c), 3, 2, 2), channels_last=False)
    assert out.shape == (2, 3, 2, 2) and out.sum() == 24
