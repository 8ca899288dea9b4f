"""After training: the test metrics, the val split's full report (evaluation.py) and the hard examples,
the train and val images the trained model finds hardest, for a person to review.

After training, the best epoch's model scores every train and val image with the eval transform. The
images with the highest loss on their given label are where label errors hide: a confident prediction of
another class on a training image is more often a wrong label than a hard image. They are written to
`hard_examples.json` (most suspicious first) and drawn in `hard_examples.png`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..atomic import write_atomic
from ..data.badimages import IGNORE_LABEL
from .evaluation import build_report, save_val_report
from .metrics import classification_metrics
from .plots import save_image_grid

HARD_EXAMPLES_JSON = "hard_examples.json"
HARD_EXAMPLES_PNG = "hard_examples.png"
TEST_METRICS_NAME = "test_metrics.json"


def rank_hard_examples(losses: torch.Tensor, labels: torch.Tensor, k: int) -> list[int]:
    """Positions of the `k` highest losses, highest first, leaving out ignored (unreadable) samples."""
    losses = losses.float().masked_fill(labels == IGNORE_LABEL, float("-inf"))
    k = min(k, int((labels != IGNORE_LABEL).sum()))
    return losses.topk(k).indices.tolist() if k > 0 else []


def hard_example_entries(split: str, results: dict, positions: Sequence[int], dataset, class_names: list[str]) -> list[dict]:
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


def save_hard_examples(entries: dict[str, list[dict]], images: list, run_dir: Path) -> Path:
    """hard_examples.json, and hard_examples.png drawing `images` (the entries' images, in their order)."""
    path = run_dir / HARD_EXAMPLES_JSON
    write_atomic(path, json.dumps({
        "about": "highest-loss images after training (best epoch, eval transform): check their labels first",
        **entries}, indent=2))
    captions = [f"{e['split']} {e['index']}: given {e['given']}\npredicted {e['predicted']} "
                f"({100 * e['predicted_prob']:.0f}%)" for split in entries for e in entries[split]]
    save_image_grid(images, captions, run_dir / HARD_EXAMPLES_PNG,
                    title="highest loss first, train then val: review these labels")
    return path


def score_after_training(predict: Callable[[Any], dict], splits, eval_view: Callable, hard_examples: int,
                         folder: Path | None, best_epoch: int) -> dict | None:
    """With the best epoch's weights loaded: the test metrics (test_metrics.json, when the run has test
    data), the val split's report (val_report.json, val_confusion_matrix.png, val_reliability.png), then
    the `hard_examples` highest-loss train and val images. `predict(view)` scores a split view on every
    process and returns the gathered per-sample results; `eval_view(base, indices, split)` makes such a
    view. `folder` is where files go: None on every process but the main one."""
    test = None
    if splits.test is not None:
        results = predict(eval_view(splits.test, None, "test"))
        test = classification_metrics(results["loss"], results["pred"], results["label"], splits.class_names, "test")
        if folder is not None:
            write_atomic(folder / TEST_METRICS_NAME, json.dumps({"epoch": best_epoch, **test}, indent=2))
    val_view = eval_view(splits.val, splits.val_indices, "val")
    scored = {"val": (splits.val, val_view, predict(val_view))}
    if folder is not None:
        save_val_report(folder, build_report(scored["val"][2], splits.class_names, val_view), best_epoch)
    if hard_examples:
        train_view = eval_view(splits.train, splits.train_indices, "train")
        scored = {"train": (splits.train, train_view, predict(train_view)), **scored}
        entries, images = {}, []
        for split, (base, view, results) in scored.items():
            positions = rank_hard_examples(results["loss"], results["label"], hard_examples)
            entries[split] = hard_example_entries(split, results, positions, view, splits.class_names)
            images += [base[view.indices[p]][0] for p in positions] if folder is not None else []
        if folder is not None:
            save_hard_examples(entries, images, folder)
    return test
