"""`Task`: what differs between one class per image, label sets and numbers, as one object the loop, the
data pipeline, reporting and the export ask instead of testing which task a run has.

A task reads its targets (`OneClassPerImage`'s methods, data/targets.py, by default), builds the training
loss, turns a batch's outputs into per-image results and those into metrics (the selection metric names
the best epoch, `better` says which way), prints the epoch line and the run's summary, scores the best
epoch after training, says what `predict` returns and what the export records in config.json. The
defaults here serve a task of one's own (finetune.train(recipe, task=...)); the built-in tasks
(single_label.py, multi_label.py, regression.py) override what they do differently.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..atomic import write_atomic
from ..data.samples import IGNORE_LABEL
from ..data.splits import Splits
from ..data.targets import OneClassPerImage
from ..recipe.schema import TrainConfig
from ..reporting.evaluation import METRICS_NAME
from ..reporting.plots import CurveMetric
from ..reporting.review import TEST_METRICS_NAME

EXPORTED = {None: "", "model": " (best, exported)", "ema": " (best, EMA exported)"}  # the epoch line's mark
Predict = Callable[[Any], dict]  # a split view -> its per-image results, gathered from every process


class Task(OneClassPerImage, ABC):
    """One kind of target. Subclass a built-in task to change a part of it, or this to write a new one:
    `build_loss`, `results` and `metrics` are required; reading targets defaults to one class per image."""

    name: ClassVar[str] = "custom"  # the recipe's `task` for a built-in one; config.json's "task"
    selection: ClassVar[str] = "acc"  # metrics.jsonl's val_<selection> picks the best epoch and the export
    selection_name: ClassVar[str] = "acc"  # how the epoch line and the summary name it
    lower_is_better: ClassVar[bool] = False  # a loss or an error: the best epoch has the lowest
    percent: ClassVar[bool] = True  # the selection metric is a share, printed as a percentage
    # The head can be fitted as a softmax regression on cached features (data.feature_cache, optim lbfgs,
    # train.head_init probe): only for one class per image.
    linear_probe: ClassVar[bool] = False
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "images")  # the val_<name> keys `metrics` writes
    run_files: ClassVar[tuple[str, ...]] = ()  # files its reports add to a run directory (--overwrite removes them)

    def fit(self, splits: Splits) -> Task:
        """The task ready for a run on these splits (data/splits.py; a regression standardises by the mean
        and standard deviation of the training targets); the task itself when nothing depends on them."""
        return self

    @abstractmethod
    def build_loss(self, train_targets: Sequence, num_classes: int, tc: TrainConfig, mixing: bool) -> nn.Module:
        """(outputs [B, C], batched targets) -> the mean loss of a micro-batch. `mixing`: train.mixup/cutmix
        are on and the targets come as soft [B, C] rows (only where the recipe checks allow it)."""

    @abstractmethod
    def results(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch's per-image results, each a tensor with the batch as first dimension (gathered over
        processes, then concatenated): "loss" and "label" at least; unreadable images kept, marked."""

    def kept(self, labels: torch.Tensor) -> torch.Tensor:
        """Which images of a split count: not the unreadable ones, whose slot another image took."""
        return labels != IGNORE_LABEL

    @abstractmethod
    def metrics(self, results: dict, class_names: list[str], prefix: str) -> dict:
        """{prefix}_<name> for every name of `metric_names`, from a whole split's results."""

    def better(self, value: float | None, best: float | None) -> bool:
        """Whether a selection metric of `value` beats `best` (None: nothing yet)."""
        if value is None:
            return False
        return best is None or (value < best if self.lower_is_better else value > best)

    def format_value(self, value: float | None) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.2f}%" if self.percent else f"{value:.4f}"

    def describe_head(self, class_names: list[str]) -> str:
        """What the head outputs, for the set-up printout."""
        return f"{len(class_names)} outputs"

    def curve_metric(self) -> CurveMetric:
        """What curves.png draws next to the loss."""
        return CurveMetric(self.selection, self.selection_name, self.selection_name, f"val {self.selection_name}",
                           self.percent, loss="loss")

    def format_epoch(self, record: dict, epochs: int) -> str:
        """metrics.jsonl's record of an epoch as the line the loop prints."""
        key = f"val_{self.selection}"
        ema = f" | EMA {self.selection_name} {self.format_value(record.get('ema_' + key))}" if "ema_" + key in record \
            else ""
        loss = record["val_loss"]
        return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} | val loss "
                f"{'-' if loss is None else f'{loss:.4f}'} {self.selection_name} {self.format_value(record.get(key))}"
                f"{ema}{EXPORTED[record['exported']]} | {record['epoch_seconds']:.1f}s")

    def summary(self, best: float, best_epoch: int, test: dict | None) -> str:
        """The run's result as the loop's last line says it (after "done: ")."""
        text = f"best val {self.selection_name} {self.format_value(best)} at epoch {best_epoch}"
        if test:
            text += f"; test {self.selection_name} {self.format_value(test.get(f'test_{self.selection}'))}"
        return text

    def score_after_training(self, predict: Predict, splits: Splits, eval_view: Callable, hard_examples: int,
                             folder: Path | None, best_epoch: int) -> dict | None:
        """With the best epoch's weights loaded: the test metrics (test_metrics.json in `folder`, None on
        every process but the main one), and whatever reports the task writes of val. Returns the test
        metrics (None without test data)."""
        if splits.test is None:
            return None
        test = self.metrics(predict(eval_view(splits.test, None, "test")), splits.class_names, "test")
        if folder is not None:
            write_atomic(folder / TEST_METRICS_NAME, json.dumps({"epoch": best_epoch, **test}, indent=2))
        return test

    def match(self, samples, label_names: list[str], run: str):
        """`finetune eval`'s data aligned onto the run's classes."""
        return self.align(samples, label_names)

    def evaluate(self, folder: Path, results: dict, view, class_names: list[str], about: dict) -> tuple[dict, str]:
        """`finetune eval`: write the report into `folder` (metrics.json at least); return it and a summary."""
        report = {key.removeprefix("eval_"): value for key, value in self.metrics(results, class_names, "eval").items()}
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / METRICS_NAME, json.dumps({**about, **report}, indent=2))
        return report, ", ".join(f"{key} {value:.4g}" for key, value in report.items() if isinstance(value, float))

    def predictions(self, logits: torch.Tensor, label_names: list[str], top_k: int, threshold: float | None) -> list:
        """What `predict` returns per image, from the model's outputs [N, C]: here the outputs themselves."""
        return logits.tolist()

    def format_prediction(self, prediction: Any) -> str:
        """One image's prediction as `finetune predict` prints it."""
        return str(prediction)

    def prediction_table(self, predictions: list) -> tuple[list[str], list[list[str]]]:
        """`finetune predict --csv`'s columns after `path`, and each image's cells."""
        return ["prediction"], [[json.dumps(p)] for p in predictions]

    def export_config(self) -> dict:
        """What config.json records besides timm's keys, for `finetune.load` to rebuild the task."""
        return {"task": self.name}

    def from_export(self, config: dict) -> Task:
        """The task as an export's config.json recorded it (what `export_config` wrote), for `finetune.load`."""
        return self

    def output_module(self, model: nn.Module) -> nn.Module:
        """What an ONNX or TorchScript file computes: the model, or the model with what predict adds that
        a runtime cannot read from config.json (a regression's units)."""
        return model

    def card_columns(self) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
        """The model card's two metrics: (metrics.jsonl key without val_, table heading, name in prose),
        the selection metric first."""
        return (self.selection, self.selection_name, self.selection_name), ("loss", "loss", "loss")

    def card_subject(self, count: int, listed: str) -> str:
        """What the model card says the model is, after its architecture; `listed`: its label names."""
        return f"image classifier for {count} classes: {listed}"

    def card_usage(self) -> tuple[str, str]:
        """The model card's snippet: what follows `model(x)`, and what it prints."""
        return "", "probs"
