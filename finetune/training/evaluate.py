"""Scoring a model over a loader on every process: per-sample results gathered so that each image of the
dataset counts exactly once (Accelerate's `gather_for_metrics` drops the duplicates that pad the last
batch of a shard), and the metrics computed from them. The accelerator is passed in.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..data.loaders import build_loader
from ..reporting.metrics import classification_metrics
from ..reporting.multilabel import multi_label_metrics
from .inputs import model_inputs
from .multilabel import multi_label_results
from .plugins import score_metrics
from .session import Session

TOP_K = 5  # the classes kept per image (top-5 accuracy, calibration): a few numbers, not all C probabilities
RESULT_KEYS = ("loss", "pred", "pred_prob", "given_prob", "label", "top_k", "top_k_prob")


@torch.no_grad()
def predict_all(s: Session, accelerator: Accelerator, loader) -> dict:
    """Per-sample loss, prediction, its probability, the given label's probability, the label, and the
    `TOP_K` most probable classes with their probabilities, over exactly the loader's dataset in its order."""
    s.model.eval()
    # A progress bar on the main process (validation and the scoring after training take a while on a
    # CPU); it disappears when done, and TQDM_DISABLE=1 silences it.
    batches = tqdm(loader, desc="scoring", unit="batch", leave=False, dynamic_ncols=True,
                   **({} if getattr(accelerator, "is_main_process", True) else {"disable": True}))
    return predict_batches(s.model, accelerator,
                           (model_inputs(batch, s.eval_augment, s.runtime.channels_last) for batch in batches),
                           keep_logits=bool(s.metrics))


@torch.no_grad()
def predict_batches(model: torch.nn.Module, accelerator: Accelerator, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    keep_logits: bool = False) -> dict:
    """`predict_all` over (images, labels) batches of a prepared loader: RESULT_KEYS -> one tensor each,
    gathered from every process (gather_for_metrics drops the padding duplicates). keep_logits: "logits"
    too, N x classes, for metrics of one's own (plugins.py); only then, as they are C numbers per image."""
    parts: dict[str, list] = {key: [] for key in RESULT_KEYS + (("logits",) if keep_logits else ())}
    for images, labels in batches:
        logits = model(images).float()
        if labels.ndim == 2:  # multi-hot targets (task multi_label): a sigmoid per label, multilabel.py's keys
            results = multi_label_results(logits, labels) | ({"logits": logits} if keep_logits else {})
            parts = {key: parts.get(key, []) for key in results}
            for key, value in zip(results, accelerator.gather_for_metrics(tuple(results.values()))):
                parts[key].append(value)
            continue
        probs = logits.softmax(dim=-1)
        pred_prob, pred = probs.max(dim=-1)
        top_k_prob, top_k = probs.topk(min(TOP_K, probs.shape[-1]), dim=-1)
        given_prob = probs.gather(1, labels.clamp(min=0)[:, None])[:, 0]  # ignored labels (-100) read class 0
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")  # 0 for ignored labels
        values = (loss, pred, pred_prob, given_prob, labels, top_k, top_k_prob) + ((logits,) if keep_logits else ())
        for key, value in zip(parts, accelerator.gather_for_metrics(values)):
            parts[key].append(value)
    return {key: torch.cat(values).cpu() for key, values in parts.items()}


def evaluate(s: Session, accelerator: Accelerator, loader, class_names: list[str], prefix: str = "val") -> dict:
    """Loss, top-1, balanced and per-class accuracy over exactly the loader's dataset."""
    results = predict_all(s, accelerator, loader)
    if "probs" in results:  # task multi_label: a sigmoid per label (multilabel.py)
        metrics = multi_label_metrics(results, class_names, prefix, s.threshold)
    else:
        metrics = classification_metrics(results["loss"], results["pred"], results["label"], class_names, prefix)
    if s.metrics:  # of one's own, on every process with the whole split (plugins.py)
        metrics.update(score_metrics(s.metrics, results["logits"], results["label"], prefix, taken=metrics))
    return metrics


def validate(s: Session, accelerator: Accelerator, loader, class_names: list[str]) -> tuple[dict, str, float]:
    """The model's val metrics and, with a moving average, the average's (`ema_val_*`); which of the two is
    the candidate for export ("model" or "ema") and its accuracy (multi-label: its mAP)."""
    val = evaluate(s, accelerator, loader, class_names)
    if s.ema is not None:  # the average, validated like the model
        val.update(evaluate(dataclasses.replace(s, model=s.ema.module), accelerator, loader, class_names, "ema_val"))
    key = "map" if "val_map" in val else "acc"  # multi-label runs select by val mAP
    candidate = "ema" if s.ema is not None and val[f"ema_val_{key}"] > val[f"val_{key}"] else "model"
    return val, candidate, val[f"ema_val_{key}" if candidate == "ema" else f"val_{key}"]


def eval_loader(s: Session, accelerator: Accelerator, view):
    """A prepared loader over `view` (a split with the eval transform), batched like validation; used once,
    so its workers end with it."""
    return accelerator.prepare(build_loader(view, s.batching.per_device, False, s.runtime.workers,
                                            s.runtime.pin_memory, collate_fn=s.collate, persistent=False))
