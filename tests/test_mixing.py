"""finetune/training/mixing.py and the mixing keys (train.mixup, cutmix, mix_prob, mix_switch_prob): soft
targets that sum to 1, randomness that depends on the micro-batch's global position only (so 1 process
accumulating equals 2 processes), the checks of the combinations that cannot work, and training runs with
mixing on: the loss is soft, validation and hard examples use plain labels, a frozen body is not cached."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import launcher_env
from safetensors.torch import load_file
from timm.loss import SoftTargetCrossEntropy

import finetune
from finetune import FinetuneError
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import TrainConfig
from finetune.training.batching import derive_batching
from finetune.training.mixing import build_mixing

CLASSES = 5


def mixing(processes: int = 1, process_index: int = 0, accumulation: int = 1, per_device: int = 4, **keys):
    tc = TrainConfig(**{"mixup": 0.2, **keys})
    batching = derive_batching(per_device * processes * accumulation, per_device, processes, 100)
    return build_mixing(tc, CLASSES, batching, process_index)


def batch(seed: int = 0, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 8, 8, generator=g), torch.randint(CLASSES, (size,), generator=g)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------
# The mixing itself


def test_off_unless_mixup_or_cutmix_is_set():
    assert mixing(mixup=0.0) is None
    assert mixing(mixup=0.0, cutmix=1.0) is not None


@pytest.mark.parametrize("keys", [{"mixup": 0.2}, {"mixup": 0.0, "cutmix": 1.0}, {"mixup": 0.8, "cutmix": 1.0}])
def test_targets_are_soft_rows_that_sum_to_one_with_label_smoothing_folded_in(keys):
    m = mixing(**keys, label_smoothing=0.1)
    images, labels = batch()
    mixed, targets = m(images.clone(), labels, epoch=0, update_in_epoch=0, micro_batch=0)
    assert targets.shape == (4, CLASSES) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(-1), torch.ones(4))
    assert (targets > 0).all()  # smoothing spreads some mass over every class
    assert not torch.equal(mixed, images)  # the images changed too
    # Each row mixes the image's own label with its partner's in the reversed batch, and nothing else.
    top2 = set(targets[0].topk(2).indices.tolist())
    assert {int(labels[0]), int(labels[-1])} <= top2 | {int(labels[0])}


def test_set_up_line_says_how_much_is_mixed():
    assert mixing(mixup=0.8, cutmix=1.0, mix_prob=0.5, mix_switch_prob=0.25, label_smoothing=0.0).describe() == (
        "mixing: mixup alpha 0.8 and cutmix alpha 1 on 50% of training micro-batches (25% of those by cutmix), "
        "soft targets with label smoothing 0; validation is never mixed")


def test_mix_prob_zero_leaves_images_alone_but_targets_smoothed():
    m = mixing(mix_prob=0.0, label_smoothing=0.1)
    images, labels = batch()
    mixed, targets = m(images.clone(), labels, 0, 0, 0)
    assert torch.equal(mixed, images)
    expected = torch.full((4, CLASSES), 0.1 / CLASSES).scatter_(1, labels[:, None], 1 - 0.1 + 0.1 / CLASSES)
    torch.testing.assert_close(targets, expected)


def test_randomness_depends_on_seed_epoch_and_position_only_and_leaves_numpy_alone():
    m = mixing(mixup=0.8, cutmix=1.0)
    images, labels = batch()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = m(images.clone(), labels, 3, 5, 0)
    assert np.array_equal(np.random.get_state()[1], before)  # the global generator is as it was
    np.random.rand(7)  # whatever else drew from NumPy in between
    again = m(images.clone(), labels, 3, 5, 0)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    others = [m(images.clone(), labels, *where)[1] for where in [(4, 5, 0), (3, 6, 0)]]
    others.append(mixing(mixup=0.8, cutmix=1.0, seed=1)(images.clone(), labels, 3, 5, 0)[1])
    assert all(not torch.equal(first[1], t) for t in others)


def test_one_process_accumulating_mixes_each_micro_batch_as_two_processes_do():
    one = mixing(accumulation=2)
    two = [mixing(processes=2, process_index=p) for p in range(2)]
    images, labels = batch()
    for update in range(3):
        for i in range(2):
            a = one(images.clone(), labels, 1, update, i)
            b = two[i](images.clone(), labels, 1, update, 0)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_odd_micro_batch_is_refused_naming_the_numbers():
    with pytest.raises(FinetuneError, match=r"even number of images.*train.batch_size 6 over 2 process\(es\) gives 3 "
                                            r"per device.*multiple of 4"):
        build_mixing(TrainConfig(mixup=0.2), CLASSES, derive_batching(6, None, 2, 100), 0)
    with pytest.raises(FinetuneError, match="micro_batch_size to an even divisor of the 12 images per process, e.g. 2"):
        build_mixing(TrainConfig(mixup=0.2), CLASSES, derive_batching(12, 3, 1, 100), 0)


# ----------------------------------------------------------------------------------------------------
# The recipe keys


def test_recipe_keys_load_with_their_defaults_off(tiny_recipe):
    tc = load_recipe(tiny_recipe()).train
    assert (tc.mixup, tc.cutmix, tc.mix_prob, tc.mix_switch_prob) == (0.0, 0.0, 1.0, 0.5)
    tc = load_recipe(tiny_recipe(), ["train.mixup=0.2", "train.cutmix=1", "train.mix_prob=0.5"]).train
    assert (tc.mixup, tc.cutmix, tc.mix_prob) == (0.2, 1.0, 0.5)


@pytest.mark.parametrize("override, message", [
    ("train.mixup=-0.1", "train.mixup: -0.1 must be in [0, 100]"),
    ("train.cutmix=1000", "train.cutmix: 1000.0 must be in [0, 100]"),
    ("train.mix_prob=1.5", "train.mix_prob: 1.5 is a probability"),
    ("train.mix_switch_prob=-1", "train.mix_switch_prob: -1.0 is a probability"),
])
def test_out_of_range_values_are_refused(tiny_recipe, override, message):
    with pytest.raises(FinetuneError) as e:
        load_recipe(tiny_recipe(), [override])
    assert message in str(e.value)


def test_class_weights_with_mixing_is_refused_with_the_alternative(tiny_recipe):
    with pytest.raises(FinetuneError, match=r"train.class_weights: 'auto' .*SoftTargetCrossEntropy.*data.sampler="
                                            "balanced"):
        load_recipe(tiny_recipe(), ["train.class_weights=auto", "train.cutmix=1.0"])


def test_lbfgs_head_fit_with_mixing_is_refused(tiny_recipe):
    with pytest.raises(FinetuneError, match="optim.name: 'lbfgs' fits the head once on cached features"):
        load_recipe(tiny_recipe(), ["optim.name=lbfgs", "freeze.backbone=true", "train.mixup=0.2"])


# ----------------------------------------------------------------------------------------------------
# Training with mixing on


def test_training_with_mixup_uses_soft_targets_but_scores_with_plain_labels(tiny_recipe, tmp_path, monkeypatch):
    seen = []
    original = SoftTargetCrossEntropy.forward

    def spy(self, x, target):
        seen.append(target.detach().clone())
        return original(self, x, target)
    monkeypatch.setattr(SoftTargetCrossEntropy, "forward", spy)
    result = finetune.train(tiny_recipe(), output=tmp_path / "run", **{"train.mixup": 0.4, "train.cutmix": 1.0,
                                                                        "train.epochs": 2})
    run = Path(result.run_dir)
    assert seen and all(t.ndim == 2 and t.shape[1] == 3 for t in seen)
    torch.testing.assert_close(torch.cat(seen).sum(-1), torch.ones(sum(len(t) for t in seen)))
    assert any((t.max(-1).values < 0.9 - 1e-6).any() for t in seen)  # some rows really are mixes
    # Validation and the hard examples score plain labels: their losses are per-image cross-entropies
    # of one class, and every record has its accuracy.
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2] and all(0 <= r["val_acc"] <= 1 for r in records)
    hard = json.loads((run / "hard_examples.json").read_text())
    assert hard["train"] and all(e["given"] in ("c0", "c1", "c2") and e["loss"] >= 0
                                 for split in ("train", "val") for e in hard[split])
    saved = yaml.safe_load((run / "recipe.yaml").read_text())["train"]
    assert (saved["mixup"], saved["cutmix"]) == (0.4, 1.0)


@pytest.mark.slow
def test_a_frozen_body_with_mixing_runs_on_mixed_images_and_says_so(tiny_recipe, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finetune", "train", write(tmp_path, tiny_recipe()),
                           "train.epochs=1", "train.mixup=0.2", "freeze.backbone=true", "--output", tmp_path / "run"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("mixing: mixup alpha 0.2 on every training micro-batch, soft targets with label smoothing 0.1; "
            "validation is never mixed | the frozen body runs every step: cached features are not images") \
        in proc.stdout
    assert read_metrics(tmp_path / "run")[0]["features_cached"] is False


def write(folder: Path, recipe: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_a_resumed_run_mixes_as_the_run_it_continues(tiny_recipe, tmp_path, train_until_epoch_one):
    recipe = tiny_recipe(**{"train.mixup": 0.4, "train.cutmix": 1.0, "train.hard_examples": 0})
    whole = finetune.train(recipe, output=tmp_path / "whole")
    train_until_epoch_one(recipe, tmp_path / "run")
    resumed = finetune.train(resume=tmp_path / "run")
    assert [r["train_loss"] for r in resumed.metrics] == [r["train_loss"] for r in whole.metrics]
    expected = load_file(str(tmp_path / "whole" / "checkpoint" / "model.safetensors"))
    got = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert max((got[k].double() - expected[k].double()).abs().max().item() for k in expected) <= 1e-6


# ----------------------------------------------------------------------------------------------------
# Slow: several processes, and the quickstart with real weights


@pytest.mark.slow
def test_two_processes_mix_and_train_as_one_process_accumulating(tmp_path, make_image_folder, make_recipe):
    """Augmentation off and test_vit (no dropout, LayerNorm): the mixing is all that could differ."""
    data = make_image_folder(tmp_path / "data", classes=3, per_class=15, size=32)
    recipe = make_recipe(data, **{"model.backbone": "test_vit", "train.epochs": 2, "train.batch_size": 8,
                                  "data.scale": [1.0, 1.0], "data.hflip": 0.0, "data.color_jitter": 0.0,
                                  "train.precision": "fp32", "train.mixup": 0.4, "train.cutmix": 1.0})
    path = write(tmp_path, recipe)
    (tmp_path / "home").mkdir()
    env = launcher_env(tmp_path / "home")
    one = subprocess.run([sys.executable, "-m", "finetune", "train", path, "train.micro_batch_size=4", "--output",
                          tmp_path / "one"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "1 process(es) x 4 per device x 2 accumulation" in one.stdout
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "finetune", "train", path, "--output", tmp_path / "two"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "2 process(es) x 4 per device x 1 accumulation" in two.stdout
    for name in ("model.safetensors", "checkpoint/model.safetensors"):
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-4, name
    # Mixing did happen: the same run without it ends elsewhere.
    plain = subprocess.run([sys.executable, "-m", "finetune", "train", path, "train.micro_batch_size=4",
                            "train.mixup=0", "train.cutmix=0", "--output", tmp_path / "plain"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one" / "checkpoint/model.safetensors")), \
        load_file(str(tmp_path / "plain" / "checkpoint/model.safetensors"))
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) > 1e-3


@pytest.mark.slow
def test_quickstart_with_mixup_still_reaches_96_percent(tmp_path):
    """The acceptance run: the shipped quickstart (efficientnet_lite0, real weights, sklearn digits) with
    train.mixup=0.2; about 70 s on an idle 2-core CPU. The training loss (against soft targets) falls."""
    result = finetune.train("quickstart", output=tmp_path / "run", **{"train.mixup": 0.2})
    losses = [r["train_loss"] for r in result.metrics]
    print(f"quickstart + mixup 0.2: best val acc {result.best_val_acc:.4f} at epoch {result.best_epoch}; "
          f"train losses {losses}; val accs {[r['val_acc'] for r in result.metrics]}")
    assert result.best_val_acc >= 0.96
    assert losses[-1] < losses[0] / 2
