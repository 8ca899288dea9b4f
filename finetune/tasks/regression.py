"""`task: regression`: a number per image (a count, an age, a price, a score). The head has one output.

Targets (numbers.py reads them) are standardised for training: the model learns (y - mean) / std with the
mean and standard deviation of the training targets, so one learning rate suits a count of shapes and a
price in dollars alike, and the zero-initialised head starts at the mean. Everything reported is in the
user's units again: MAE (it picks the best epoch; lower is better), RMSE and R² every epoch
(regression_reports.py), `predict` and `eval`. The loss is `train.loss`: mse (the default) or huber
(quadratic within one standard deviation of the target, linear beyond, so a few wrong targets pull less).
`train.label_smoothing` has no meaning here and is not applied; `train.class_weights`, the balanced
sampler, mixing, the linear probe and lbfgs are refused with the recipe.

The export records the standardisation in config.json (target_mean, target_std), which `finetune.load`
applies; an ONNX or TorchScript file has it baked into its graph (`output_module`), so its output is in
the user's units with nothing to apply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import numpy as np
import torch
from torch import nn

from ..data.samples import ImageSamples
from ..data.splits import Splits
from ..errors import FinetuneError
from ..recipe.schema import DataConfig, TrainConfig
from ..reporting.plots import CurveMetric
from .base import EXPORTED, Predict, Task
from .numbers import (
    align_numbers,
    count_numbers,
    load_numbers,
    rank_bins,
    summarise,
    wrap_numbers_in_memory,
)
from .regression_reports import (
    PREDICTED_VS_TRUE_NAME,
    describe,
    regression_metrics,
    save_regression_evaluation,
    score_regression_after_training,
)

HUBER_DELTA = 1.0  # in standard deviations of the training targets: quadratic within, linear beyond


@dataclass(frozen=True)
class Regression(Task):
    """One number per image, learnt standardised by the training targets' `mean` and `std` (set by `fit`)."""
    loss: Literal["mse", "huber"] = "mse"  # train.loss
    mean: float = 0.0
    std: float = 1.0
    unit: str = "value"  # what the number is: its column's name

    name: ClassVar[str] = "regression"
    selection: ClassVar[str] = "mae"
    selection_name: ClassVar[str] = "MAE"
    lower_is_better: ClassVar[bool] = True
    percent: ClassVar[bool] = False
    min_classes: ClassVar[int] = 1
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "mae", "rmse", "r2", "images")
    run_files: ClassVar[tuple[str, ...]] = ("val_" + PREDICTED_VS_TRUE_NAME,)

    # -- targets: numbers (numbers.py)

    def load_source(self, text: str, cfg: DataConfig, class_names: list[str] | None = None) -> ImageSamples:
        return load_numbers(text, cfg, class_names)

    def wrap_in_memory(self, data: Any, class_names: Sequence[str] | None, cfg: DataConfig, what: str) -> ImageSamples:
        return wrap_numbers_in_memory(data, class_names, cfg, what)

    def align(self, samples: ImageSamples, class_names: list[str]) -> ImageSamples:
        return align_numbers(samples, class_names)

    def check_train(self, train: ImageSamples) -> None:
        values = np.asarray(train.targets, dtype=np.float64)
        if len(values) < 2 or not values.std() > 0:
            raise FinetuneError(f"the training data {train.origin} has {len(values)} image(s), all with the number "
                                f"{values[0]:g}: there is nothing to learn (and no spread to standardise by). Give "
                                "training images whose numbers differ.")

    def stratify_keys(self, targets: Sequence[float], class_names: list[str]) -> list[int]:
        return rank_bins(targets)

    def count_targets(self, targets: Sequence[float], class_names: list[str]):
        return count_numbers(targets, class_names)

    def target_report(self, targets: Sequence[float], class_names: list[str]) -> dict:
        return {"targets": summarise(targets)}

    def format_target_report(self, split: str, report: dict) -> list[str]:
        t = report["targets"]
        if not t["images"]:
            return []
        return [f"{split}: numbers from {t['min']:g} to {t['max']:g}, mean {t['mean']:.4g}, std {t['std']:.4g}"]

    def imbalance_advice(self) -> str:
        return "nothing: one number per image has no classes to balance."

    # -- training and scoring

    def fit(self, splits: Splits) -> Regression:
        """Standardise by the images that train (not those split off for validation)."""
        values = np.asarray(splits.train_targets, dtype=np.float64)
        return dataclasses.replace(self, mean=float(values.mean()), std=float(values.std()),
                                   unit=splits.class_names[0])

    def build_loss(self, train_targets: Sequence[float], num_classes: int, tc: TrainConfig, mixing: bool) -> nn.Module:
        return RegressionLoss(self.loss, self.mean, self.std)

    def results(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per image: the loss as trained (standardised; 0 for an unreadable image), the prediction and the
        target in the user's units (NaN: unreadable)."""
        losses, _ = per_image_loss(logits, labels, self.loss, self.mean, self.std)
        return {"loss": losses, "pred": logits[:, 0].float() * self.std + self.mean, "label": labels.float()}

    def kept(self, labels: torch.Tensor) -> torch.Tensor:
        return ~labels.isnan()

    def metrics(self, results: dict, class_names: list[str], prefix: str) -> dict:
        return regression_metrics(results, prefix)

    def format_value(self, value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    def describe_head(self, class_names: list[str]) -> str:
        return (f"1 number ({self.unit}; learnt standardised: mean {self.mean:.4g}, std {self.std:.4g} of train, "
                f"{self.loss} loss)")

    def curve_metric(self) -> CurveMetric:
        return CurveMetric("mae", "MAE", f"MAE ({self.unit})", "val MAE (lower is better)", percent=False,
                           loss=f"{self.loss} (standardised)")

    def format_epoch(self, record: dict, epochs: int) -> str:
        ema = f" | EMA MAE {self.format_value(record['ema_val_mae'])}" if record.get("ema_val_mae") is not None else ""
        loss = record["val_loss"]
        return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} | val loss "
                f"{'-' if loss is None else f'{loss:.4f}'} {describe(record, 'val')}{ema}"
                f"{EXPORTED[record['exported']]} | {record['epoch_seconds']:.1f}s")

    def summary(self, best: float, best_epoch: int, test: dict | None) -> str:
        return (f"best val MAE {best:.4f} {self.unit} at epoch {best_epoch}"
                + (f"; test {describe(test, 'test')}" if test else ""))

    def score_after_training(self, predict: Predict, splits, eval_view: Callable, hard_examples: int,
                             folder: Path | None, best_epoch: int) -> dict | None:
        return score_regression_after_training(predict, splits, eval_view, hard_examples, folder, best_epoch,
                                               self.unit)

    def evaluate(self, folder: Path, results: dict, view, class_names: list[str], about: dict) -> tuple[dict, str]:
        return save_regression_evaluation(folder, results, view, self.unit, about)

    # -- using the export

    def predictions(self, logits: torch.Tensor, label_names: list[str], top_k: int,
                    threshold: float | None) -> list[float]:
        """Per image, its number in the user's units."""
        if threshold is not None:
            raise FinetuneError("a threshold applies to a multi-label model (task multi_label); this one predicts a "
                                "number per image.")
        return (logits[:, 0].double() * self.std + self.mean).tolist()

    def format_prediction(self, prediction: float) -> str:
        return f"{prediction:.4f}"

    def prediction_table(self, predictions: list) -> tuple[list[str], list[list[Any]]]:
        return ["prediction"], [[f"{p:.6f}"] for p in predictions]

    def export_config(self) -> dict:
        return {"task": self.name, "loss": self.loss, "target_mean": self.mean, "target_std": self.std,
                "target_name": self.unit}

    def from_export(self, config: dict) -> Regression:
        return dataclasses.replace(self, loss=str(config.get("loss", "mse")), mean=float(config["target_mean"]),
                                   std=float(config["target_std"]), unit=str(config.get("target_name", "value")))

    def output_module(self, model: nn.Module) -> nn.Module:
        return InUserUnits(model, self.mean, self.std)

    def card_columns(self) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
        return (("mae", "MAE", "MAE"), ("r2", "R²", "R²"))

    def card_subject(self, count: int, listed: str) -> str:
        return f"image regression model (one number per image: {listed})"

    def card_usage(self) -> tuple[str, str]:
        return f"[0, 0].item() * {self.std!r} + {self.mean!r}  # config.json's target_std, target_mean", \
            "labels[0], probs"


class RegressionLoss(nn.Module):
    """(outputs [B, 1], targets [B] in the user's units) -> the mean loss of the standardised targets over
    the readable images."""

    def __init__(self, kind: str, mean: float, std: float):
        super().__init__()
        self.kind, self.mean, self.std = kind, mean, std

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses, keep = per_image_loss(logits, targets, self.kind, self.mean, self.std)
        return losses.sum() / keep.sum().clamp(min=1)


def per_image_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str, mean: float,
                   std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(each image's loss [B], 0 for an unreadable one; which images count [B])."""
    keep = ~targets.isnan()
    standardised = ((targets.float() - mean) / std).nan_to_num(0.0)
    output = logits[:, 0].float()
    if kind == "huber":
        losses = nn.functional.huber_loss(output, standardised, reduction="none", delta=HUBER_DELTA)
    else:
        losses = (output - standardised).square()
    return losses * keep, keep


class InUserUnits(nn.Module):
    """A regression model whose output is in the user's units: what ONNX and TorchScript files compute."""

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images) * self.std + self.mean
