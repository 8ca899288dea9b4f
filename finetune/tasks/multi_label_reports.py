"""Metrics and after-training reports of `task: multi_label`, from per-image results (multi_label.py:
loss, probs [N, C], label [N, C] multi-hot, IGNORE_LABEL rows for unreadable images).

Every epoch: the mean average precision over the labels that have a positive image (mAP, macro: the
selection metric of the best epoch), micro and macro F1 at `train.threshold`, the share of images whose
predicted label set is exactly right, and each label's AP. After training: the same for test
(test_metrics.json), val_report.json with per-label precision, recall, F1 and support, and the hard
examples ranked by each image's loss over all its labels. The counting is torchmetrics'.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torchmetrics.functional.classification import (
    multilabel_average_precision,
    multilabel_exact_match,
    multilabel_f1_score,
    multilabel_stat_scores,
)

from ..atomic import write_atomic
from ..data.samples import IGNORE_LABEL
from ..reporting.evaluation import METRICS_NAME, PREDICTIONS_NAME, VAL_REPORT_NAME, summary
from ..reporting.plots import save_image_grid
from ..reporting.review import HARD_EXAMPLES_JSON, HARD_EXAMPLES_PNG, RIGHT_COLOR, TEST_METRICS_NAME, WRONG_COLOR


def _kept(results: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keep = (results["label"] != IGNORE_LABEL).all(dim=1)
    return results["loss"][keep].float(), results["probs"][keep].float(), results["label"][keep].long()


def multi_label_metrics(results: dict, class_names: list[str], prefix: str, threshold: float) -> dict:
    """{prefix}_loss, _map (mean AP over the labels with a positive image here; None without any), _f1_micro,
    _f1_macro (over the labels present), _exact_match, _per_class_ap ({label: AP or None}) and _images."""
    losses, probs, labels = _kept(results)
    n, present = len(labels), labels.sum(dim=0) > 0
    out = {f"{prefix}_loss": None, f"{prefix}_map": None, f"{prefix}_f1_micro": None, f"{prefix}_f1_macro": None,
           f"{prefix}_exact_match": None, f"{prefix}_per_class_ap": dict.fromkeys(class_names), f"{prefix}_images": n}
    if not n:
        return out
    args = {"num_labels": len(class_names), "threshold": threshold}
    out.update({f"{prefix}_loss": round(losses.mean().item(), 6),
                f"{prefix}_f1_micro": round(multilabel_f1_score(probs, labels, average="micro", **args).item(), 6),
                f"{prefix}_exact_match": round(multilabel_exact_match(probs, labels, **args).item(), 6)})
    if present.any():
        # A label without positives has no AP (recall is undefined): it is left out, not scored 0.
        ap = multilabel_average_precision(probs[:, present], labels[:, present], num_labels=int(present.sum()),
                                          average=None).tolist()
        f1 = multilabel_f1_score(probs, labels, average=None, **args)[present]
        per_class = dict(zip([name for name, p in zip(class_names, present.tolist()) if p], ap))
        out.update({f"{prefix}_map": round(sum(ap) / len(ap), 6), f"{prefix}_f1_macro": round(f1.mean().item(), 6),
                    f"{prefix}_per_class_ap": {name: round(per_class[name], 6) if name in per_class else None
                                               for name in class_names}})
    return out


def multi_label_report(results: dict, class_names: list[str], threshold: float) -> dict:
    """val_report.json's numbers: the metrics above without a prefix, and per label its AP, precision,
    recall, F1 at the threshold and support (positive images; precision None when never predicted)."""
    metrics = {key.removeprefix("report_"): value
               for key, value in multi_label_metrics(results, class_names, "report", threshold).items()}
    _, probs, labels = _kept(results)
    per_class = dict.fromkeys(class_names)
    if len(labels):
        tp, fp, _, fn, support = multilabel_stat_scores(probs, labels, len(class_names), threshold,
                                                        average=None).T.tolist()
        per_class = {name: {"ap": metrics["per_class_ap"][name],
                            "precision": round(t / (t + p), 6) if t + p else None,
                            "recall": round(t / s, 6) if s else None,
                            "f1": round(2 * t / (2 * t + p + f), 6) if s else None, "support": int(s)}
                     for name, t, p, f, s in zip(class_names, tp, fp, fn, support)}
    del metrics["per_class_ap"]
    return {**metrics, "labels": len(class_names), "threshold": threshold, "per_class": per_class}


def score_multi_label_after_training(predict: Callable[[Any], dict], splits, eval_view: Callable, hard_examples: int,
                                     folder: Path | None, best_epoch: int, threshold: float) -> dict | None:
    """review.score_after_training for a multi-label run: test_metrics.json, val_report.json and the hard
    examples (the images with the highest loss over all their labels)."""
    test = None
    if splits.test is not None:
        test = multi_label_metrics(predict(eval_view(splits.test, None, "test")), splits.class_names, "test", threshold)
        if folder is not None:
            write_atomic(folder / TEST_METRICS_NAME, json.dumps({"epoch": best_epoch, **test}, indent=2))
    val_view = eval_view(splits.val, splits.val_indices, "val")
    val = predict(val_view)
    if folder is not None:
        report = multi_label_report(val, splits.class_names, threshold)
        write_atomic(folder / VAL_REPORT_NAME, json.dumps({"epoch": best_epoch, **report}, indent=2))
    if hard_examples:
        train_view = eval_view(splits.train, splits.train_indices, "train")
        entries, images = {}, []
        for split, base, view, results in (("train", splits.train, train_view, predict(train_view)),
                                           ("val", splits.val, val_view, val)):
            positions = rank_multi_label(results, hard_examples)
            entries[split] = hard_entries(split, results, positions, view, splits.class_names, threshold)
            images += [base[view.indices[p]][0] for p in positions] if folder is not None else []
        if folder is not None:
            save_multi_label_hard_examples(entries, images, folder)
    return test


def rank_multi_label(results: dict, k: int) -> list[int]:
    """Positions of the `k` highest per-image losses, highest first, leaving out unreadable images."""
    keep = (results["label"] != IGNORE_LABEL).all(dim=1)
    losses = results["loss"].float().masked_fill(~keep, float("-inf"))
    k = min(k, int(keep.sum()))
    return losses.topk(k).indices.tolist() if k > 0 else []


def hard_entries(split: str, results: dict, positions: list[int], view, class_names: list[str],
                 threshold: float) -> list[dict]:
    """JSON-ready records: the given labels, the predicted ones (probability >= threshold) and the loss."""
    def names(row: torch.Tensor) -> list[str]:
        return [class_names[i] for i in row.nonzero()[:, 0].tolist()]
    return [{"split": split, "index": int(view.indices[pos]), "image": view.name(pos),
             "given": names(results["label"][pos] > 0), "predicted": names(results["probs"][pos] >= threshold),
             "loss": round(float(results["loss"][pos]), 4)} for pos in positions]


def save_multi_label_hard_examples(entries: dict[str, list[dict]], images: list, run_dir: Path) -> None:
    """hard_examples.json and hard_examples.png (green: predicted set right, red: not)."""
    write_atomic(run_dir / HARD_EXAMPLES_JSON, json.dumps(
        {"about": "highest-loss images after training (best epoch, eval transform, the mean binary cross-entropy "
                  "over all labels): check their labels first", **entries}, indent=2))
    shown = [e for split in entries for e in entries[split]]
    captions = [f"{'✓' if e['given'] == e['predicted'] else '✗'} {e['split']} {e['index']}: given "
                f"{'|'.join(e['given']) or '-'}\npredicted {'|'.join(e['predicted']) or '-'}" for e in shown]
    colors = [RIGHT_COLOR if e["given"] == e["predicted"] else WRONG_COLOR for e in shown]
    save_image_grid(images, captions, run_dir / HARD_EXAMPLES_PNG, colors=colors,
                    title="highest loss first, train then val: review these labels")


def save_multi_label_evaluation(folder: Path, results: dict, view, class_names: list[str], threshold: float,
                                about: dict) -> tuple[dict, str]:
    """`finetune eval` of a multi-label run: metrics.json (multi_label_report, the run's labels without a
    positive image here, the unreadable images) and predictions.csv (path, given labels, predicted labels,
    then each label's probability). Returns the report and its summary, as `finetune eval` prints it."""
    report = multi_label_report(results, class_names, threshold)
    keep = (results["label"] != IGNORE_LABEL).all(dim=1)
    report.update(classes_missing=[name for name, c in report["per_class"].items() if not c or not c["support"]],
                  unreadable=[view.name(p) for p in torch.nonzero(~keep).flatten().tolist()])
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / METRICS_NAME, json.dumps({**about, **report}, indent=2))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "labels", "predicted"] + class_names)
    for p in torch.nonzero(keep).flatten().tolist():
        given = [class_names[i] for i in (results["label"][p] > 0).nonzero()[:, 0].tolist()]
        probs = results["probs"][p].tolist()
        predicted = [name for name, prob in zip(class_names, probs) if prob >= threshold]
        writer.writerow([view.name(p), "|".join(given), "|".join(predicted)] + [f"{prob:.6f}" for prob in probs])
    write_atomic(folder / PREDICTIONS_NAME, out.getvalue())
    return report, summary(report, eval_headline(report))


def eval_headline(report: dict) -> str:
    def pct(key: str) -> str:
        return f"{100 * report[key]:.2f}%" if report.get(key) is not None else "n/a"
    return (f"{report['images']} images, {report['labels']} labels: mAP {pct('map')}, at threshold "
            f"{report['threshold']:g} F1 micro {pct('f1_micro')}, macro {pct('f1_macro')}, exact label set "
            f"{pct('exact_match')}")
