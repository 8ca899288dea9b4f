"""finetune/training/features.py: a linear probe trains its head on features computed once per image."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import build_tiny_recipe
from safetensors.torch import load_file

import finetune
from finetune.training.features import FeatureView

PROBE = {"freeze.backbone": True, "freeze.bn": "frozen", "train.hard_examples": 0}


def probe(data: Path, cache: Path, **overrides) -> dict:

    return build_tiny_recipe(data, **{**PROBE, "data.cache_dir": str(cache), **overrides})


def logits(run: Path, images: torch.Tensor) -> torch.Tensor:
    model = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    with torch.no_grad():
        return model(images)


def cache_files(cache: Path) -> set[str]:
    return {p.name for p in cache.glob("features-*.safetensors")} if cache.is_dir() else set()


@pytest.fixture
def data(image_folder):
    return image_folder(classes=3, per_class=10)


def test_cached_and_uncached_probes_give_the_same_model(tmp_path, data):
    """With one view and the eval transform for training, caching changes nothing but the speed."""
    recipe = probe(data, tmp_path / "cache", **{"data.augment": False, "train.epochs": 2})
    cached = finetune.train(recipe, output=tmp_path / "cached")
    plain = finetune.train(recipe, output=tmp_path / "plain", **{"data.feature_cache": "none"})
    assert [r["features_cached"] for r in cached.metrics] == [True, True]
    assert [r["features_cached"] for r in plain.metrics] == [False, False]
    images = torch.randn(6, 3, 32, 32)
    assert (logits(tmp_path / "cached", images) - logits(tmp_path / "plain", images)).abs().max() <= 1e-5
    # The export is the whole model, and the body in it is the loaded one, untouched.
    exported = load_file(str(tmp_path / "cached" / "model.safetensors"))
    assert any(k.startswith("layer1.") for k in exported) and "fc.weight" in exported


def test_a_second_run_reuses_the_cache_and_a_changed_file_or_body_makes_a_new_one(tmp_path, data, capsys):
    cache = tmp_path / "cache"
    finetune.train(probe(data, cache, **{"train.epochs": 1}), output=tmp_path / "one")
    first = cache_files(cache)
    assert len(first) == 2  # train and val
    capsys.readouterr()
    finetune.train(probe(data, cache, **{"train.epochs": 1}), output=tmp_path / "two")
    assert cache_files(cache) == first and "from " + str(cache) in capsys.readouterr().out

    touched = next((data / "c0").iterdir())
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # a file replaced
    finetune.train(probe(data, cache, **{"train.epochs": 1}), output=tmp_path / "three")
    assert len(cache_files(cache) - first) == 2  # the file sits in train or val; both keys follow the data
    after_touch = cache_files(cache)
    finetune.train(probe(data, cache, **{"train.epochs": 1, "train.seed": 1}), output=tmp_path / "four")
    assert len(cache_files(cache) - after_touch) == 2  # another random init: another body, other features


def test_views_are_drawn_once_and_one_per_image_each_epoch(tmp_path, data):
    recipe = probe(data, tmp_path / "cache", **{"data.feature_views": 3, "train.epochs": 1})
    finetune.train(recipe, output=tmp_path / "run")
    [train_file] = [p for p in (tmp_path / "cache").iterdir() if load_file(str(p))["features"].shape[1] == 3]
    features = load_file(str(train_file))["features"]
    assert features.shape[:2] == (24, 3)
    assert not torch.allclose(features[:, 0], features[:, 1])  # view 1 is augmented, view 0 the eval view
    view = FeatureView(features, torch.zeros(24, dtype=torch.long), type("V", (), {"indices": list(range(24))})())
    torch.manual_seed(0)
    drawn = {tuple(view[0][0].tolist()) for _ in range(30)}
    assert len(drawn) == 3


def test_resume_from_a_checkpoint_with_cached_features_matches_the_uninterrupted_run(tmp_path, data,
                                                                                      train_until_epoch_one):
    recipe = probe(data, tmp_path / "cache", **{"train.epochs": 3, "data.feature_views": 2})
    whole = finetune.train(recipe, output=tmp_path / "whole")
    train_until_epoch_one(recipe, tmp_path / "stopped")
    resumed = finetune.train(resume=tmp_path / "stopped")
    assert [r["train_loss"] for r in resumed.metrics] == [r["train_loss"] for r in whole.metrics]
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_bad_images_are_reported_whether_features_are_computed_or_read(tmp_path, make_bad_image_folder):
    files = make_bad_image_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    reported = {}
    for run in ("computed", "read"):
        finetune.train(probe(tmp_path / "data", cache, **{"train.epochs": 1, "train.batch_size": 4}),
                       output=tmp_path / run)
        report = json.loads((tmp_path / run / "data_report.json").read_text())
        reported[run] = {(e["split"], Path(e["file"]).name) for e in report["skipped"]}
    assert {name for _, name in reported["computed"]} == {files["truncated"].name, files["empty"].name}
    assert reported["read"] == reported["computed"]


def test_the_plan_says_whether_the_body_runs(tmp_path, data):
    recipe = probe(data, tmp_path / "cache")
    assert "only the head trains, on features computed once per image" in finetune.plan(recipe).table()
    table = finetune.plan(recipe, **{"freeze.bn": "eval"}).table()
    assert "the body still runs forward and backward every step" in table


@pytest.mark.slow
def test_two_processes_train_the_same_probe_with_and_without_the_cache(tmp_path, data):
    import yaml

    recipe_file = tmp_path / "probe.yaml"
    recipe_file.write_text(yaml.safe_dump(probe(data, tmp_path / "cache", **{"data.augment": False,
                                                                               "train.epochs": 2})))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    for name, extra in (("cached", []), ("plain", ["data.feature_cache=none"])):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "finetune", "train", str(recipe_file), *extra, "--output", str(tmp_path / name)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    images = torch.randn(6, 3, 32, 32)
    assert (logits(tmp_path / "cached", images) - logits(tmp_path / "plain", images)).abs().max() <= 1e-5


def test_lbfgs_fits_the_head_to_the_optimum_of_the_regularised_loss(tmp_path, data):
    wd = 1e-2
    recipe = probe(data, tmp_path / "cache", **{"optim.name": "lbfgs", "optim.weight_decay": wd,
                                                "train.label_smoothing": 0.0, "train.epochs": 4,
                                                "data.augment": False})
    result = finetune.train(recipe, output=tmp_path / "run")
    assert result.metrics[-1]["lr"].keys() == {"head+head.no_decay"}
    # The exported head is a minimum of mean cross-entropy + wd/2 |W|^2 over the cached training features.
    [train] = [load_file(str(p)) for p in (tmp_path / "cache").iterdir()
               if load_file(str(p))["features"].shape[0] == 24]
    head = load_file(str(tmp_path / "run" / "model.safetensors"))
    w, b = head["fc.weight"].requires_grad_(), head["fc.bias"].requires_grad_()
    x, y = train["features"][:, 0], train["labels"]
    loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + wd / 2 * w.pow(2).sum()
    grads = torch.autograd.grad(loss, (w, b))
    assert max(g.abs().max().item() for g in grads) < 1e-4
    assert result.metrics[-1]["train_loss"] == pytest.approx(loss.item(), rel=1e-4)


@pytest.mark.parametrize("overrides, says", [
    ({"freeze.backbone": False}, "needs freeze.backbone=true"),
    ({"freeze.bn": "eval"}, "freeze.bn auto or frozen"),
    ({"data.feature_cache": "none"}, "data.feature_cache auto"),
])
def test_lbfgs_is_refused_where_the_body_would_change(tmp_path, data, overrides, says):
    with pytest.raises(finetune.FinetuneError, match=f"optim.name: 'lbfgs' fits a linear probe.*{says}"):
        finetune.plan(probe(data, tmp_path / "cache", **{"optim.name": "lbfgs", **overrides}))


def test_lr_find_refuses_lbfgs(tmp_path, data):
    with pytest.raises(finetune.FinetuneError, match="nothing to sweep"):
        finetune.lr_find(probe(data, tmp_path / "cache", **{"optim.name": "lbfgs"}), output=tmp_path / "lrf")


def test_a_fine_tune_starts_from_a_head_fitted_on_the_pretrained_features(tmp_path, data, capsys):
    """train.head_init probe (auto: with pretrained weights): the head is fitted on the body's cached
    features before the body trains, so the first epoch starts from a head that separates the classes."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=3).state_dict().items()},
              str(weights))
    for init in ("auto", "zero"):
        recipe = build_tiny_recipe(data, **{"model.pretrained": str(weights), "train.head_init": init,
                                            "train.epochs": 1, "train.hard_examples": 0,
                                            "data.cache_dir": str(tmp_path / "cache")})
        finetune.train(recipe, output=tmp_path / init)
        out = capsys.readouterr().out
        assert ("head initialised by a linear probe" in out) is (init == "auto")
        if init == "auto":  # the colour of each class is easy: the fitted head gets the training images right
            right = float(re.search(r"(\d+\.\d)% of the training images right", out).group(1))
            assert right >= 90


def test_a_resumed_fine_tune_does_not_fit_its_head_again(tmp_path, data, capsys, train_until_epoch_one):
    from safetensors.torch import save_file

    weights = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=3).state_dict().items()},
              str(weights))
    recipe = build_tiny_recipe(data, **{"model.pretrained": str(weights), "train.epochs": 2, "train.hard_examples": 0,
                                        "train.head_init": "probe", "data.cache_dir": str(tmp_path / "cache")})
    whole = finetune.train(recipe, output=tmp_path / "whole")
    train_until_epoch_one(recipe, tmp_path / "stopped")
    capsys.readouterr()
    resumed = finetune.train(resume=tmp_path / "stopped")
    assert "head initialised" not in capsys.readouterr().out  # the checkpoint holds the trained head
    assert [r["train_loss"] for r in resumed.metrics] == [r["train_loss"] for r in whole.metrics]
