"""After training: the test metrics, the val split's full report (evaluation.py) and the hard examples,
the train and val images the trained model finds hardest, for a person to review.

After training, the best epoch's model scores every train and val image with the eval transform. The
images with the highest loss on their given label are where label errors hide: a confident prediction of
another class on a training image is more often a wrong label than a hard image. They are written to
`hard_examples.json` (most suspicious first) and drawn in `hard_examples.png`, unless the model is near
chance on val: then the same files say that the list shows what an untrained model gets wrong.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..atomic import write_atomic
from ..data.samples import IGNORE_LABEL
from .evaluation import build_report, save_val_report
from .metrics import classification_metrics
from .plots import save_image_grid

HARD_EXAMPLES_JSON = "hard_examples.json"
HARD_EXAMPLES_PNG = "hard_examples.png"
TEST_METRICS_NAME = "test_metrics.json"
# Within 5 points of guessing a model has learned next to nothing: on 10 classes 15% is as telling as 10%.
NEAR_CHANCE_POINTS = 0.05
RIGHT_COLOR, WRONG_COLOR = "#1a7f37", "#c62828"  # dark enough to read on white; a mark says it without colour


def rank_hard_examples(losses: torch.Tensor, labels: torch.Tensor, k: int) -> list[int]:
    """Positions of the `k` highest losses, highest first, leaving out ignored (unreadable) samples."""
    losses = losses.float().masked_fill(labels == IGNORE_LABEL, float("-inf"))
    k = min(k, int((labels != IGNORE_LABEL).sum()))
    return losses.topk(k).indices.tolist() if k > 0 else []


def hard_example_entries(split: str, results: dict, positions: Sequence[int], dataset,
                         class_names: list[str]) -> list[dict]:
    """JSON-ready records for `positions` of `dataset` (a data.Transformed view); `results` holds its
    per-sample tensors (loss, pred, pred_prob, given_prob, label) in the view's order."""
    return [{
        "split": split,
        "index": int(dataset.indices[pos]),
        "image": dataset.name(pos),
        "given": class_names[int(results["label"][pos])],
        "predicted": class_names[int(results["pred"][pos])],
        "loss": round(float(results["loss"][pos]), 4),
        "given_prob": round(float(results["given_prob"][pos]), 4),
        "predicted_prob": round(float(results["pred_prob"][pos]), 4),
    } for pos in positions]


def chance_note(metrics: dict, split: str = "val") -> str | None:
    """A warning when a split's balanced accuracy (`classification_metrics`) is within NEAR_CHANCE_POINTS of
    guessing, or worse: such a model's highest losses are everything it has not learned yet, not label
    errors. Balanced accuracy, because guessing the largest class scores its share in plain accuracy
    but 1 / classes in balanced accuracy, however imbalanced the data."""
    present = [acc for acc in metrics[f"{split}_per_class_acc"].values() if acc is not None]
    acc = metrics[f"{split}_balanced_acc"]
    if acc is None or len(present) < 2 or acc > 1 / len(present) + NEAR_CHANCE_POINTS:
        return None
    return (f"the model is near chance ({split} balanced accuracy {100 * acc:.0f}%, guessing "
            f"{100 / len(present):.0f}% for {len(present)} classes): these images reflect an untrained model, "
            "not label errors; train longer or check the recipe before reviewing labels")


def save_hard_examples(entries: dict[str, list[dict]], images: list, run_dir: Path, note: str | None = None) -> Path:
    """hard_examples.json, and hard_examples.png drawing `images` (the entries' images, in their order):
    captions green with a check mark where the prediction is the given label, red with a cross where not.
    `note` (`chance_note`) replaces the advice to review labels."""
    path = run_dir / HARD_EXAMPLES_JSON
    about = "highest-loss images after training (best epoch, eval transform): "
    write_atomic(path, json.dumps({"about": about + (note or "check their labels first"), **entries}, indent=2))
    shown = [e for split in entries for e in entries[split]]
    captions = [f"{'✓' if e['given'] == e['predicted'] else '✗'} {e['split']} {e['index']}: given {e['given']}\n"
                f"predicted {e['predicted']} ({100 * e['predicted_prob']:.0f}%)" for e in shown]
    colors = [RIGHT_COLOR if e["given"] == e["predicted"] else WRONG_COLOR for e in shown]
    title = "highest loss first, train then val: " + (textwrap.fill(note, 110) if note else "review these labels")
    save_image_grid(images, captions, run_dir / HARD_EXAMPLES_PNG, title=title, colors=colors)
    return path


def score_after_training(predict: Callable[[Any], dict], splits, eval_view: Callable, hard_examples: int,
                         folder: Path | None, best_epoch: int) -> dict | None:
    """With the best epoch's weights loaded: the test metrics (test_metrics.json, when the run has test
    data), the val split's report (val_report.json, val_confusion_matrix.png, val_reliability.png), then
    the `hard_examples` highest-loss train and val images. `predict(view)` scores a split view on every
    process and returns the gathered per-sample results; `eval_view(base, indices, split)` makes such a
    view. `folder` is where files go: None on every process but the main one, which also says what it
    scores before each split (a pass over the training images takes as long as an epoch's validation
    several times over, with no progress bar)."""
    def scored(view, split: str, purpose: str) -> dict:
        if folder is not None:
            print(f"scoring {split} ({len(view):,} images) for {purpose} ...", flush=True)
        return predict(view)

    test = None
    if splits.test is not None:
        results = scored(eval_view(splits.test, None, "test"), "test", TEST_METRICS_NAME)
        test = classification_metrics(results["loss"], results["pred"], results["label"], splits.class_names, "test")
        if folder is not None:
            write_atomic(folder / TEST_METRICS_NAME, json.dumps({"epoch": best_epoch, **test}, indent=2))
    val_view = eval_view(splits.val, splits.val_indices, "val")
    val = scored(val_view, "val", "the val report" + (" and hard examples" if hard_examples else ""))
    if folder is not None:
        save_val_report(folder, build_report(val, splits.class_names, val_view), best_epoch)
    if hard_examples:
        train_view = eval_view(splits.train, splits.train_indices, "train")
        views = {"train": (splits.train, train_view, scored(train_view, "train", "hard examples")),
                 "val": (splits.val, val_view, val)}
        entries, images = {}, []
        for split, (base, view, results) in views.items():
            positions = rank_hard_examples(results["loss"], results["label"], hard_examples)
            entries[split] = hard_example_entries(split, results, positions, view, splits.class_names)
            images += [base[view.indices[p]][0] for p in positions] if folder is not None else []
        if folder is not None:
            metrics = classification_metrics(val["loss"], val["pred"], val["label"], splits.class_names, "val")
            save_hard_examples(entries, images, folder, chance_note(metrics))
    return test
