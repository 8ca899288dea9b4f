"""Experiment trackers (`train.log_with`): what a run sends to TensorBoard, W&B, MLflow ... through
Accelerate's tracker support, which starts them on the main process only and closes them at
`accelerator.end_training()`.

Sent: the resolved recipe as hyperparameters (flattened to `section/key`), every update's loss and
every group's LR at that update (`train/loss`, `lr/<group>`, step = the update count), and every
epoch's numbers from its metrics.jsonl record (`val/acc`, `ema_val/acc`, `epoch/train_loss`, ...,
step = the update count at the epoch's end). The losses are read from the device only at the end of
an epoch, where the loop reads them anyway: tracking adds no wait for the device per update. The
accelerator is passed in (typed; only finetune/training imports Accelerate).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from ..recipe.load import recipe_to_dict
from ..recipe.schema import RecipeConfig

TENSORBOARD_FOLDER = "tensorboard"  # inside the run directory
PROJECT = "finetune"


def tracker_settings(config: RecipeConfig, run_dir: Path | None) -> dict:
    """Accelerator keyword arguments for the recipe's trackers (nothing when there are none)."""
    if not config.train.log_with:
        return {}
    return {"log_with": list(config.train.log_with),
            "project_dir": str(run_dir / TENSORBOARD_FOLDER) if run_dir is not None else None}


def start_tracking(accelerator: Accelerator, config: RecipeConfig, run_name: str) -> None:
    """Start the trackers (main process) with the recipe as hyperparameters."""
    if config.train.log_with:
        accelerator.init_trackers(PROJECT, config=_flat(recipe_to_dict(config)),
                                  init_kwargs={"wandb": {"name": run_name}})


def log_epoch(accelerator: Accelerator, config: RecipeConfig, record: dict, losses: list, lrs: list[dict]) -> None:
    """One epoch: each update's loss and LRs (`losses`, `lrs`: one per update, ending at record["step"]),
    then the epoch's scalar metrics."""
    if not config.train.log_with:
        return
    values = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in losses]).tolist() if losses else []
    first = record["step"] - len(values)
    for k, (loss, lr) in enumerate(zip(values, lrs)):
        accelerator.log({"train/loss": loss, **{f"lr/{name}": value for name, value in lr.items()}},
                        step=first + k + 1)
    numbers = {key: value for key, value in record.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step")}
    accelerator.log({_metric_name(key): value for key, value in numbers.items()}, step=record["step"])


def _metric_name(key: str) -> str:
    """metrics.jsonl's val_acc -> val/acc, ema_val_acc -> ema_val/acc, train_loss -> epoch/train_loss."""
    for prefix in ("ema_val_", "val_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return f"epoch/{key}"


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"train": {"epochs": 3}} -> {"train/epochs": 3}; lists and None as text (trackers take scalars)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "/"))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
