"""Scoring a model over a loader on every process: per-sample results gathered so that each image of the
dataset counts exactly once (Accelerate's `gather_for_metrics` drops the duplicates that pad the last
batch of a shard), and the metrics computed from them. What the results and metrics are is the task's
(tasks/). The accelerator is passed in.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..data.loaders import build_loader
from ..tasks import Task
from .inputs import model_inputs
from .plugins import score_metrics
from .session import Session


@torch.no_grad()
def predict_all(s: Session, accelerator: Accelerator, loader) -> dict:
    """The task's per-sample results (single-label: loss, prediction, its probability, the given label's
    probability, the label, the most probable classes) over exactly the loader's dataset in its order."""
    s.model.eval()
    # A progress bar on the main process (validation and the scoring after training take a while on a
    # CPU); it disappears when done, and TQDM_DISABLE=1 silences it.
    batches = tqdm(loader, desc="scoring", unit="batch", leave=False, dynamic_ncols=True,
                   **({} if getattr(accelerator, "is_main_process", True) else {"disable": True}))
    return predict_batches(s.model, accelerator,
                           (model_inputs(batch, s.eval_augment, s.runtime.channels_last) for batch in batches),
                           s.task, keep_logits=bool(s.metrics))


@torch.no_grad()
def predict_batches(model: torch.nn.Module, accelerator: Accelerator, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    task: Task, keep_logits: bool = False) -> dict:
    """`predict_all` over (images, labels) batches of a prepared loader: the task's result keys -> one tensor
    each, gathered from every process (gather_for_metrics drops the padding duplicates). keep_logits:
    "logits" too, N x classes, for metrics of one's own (plugins.py); only then, as they are C numbers per
    image."""
    parts: dict[str, list] = {}
    for images, labels in batches:
        logits = model(images).float()
        results = task.results(logits, labels) | ({"logits": logits} if keep_logits else {})
        for key, value in zip(results, accelerator.gather_for_metrics(tuple(results.values()))):
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values).cpu() for key, values in parts.items()}


def evaluate(s: Session, accelerator: Accelerator, loader, class_names: list[str], prefix: str = "val") -> dict:
    """The task's metrics (single-label: loss, top-1, balanced and per-class accuracy) over exactly the
    loader's dataset."""
    results = predict_all(s, accelerator, loader)
    metrics = s.task.metrics(results, class_names, prefix)
    if s.metrics:  # of one's own, on every process with the whole split (plugins.py)
        metrics.update(score_metrics(s.metrics, results["logits"], results["label"], prefix,
                                     s.task.kept(results["label"]), taken=metrics))
    return metrics


def validate(s: Session, accelerator: Accelerator, loader, class_names: list[str]) -> tuple[dict, str, float]:
    """The model's val metrics and, with a moving average, the average's (`ema_val_*`); which of the two is
    the candidate for export ("model" or "ema") and its selection metric (the task's: val acc, mAP, MAE)."""
    val = evaluate(s, accelerator, loader, class_names)
    if s.ema is not None:  # the average, validated like the model
        val.update(evaluate(dataclasses.replace(s, model=s.ema.module), accelerator, loader, class_names, "ema_val"))
    key = s.task.selection
    candidate = "ema" if s.ema is not None and s.task.better(val[f"ema_val_{key}"], val[f"val_{key}"]) else "model"
    return val, candidate, val[f"ema_val_{key}" if candidate == "ema" else f"val_{key}"]


def eval_loader(s: Session, accelerator: Accelerator, view):
    """A prepared loader over `view` (a split with the eval transform), batched like validation; used once,
    so its workers end with it."""
    return accelerator.prepare(build_loader(view, s.batching.per_device, False, s.runtime.workers,
                                            s.runtime.pin_memory, collate_fn=s.collate, persistent=False))
