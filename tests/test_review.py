"""finetune/reporting/review.py: the scoring pass after training says what it scores, the hard-example
grid tells right from wrong predictions without relying on colour, and a model near chance is not sent
to review labels."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from finetune.data.loaders import Transformed
from finetune.data.samples import IGNORE_LABEL, ArraySamples
from finetune.reporting import review
from finetune.reporting.metrics import classification_metrics
from finetune.tasks import SingleLabel
from finetune.training.evaluate import predict_batches

WRONG = {"split": "train", "index": 7, "image": "x[7]", "given": "cat", "predicted": "dog", "loss": 3.0,
         "given_prob": 0.05, "predicted_prob": 0.95}
RIGHT = {**WRONG, "split": "val", "index": 2, "image": "x[2]", "predicted": "cat", "loss": 0.9,
         "given_prob": 0.4, "predicted_prob": 0.4}
GREY = [Image.new("RGB", (16, 16), (128, 128, 128))] * 2


def record_grid(monkeypatch) -> list[dict]:
    calls = []
    monkeypatch.setattr(review, "save_image_grid",
                        lambda images, captions, path, **kw: calls.append({"captions": captions, **kw}))
    return calls


def test_captions_tell_right_from_wrong_by_mark_and_by_colour(tmp_path, monkeypatch):
    review.save_hard_examples({"train": [WRONG], "val": [RIGHT]}, GREY, tmp_path)
    pixels = np.asarray(Image.open(tmp_path / review.HARD_EXAMPLES_PNG).convert("RGB"), dtype=np.int64)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((r - g > 80) & (r - b > 80)).sum() > 20  # red caption text (the thumbnails are grey)
    assert ((g - r > 40) & (g - b > 30)).sum() > 20  # green caption text
    calls = record_grid(monkeypatch)
    review.save_hard_examples({"train": [WRONG], "val": [RIGHT]}, GREY, tmp_path)
    [call] = calls
    assert [c.split(" ")[0] for c in call["captions"]] == ["✗", "✓"]  # readable without colour
    assert call["colors"] == [review.WRONG_COLOR, review.RIGHT_COLOR]


def metrics(preds: list[int], labels: list[int], classes: int) -> dict:
    return classification_metrics(torch.zeros(len(labels)), torch.tensor(preds), torch.tensor(labels),
                                  [str(i) for i in range(classes)], "val")


def test_chance_note_is_given_near_guessing_and_on_balanced_accuracy():
    labels = [i % 10 for i in range(100)]
    assert review.chance_note(metrics([0] * 100, labels, 10)) is not None  # 10% on 10 classes
    assert review.chance_note(metrics([(i + (i % 7 == 0)) % 10 for i in range(100)], labels, 10)) is None
    # 90 "0" and 10 "1", everything predicted "0": 90% accuracy, yet the model has learned nothing.
    note = review.chance_note(metrics([0] * 100, [0] * 90 + [1] * 10, 2))
    assert "balanced accuracy 50%, guessing 50% for 2 classes" in note and "untrained model" in note
    assert review.chance_note(metrics([0, 1], [IGNORE_LABEL] * 2, 2)) is None  # nothing readable


def test_near_chance_json_and_title_say_untrained_not_label_errors(tmp_path, monkeypatch):
    calls = record_grid(monkeypatch)
    review.save_hard_examples({"train": [WRONG], "val": [RIGHT]}, GREY, tmp_path)
    assert "check their labels" in json.loads((tmp_path / review.HARD_EXAMPLES_JSON).read_text())["about"]
    assert calls[-1]["title"].endswith("review these labels")
    review.save_hard_examples({"train": [WRONG], "val": [RIGHT]}, GREY, tmp_path, note="the model is near chance")
    about = json.loads((tmp_path / review.HARD_EXAMPLES_JSON).read_text())["about"]
    assert about.endswith("the model is near chance") and "labels" not in about
    assert "near chance" in calls[-1]["title"] and "review these labels" not in calls[-1]["title"]


def digits_like_splits(train: int, val: int) -> SimpleNamespace:
    samples = ArraySamples([np.zeros((4, 4), np.uint8)] * (train + val), [i % 2 for i in range(train + val)],
                           ["even", "odd"], "arrays")
    return SimpleNamespace(test=None, train=samples, train_indices=list(range(train)), val=samples,
                           val_indices=list(range(train, train + val)), class_names=samples.class_names)


def scorer(learned: bool):
    """`predict(view)` as the loop passes it: a model that knows every label, or one that says "even"."""
    def predict(view):
        labels = torch.tensor([view.base.targets[i] for i in view.indices])
        logits = 3.0 * torch.nn.functional.one_hot(labels if learned else torch.zeros_like(labels), 2).float()
        return predict_batches(torch.nn.Identity(), SimpleNamespace(gather_for_metrics=lambda v: v), [(logits, labels)],
                               SingleLabel())
    return predict


def eval_view(base, indices, split):
    return Transformed(base, indices, lambda image: image, split)


def test_scoring_says_what_runs_before_each_split(tmp_path, capsys):
    review.score_after_training(scorer(True), digits_like_splits(1437, 360), eval_view, 3, tmp_path, 5)
    assert capsys.readouterr().out.splitlines() == [
        "scoring val (360 images) for the val report and hard examples ...",
        "scoring train (1,437 images) for hard examples ..."]
    assert "check their labels" in json.loads((tmp_path / review.HARD_EXAMPLES_JSON).read_text())["about"]
    review.score_after_training(scorer(True), digits_like_splits(8, 4), eval_view, 3, None, 5)
    assert capsys.readouterr().out == ""  # the other processes score in silence


def test_a_model_at_chance_writes_hard_examples_that_say_so(tmp_path):
    review.score_after_training(scorer(False), digits_like_splits(12, 6), eval_view, 3, tmp_path, 5)
    about = json.loads((tmp_path / review.HARD_EXAMPLES_JSON).read_text())["about"]
    assert "near chance (val balanced accuracy 50%" in about and "untrained model" in about
    with Image.open(tmp_path / review.HARD_EXAMPLES_PNG) as png:
        assert png.format == "PNG" and png.size[0] > 100
