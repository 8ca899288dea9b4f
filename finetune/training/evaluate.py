"""Scoring a model over a loader on every process: per-sample results gathered so that each image of the
dataset counts exactly once (Accelerate's `gather_for_metrics` drops the duplicates that pad the last
batch of a shard), and the metrics computed from them. The accelerator is passed in: only the loop
imports Accelerate.
"""

from __future__ import annotations

import dataclasses

import torch

from ..reporting.metrics import classification_metrics
from .inputs import model_inputs
from .session import Session


@torch.no_grad()
def predict_all(s: Session, accelerator, loader) -> dict:
    """Per-sample loss, prediction, its probability, the given label's probability and the label, over
    exactly the loader's dataset in its order (gather_for_metrics drops the padding duplicates)."""
    s.model.eval()
    parts: dict[str, list] = {"loss": [], "pred": [], "pred_prob": [], "given_prob": [], "label": []}
    for batch in loader:
        images, labels = model_inputs(batch, s.eval_augment, s.runtime.channels_last)
        logits = s.model(images).float()
        probs = logits.softmax(dim=-1)
        pred_prob, pred = probs.max(dim=-1)
        given_prob = probs.gather(1, labels.clamp(min=0)[:, None])[:, 0]  # ignored labels (-100) read class 0
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")  # 0 for ignored labels
        for key, value in zip(parts, accelerator.gather_for_metrics((loss, pred, pred_prob, given_prob, labels))):
            parts[key].append(value)
    return {key: torch.cat(values).cpu() for key, values in parts.items()}


def evaluate(s: Session, accelerator, loader, class_names: list[str], prefix: str = "val") -> dict:
    """Loss, top-1, balanced and per-class accuracy over exactly the loader's dataset."""
    results = predict_all(s, accelerator, loader)
    return classification_metrics(results["loss"], results["pred"], results["label"], class_names, prefix)


def validate(s: Session, accelerator, loader, class_names: list[str]) -> tuple[dict, str, float]:
    """The model's val metrics and, with a moving average, the average's (`ema_val_*`); which of the two is
    the candidate for export ("model" or "ema") and its accuracy."""
    val = evaluate(s, accelerator, loader, class_names)
    if s.ema is not None:  # the average, validated like the model
        val.update(evaluate(dataclasses.replace(s, model=s.ema.module), accelerator, loader, class_names, "ema_val"))
    candidate = "ema" if s.ema is not None and val["ema_val_acc"] > val["val_acc"] else "model"
    return val, candidate, val["ema_val_acc" if candidate == "ema" else "val_acc"]
