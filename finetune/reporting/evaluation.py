"""The evaluation report: a run's model scored on labelled data, as numbers and files a person reads.

`finetune eval` writes, into a folder of its own: metrics.json (top-1, top-5, balanced accuracy, macro F1,
per-class precision/recall/F1/support, expected calibration error, the confusion matrix, the reliability
bins), confusion_matrix.png, reliability.png, mistakes.png (the most confident mistakes) and
predictions.csv (path, label, prediction, probability). After training, the same numbers and plots for
the val split go into the run directory as val_report.json, val_confusion_matrix.png and
val_reliability.png. Built from per-sample results already gathered from every process (training/
evaluate.py's keys) and the dataset view they came from; nothing here runs a model.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path

import torch

from ..atomic import write_atomic
from ..data.samples import IGNORE_LABEL
from ..data.samples import ImageSamples, align, natural_key
from ..errors import FinetuneError
from .metrics import reliability_bins, report_metrics
from .plots import save_confusion_matrix, save_image_grid, save_reliability

METRICS_NAME = "metrics.json"
CONFUSION_NAME = "confusion_matrix.png"
RELIABILITY_NAME = "reliability.png"
MISTAKES_NAME = "mistakes.png"
PREDICTIONS_NAME = "predictions.csv"
VAL_REPORT_NAME = "val_report.json"  # the run directory's copies carry the split in their names
MISTAKES_SHOWN = 24


def default_output(run: Path, origin: str) -> Path:
    """RUN/eval-<data name>-<time>, with -2, -3 ... when that exists: never an existing folder."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(origin.split(":", 1)[-1].replace("@", "-")).name).strip("-.")
    stem = f"eval-{name[:40] or 'data'}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, suffix = run / stem, 2
    while folder.exists():
        folder, suffix = run / f"{stem}-{suffix}", suffix + 1
    return folder


def match_classes(samples: ImageSamples, label_names: list[str], run: str) -> ImageSamples:
    """`samples` re-indexed onto the run's classes by name. A class the run never saw is an error naming
    it; run classes without images here are fine (the report lists them)."""
    present = sorted({samples.class_names[t] for t in samples.targets}, key=natural_key)
    unknown = [name for name in present if name not in set(label_names)]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise FinetuneError(f"{samples.origin} has {len(unknown)} class(es) the run {run} never saw: {shown}. A run "
                            f"can only be scored on its own classes ({len(label_names)}: "
                            f"{', '.join(label_names[:10])}{' ...' if len(label_names) > 10 else ''}); leave those "
                            "images out, or rename their classes to the run's names.")
    return align(samples, label_names)


def build_report(results: dict, class_names: list[str], view) -> dict:
    """metrics.report_metrics plus the run classes missing from the data, the unreadable images (left
    out of every number) and the reliability bins. `view` (a data.Transformed) names the images."""
    metrics = report_metrics(results, class_names)
    keep = results["label"] != IGNORE_LABEL
    correct = (results["pred"] == results["label"])[keep]
    matrix = metrics.pop("confusion_matrix")
    return {**{k: v for k, v in metrics.items() if k != "per_class"},
            "classes_missing": [name for name, row in zip(class_names, matrix) if not any(row)],
            "unreadable": [view.name(p) for p in torch.nonzero(~keep).flatten().tolist()],
            "per_class": metrics["per_class"],
            "reliability": reliability_bins(results["pred_prob"][keep], correct),
            "confusion_matrix": matrix}


def save_evaluation(folder: Path, report: dict, results: dict, view, class_names: list[str], about: dict) -> None:
    """Write `finetune eval`'s files into `folder` (made here; it must not exist or be empty)."""
    folder.mkdir(parents=True, exist_ok=True)  # an empty --output folder is fine; the default never exists
    write_atomic(folder / METRICS_NAME, json.dumps({**about, **report}, indent=2))
    save_report_plots(report, class_names, folder, "")
    positions = confident_mistakes(results, MISTAKES_SHOWN)
    images = [view.base[view.indices[p]][0] for p in positions]
    captions = [f"given {class_names[int(results['label'][p])]}\npredicted {class_names[int(results['pred'][p])]} "
                f"({100 * float(results['pred_prob'][p]):.0f}%)" for p in positions]
    save_image_grid(images, captions, folder / MISTAKES_NAME,
                    title="most confident mistakes first" if positions else "no mistakes")
    write_atomic(folder / PREDICTIONS_NAME, predictions_csv(results, view, class_names))


def save_val_report(folder: Path, report: dict, epoch: int) -> None:
    """After training: the val split's report in the run directory (val_report.json and the two plots)."""
    write_atomic(folder / VAL_REPORT_NAME, json.dumps({"split": "val", "epoch": epoch, **report}, indent=2))
    save_report_plots(report, list(report["per_class"]), folder, "val_", f" (val, epoch {epoch})")


def save_report_plots(report: dict, class_names: list[str], folder: Path, prefix: str, where: str = "") -> None:
    """{prefix}confusion_matrix.png and {prefix}reliability.png."""
    save_confusion_matrix(report["confusion_matrix"], class_names, folder / f"{prefix}{CONFUSION_NAME}",
                          f"confusion matrix{where}, rows normalised ({report['images']} images)")
    ece = report["ece"]
    save_reliability(report["reliability"], ece, folder / f"{prefix}{RELIABILITY_NAME}",
                     f"reliability{where}" + (f": ECE {100 * ece:.2f}%" if ece is not None else ""))


def confident_mistakes(results: dict, k: int) -> list[int]:
    """Positions of the `k` wrong predictions made with the highest probability, highest first."""
    wrong = (results["pred"] != results["label"]) & (results["label"] != IGNORE_LABEL)
    confidence = results["pred_prob"].float().masked_fill(~wrong, -1.0)
    k = min(k, int(wrong.sum()))
    return confidence.topk(k).indices.tolist() if k else []


def predictions_csv(results: dict, view, class_names: list[str]) -> str:
    """One row per readable image, in the data's order: path, label, prediction, probability (of the
    prediction). Unreadable images are listed in metrics.json instead."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label", "prediction", "probability"])
    for p, (label, pred, prob) in enumerate(zip(results["label"].tolist(), results["pred"].tolist(),
                                                results["pred_prob"].tolist())):
        if label != IGNORE_LABEL:
            writer.writerow([view.name(p), class_names[label], class_names[pred], f"{prob:.6f}"])
    return out.getvalue()


def summary(report: dict, headline: str | None = None) -> str:
    """The report in a few lines, as `finetune eval` prints it. `headline`: the first line of another task's
    report (tasks/); the default reads build_report's keys."""
    def pct(key: str) -> str:
        return f"{100 * report[key]:.2f}%" if report.get(key) is not None else "n/a"
    lines = [headline or f"{report['images']} images, {report['classes']} classes: top-1 {pct('top1_acc')}"
             + (f", top-5 {pct('top5_acc')}" if "top5_acc" in report else "")
             + f", balanced {pct('balanced_acc')}, macro F1 {pct('macro_f1')}, ECE {pct('ece')}"]
    if report.get("classes_missing"):
        missing = report["classes_missing"]
        lines.append(f"classes of the run with no images in the data ({len(missing)}): {', '.join(missing[:10])}"
                     + (" ..." if len(missing) > 10 else ""))
    if report.get("unreadable"):
        lines.append(f"{len(report['unreadable'])} unreadable image(s) left out, listed in {METRICS_NAME}")
    return "\n".join(lines)
