"""Where a run stands: one frozen record, the only thing the loop carries from update to update besides
the session's objects, saved in every checkpoint as `trainer_state.json` and checked in one place when a
checkpoint is read back.

The JSON keys are those finetune 0.1 wrote (`step` for the update count, `best_val_acc` for the selection
metric's best value), so its checkpoints still resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EarlyStopCounters:
    """train.early_stop's memory: the metric's best value so far, its epoch, and the epochs since."""
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0


@dataclass(frozen=True)
class TrainState:
    epoch: int = 0  # epochs finished; inside an epoch (epoch_updates > 0): the 0-based epoch under way
    update: int = 0  # optimizer updates done since the start of the run
    phase: int = 1  # the unfreezing phase the next update trains in
    best_metric: float | None = None  # the selection metric's best validation value so far; None: no epoch yet
    best_epoch: int = 0  # 1-based epoch of that value; 0: none yet
    best_from: str = "model"  # whose weights the export holds: "model" or "ema" (its moving average)
    epoch_updates: int = 0  # a checkpoint inside an epoch: its updates so far (0: at an epoch's end)
    epoch_losses: tuple[float, ...] = ()  # ... and their losses, so the epoch's train_loss comes out the same
    stopped_early: bool = False  # train.early_stop ended training: only scoring is left
    early_stop: EarlyStopCounters | None = None  # None: early stopping is off

    def replace(self, **changes: Any) -> "TrainState":
        return dataclasses.replace(self, **changes)

    @property
    def mid_epoch(self) -> bool:
        return self.epoch_updates > 0

    def to_json(self) -> dict:
        data = {"epoch": self.epoch, "step": self.update, "phase": self.phase,
                "best_val_acc": -1.0 if self.best_metric is None else self.best_metric,
                "best_epoch": self.best_epoch, "best_from": self.best_from}
        if self.mid_epoch:
            data |= {"epoch_updates": self.epoch_updates, "epoch_losses": list(self.epoch_losses)}
        if self.early_stop is not None:
            data |= {"stopped_early": self.stopped_early, "early_stop": dataclasses.asdict(self.early_stop)}
        return data

    @classmethod
    def from_json(cls, data: Any) -> "TrainState":
        """The state a checkpoint saved; raises ValueError saying what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError("it is not a JSON object")
        data = {"phase": 1, "best_from": "model", "epoch_updates": 0, "epoch_losses": [], **data}
        wrong = [k for k in ("epoch", "step", "best_epoch", "phase", "epoch_updates") if type(data.get(k)) is not int]
        if wrong or type(data.get("best_val_acc")) not in (int, float):
            raise ValueError(f"it lacks whole numbers for {', '.join(wrong) or 'best_val_acc'}")
        losses = data["epoch_losses"]
        if not isinstance(losses, list) or not all(type(x) in (int, float) for x in losses):
            raise ValueError("it has no valid epoch_losses")
        if data["best_from"] not in ("model", "ema"):
            raise ValueError(f"best_from is {data['best_from']!r}, not model or ema")
        within = data["epoch_updates"]
        if (within < 0 or data["epoch"] < (0 if within else 1) or data["step"] < 0
                or not 0 <= data["best_epoch"] <= data["epoch"] or data["phase"] < 1):
            raise ValueError(f"it holds impossible values (epoch {data['epoch']}, step {data['step']}, best epoch "
                             f"{data['best_epoch']}, phase {data['phase']})")
        return cls(epoch=data["epoch"], update=data["step"], phase=data["phase"],
                   best_metric=float(data["best_val_acc"]) if data["best_epoch"] else None, best_epoch=data["best_epoch"],
                   best_from=data["best_from"], epoch_updates=within, epoch_losses=tuple(map(float, losses)),
                   stopped_early=bool(data.get("stopped_early")), early_stop=_counters(data.get("early_stop")))


def _counters(saved: Any) -> EarlyStopCounters | None:
    if not isinstance(saved, dict):
        return None
    best, best_epoch, bad = saved.get("best"), saved.get("best_epoch"), saved.get("bad_epochs")
    if (best is not None and type(best) not in (int, float)) or type(best_epoch) is not int or type(bad) is not int:
        raise ValueError("its early_stop counters are not numbers")
    return EarlyStopCounters(best, best_epoch, bad)
