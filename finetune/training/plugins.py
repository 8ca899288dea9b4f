"""The plug-in points of the Python API: a model, a loss and extra metrics of one's own, passed as Python
objects (`finetune.train(recipe, model=..., loss=..., metrics=...)`), never named in a recipe. They travel
to the session as one frozen `Plugins`.

- model: any nn.Module from images to logits (model/custom.py checks it; model/groups.py finds its head).
- loss: `(logits, targets) -> scalar tensor`, the mean over the micro-batch, used for every training update
  in place of the built-in loss (train.label_smoothing and class_weights are then not applied), with the
  targets that loss would get (class indices; multi-hot rows for task multi_label; soft rows under mixup).
  Validation's val_loss stays the built-in one, so runs with different losses compare on one scale; to
  track your loss on validation too, pass it among the metrics.
- metrics: callables `(logits, targets) -> number`, called once per validation on every process with the
  whole validation set's logits (float32, N x classes) and targets (N, or N x classes multi-hot), gathered
  over processes; each
  lands in metrics.jsonl as val_<name> (ema_val_<name> for the moving average), name = the function's
  __name__, or the key when a dict is passed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..data.samples import IGNORE_LABEL
from ..errors import FinetuneError
from ..model.custom import backbone_label

# What reporting/metrics.py and reporting/multilabel.py already write as val_<name>: a metric of one's own
# may not take these names (score_metrics also refuses any other name a run already wrote).
BUILT_IN_METRICS = {"loss", "acc", "balanced_acc", "per_class_acc", "images", "map", "f1_micro", "f1_macro",
                    "exact_match", "per_class_ap"}

Metric = Callable[[torch.Tensor, torch.Tensor], Any]


@dataclass(frozen=True)
class Plugins:
    model: nn.Module | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    metrics: Mapping[str, Metric] = field(default_factory=dict)  # name -> metric, in the order given

    def recipe_overrides(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """With a model of one's own, model.backbone says what it is (unless the `given` overrides name it):
        its timm architecture when timm built it, else custom:ClassName, so the saved recipe never names a
        timm model that did not train."""
        if self.model is None or "model.backbone" in given:
            return {}
        return {"model.backbone": backbone_label(self.model)}


def build_plugins(model: Any = None, loss: Any = None, metrics: Any = None) -> Plugins:
    """Check what `train` was given and name the metrics. TypeError for the wrong kind of object (a
    programming error), as Python does for a wrong argument."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model= takes a torch.nn.Module (or a dict of model.* recipe overrides), not "
                        f"{type(model).__name__}")
    if loss is not None:
        if not callable(loss):
            raise TypeError(f"loss= takes a callable (logits, targets) -> scalar tensor, not {type(loss).__name__}")
        if isinstance(loss, nn.Module) and any(p.requires_grad for p in loss.parameters()):
            raise FinetuneError(f"the loss you passed ({type(loss).__name__}) has trainable parameters, which no "
                                "optimizer group would hold; move them into the model (and its head), or set "
                                "requires_grad=False on them.")
    return Plugins(model, loss, _named_metrics(metrics))


def plugins_from_arguments(model: Any, loss: Any, metrics: Any,
                           kw_overrides: dict[str, Any]) -> tuple[Plugins, dict[str, Any]]:
    """The API's plug-in arguments, checked, and its keyword overrides: `model` given as a dict is the
    recipe's model section (train(r, model={"backbone": ...})), as it was before plug-ins."""
    if isinstance(model, dict):
        return build_plugins(None, loss, metrics), {**kw_overrides, "model": model}
    return build_plugins(model, loss, metrics), kw_overrides


def _named_metrics(metrics: Any) -> dict[str, Metric]:
    if metrics is None:
        return {}
    if callable(metrics):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        items = list(metrics.items())
    elif isinstance(metrics, (list, tuple)):
        items = [(getattr(m, "__name__", None), m) for m in metrics]
    else:
        raise TypeError(f"metrics= takes a callable, a list of callables or a dict name -> callable, not "
                        f"{type(metrics).__name__}")
    named: dict[str, Metric] = {}
    for name, metric in items:
        if not callable(metric):
            raise TypeError(f"metrics: {name!r} is {type(metric).__name__}, not a callable (logits, targets) -> number")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name == "<lambda>":
            raise FinetuneError(f"metrics: {name!r} is not a name metrics.jsonl can use as val_<name>; pass a dict, "
                                "metrics={'my_name': fn}, or a function defined with def (letters, digits, _).")
        if name in BUILT_IN_METRICS or name in named:
            taken = "finetune's own val_" + name if name in BUILT_IN_METRICS else "another metric's name"
            raise FinetuneError(f"metrics: {name!r} is taken ({taken}); pass a dict to name it otherwise, "
                                f"metrics={{'my_{name}': fn}}.")
        named[name] = metric
    return named


class UserLoss(nn.Module):
    """The loss of one's own as the session's criterion: an nn.Module (the loop moves it to the device; a loss
    that is itself a module, with weights in buffers, moves along), checked to give one number."""

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.loss = loss
        self.name = getattr(loss, "__name__", type(loss).__name__)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = self.loss(logits, targets)
        if not isinstance(value, torch.Tensor) or value.ndim != 0:  # shape is host metadata: no wait for the device
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise FinetuneError(f"the loss you passed ({self.name}) returned {got}; it must return one scalar tensor, "
                                "the mean over the batch (e.g. reduction='mean'), with its graph for the backward.")
        return value


def score_metrics(metrics: Mapping[str, Metric], logits: torch.Tensor, targets: torch.Tensor, prefix: str,
                  taken: Mapping[str, Any] = {}) -> dict:
    """{prefix}_<name>: each metric on the whole split's gathered logits and targets (class indices [N], or
    multi-hot [N, C] for task multi_label; images whose file was unreadable, labelled IGNORE_LABEL, left
    out), as a float. `taken`: the keys already written, which a metric may not overwrite."""
    keep = targets != IGNORE_LABEL
    if keep.ndim == 2:  # multi-hot: an ignored image is a whole row of IGNORE_LABEL
        keep = keep.all(dim=1)
    logits, targets = logits[keep], targets[keep]
    scores = {}
    for name, metric in metrics.items():
        if f"{prefix}_{name}" in taken:
            raise FinetuneError(f"metrics: {name!r} would overwrite finetune's own {prefix}_{name}; pass a dict to "
                                f"name it otherwise, metrics={{'my_{name}': fn}}.")
        value = metric(logits, targets)
        try:
            number = float(value.item() if isinstance(value, torch.Tensor) else value)
        except (TypeError, ValueError, RuntimeError):
            raise FinetuneError(f"metrics: {name} returned {type(value).__name__}, not a number; return a float "
                                "or a one-element tensor.") from None
        scores[f"{prefix}_{name}"] = number if math.isfinite(number) else None  # JSON has no NaN
    return scores
