"""Metrics and reports of `task: regression`, from per-image results (regression.py: loss, pred and label
in the user's units, NaN labels for unreadable images).

Every epoch: the mean absolute error (MAE: it picks the best epoch, lower is better), the root mean squared
error and R² (the share of the targets' variance the model explains), torchmetrics' counting. After
training: test_metrics.json, val_report.json with the same numbers and the targets' spread, the
predicted-vs-true plot of val (val_predicted_vs_true.png) and the hard examples, the images the model is
furthest off on. `finetune eval`: metrics.json, predictions.csv (path, target, prediction, error) and
predicted_vs_true.png.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score

from ..atomic import write_atomic
from ..reporting.evaluation import METRICS_NAME, PREDICTIONS_NAME, VAL_REPORT_NAME, summary
from ..reporting.plots import save_image_grid, save_predicted_vs_true
from ..reporting.review import HARD_EXAMPLES_JSON, HARD_EXAMPLES_PNG, TEST_METRICS_NAME

PREDICTED_VS_TRUE_NAME = "predicted_vs_true.png"  # eval's; the run directory's is val_predicted_vs_true.png


def kept(results: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, predictions, targets) of the readable images."""
    keep = ~results["label"].isnan()
    return results["loss"][keep].float(), results["pred"][keep].double(), results["label"][keep].double()


def regression_metrics(results: dict, prefix: str) -> dict:
    """{prefix}_loss (standardised, as trained), _mae, _rmse (the user's units), _r2 (None for fewer than two
    images or targets that do not vary) and _images."""
    losses, pred, label = kept(results)
    n = len(label)
    out = {f"{prefix}_loss": None, f"{prefix}_mae": None, f"{prefix}_rmse": None, f"{prefix}_r2": None,
           f"{prefix}_images": n}
    if not n:
        return out
    out.update({f"{prefix}_loss": round(losses.mean().item(), 6),
                f"{prefix}_mae": round(mean_absolute_error(pred, label).item(), 6),
                f"{prefix}_rmse": round(mean_squared_error(pred, label, squared=False).item(), 6)})
    if n >= 2 and label.var() > 0:
        out[f"{prefix}_r2"] = round(r2_score(pred, label).item(), 6)
    return out


def describe(metrics: dict, prefix: str = "") -> str:
    """"MAE 0.3120 (RMSE 0.4500, R² 0.912)" from `regression_metrics` (`prefix` "": a report's keys)."""
    def number(key: str, digits: str = ".4f") -> str:
        value = metrics.get(f"{prefix}_{key}" if prefix else key)
        return "-" if value is None else format(value, digits)
    return f"MAE {number('mae')} (RMSE {number('rmse')}, R² {number('r2', '.3f')})"


def score_regression_after_training(predict: Callable[[Any], dict], splits, eval_view: Callable, hard_examples: int,
                                    folder: Path | None, best_epoch: int, unit: str) -> dict | None:
    """With the best epoch's weights: test_metrics.json, val_report.json, val_predicted_vs_true.png, and the
    hard examples (the images with the largest error, train then val)."""
    test = None
    if splits.test is not None:
        test = regression_metrics(predict(eval_view(splits.test, None, "test")), "test")
        if folder is not None:
            write_atomic(folder / TEST_METRICS_NAME, json.dumps({"epoch": best_epoch, **test}, indent=2))
    val_view = eval_view(splits.val, splits.val_indices, "val")
    val = predict(val_view)
    if folder is not None:
        report = {key.removeprefix("report_"): value for key, value in regression_metrics(val, "report").items()}
        write_atomic(folder / VAL_REPORT_NAME, json.dumps({"split": "val", "epoch": best_epoch, **report}, indent=2))
        _, pred, label = kept(val)
        save_predicted_vs_true(label.tolist(), pred.tolist(), folder / f"val_{PREDICTED_VS_TRUE_NAME}",
                               f"val, epoch {best_epoch}: {describe(report)}", unit)
    if hard_examples:
        train_view = eval_view(splits.train, splits.train_indices, "train")
        entries, images = {}, []
        for split, base, view, results in (("train", splits.train, train_view, predict(train_view)),
                                           ("val", splits.val, val_view, val)):
            positions = largest_errors(results, hard_examples)
            entries[split] = [{"split": split, "index": int(view.indices[p]), "image": view.name(p),
                               "given": round(float(results["label"][p]), 6),
                               "predicted": round(float(results["pred"][p]), 6),
                               "error": round(float(results["pred"][p] - results["label"][p]), 6)} for p in positions]
            images += [base[view.indices[p]][0] for p in positions] if folder is not None else []
        if folder is not None:
            save_hard_examples(entries, images, folder)
    return test


def largest_errors(results: dict, k: int) -> list[int]:
    """Positions of the `k` largest absolute errors, largest first, leaving out unreadable images."""
    errors = (results["pred"].double() - results["label"].double()).abs().nan_to_num(nan=-1.0)
    k = min(k, int((~results["label"].isnan()).sum()))
    return errors.topk(k).indices.tolist() if k > 0 else []


def save_hard_examples(entries: dict[str, list[dict]], images: list, folder: Path) -> None:
    write_atomic(folder / HARD_EXAMPLES_JSON, json.dumps(
        {"about": "largest errors after training (best epoch, eval transform): check their targets first",
         **entries}, indent=2))
    shown = [e for split in entries for e in entries[split]]
    captions = [f"{e['split']} {e['index']}: given {e['given']:.4g}\npredicted {e['predicted']:.4g}" for e in shown]
    save_image_grid(images, captions, folder / HARD_EXAMPLES_PNG,
                    title="largest error first, train then val: review these targets")


def save_regression_evaluation(folder: Path, results: dict, view, unit: str, about: dict) -> tuple[dict, str]:
    """`finetune eval` of a regression run: metrics.json, predictions.csv (path, target, prediction, error:
    prediction - target) and predicted_vs_true.png. Returns the report and its summary."""
    report = {key.removeprefix("eval_"): value for key, value in regression_metrics(results, "eval").items()}
    keep = ~results["label"].isnan()
    report["unreadable"] = [view.name(p) for p in torch.nonzero(~keep).flatten().tolist()]
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / METRICS_NAME, json.dumps({**about, **report}, indent=2))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "target", "prediction", "error"])
    for p in torch.nonzero(keep).flatten().tolist():
        target, predicted = float(results["label"][p]), float(results["pred"][p])
        writer.writerow([view.name(p), f"{target:.6g}", f"{predicted:.6f}", f"{predicted - target:.6f}"])
    write_atomic(folder / PREDICTIONS_NAME, out.getvalue())
    _, pred, label = kept(results)
    headline = f"{report['images']} images: {describe(report)}"
    save_predicted_vs_true(label.tolist(), pred.tolist(), folder / PREDICTED_VS_TRUE_NAME, headline, unit)
    return report, summary(report, headline)
