"""Early stopping (train.early_stop): the rule that ends a run after `patience` epochs in a row without
improvement of a validation metric, what it adds to metrics.jsonl and to the checkpoint's trainer state,
and the refusal to resume a run it ended.

The metric is read from the better of the model and its moving average, the pair the loop picks its export
from, so for val_acc "improved" means what "exported" means. A run that stops finishes like one that ran
every epoch: its export is still the best epoch's, and it is scored and described after training. The
trainer state records the counters, so a run killed and resumed before the stop counts on where it left off,
and `stopped_early`, so that a resume of a finished run is refused instead of training past its stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import FinetuneError
from ..recipe.schema import EarlyStopConfig
from ..reporting.evaluation import VAL_REPORT_NAME
from .state import EarlyStopCounters, TrainState

LOWER_IS_BETTER = ("val_loss", "val_mae", "val_rmse")  # losses and errors (of numbers: tasks/)


@dataclass
class EarlyStop:
    config: EarlyStopConfig | None  # None: off; every method then changes nothing
    best: float | None = None  # the metric's best value so far
    best_epoch: int = 0  # 1-based epoch of that value
    bad_epochs: int = 0  # epochs in a row since then without an improvement of more than min_delta
    stopped: bool = False

    def update(self, epoch: int, epochs: int, val: dict) -> bool:
        """Take epoch `epoch`'s (1-based, of `epochs`) validation record ({val_*, ema_val_*}); True when the run
        stops now, before its last epoch (a run that reaches it simply ends)."""
        if self.config is None:
            return False
        metric, delta = self.config.metric, self.config.min_delta
        lower = metric in LOWER_IS_BETTER
        values = [v for v in (val.get(metric), val.get("ema_" + metric)) if v is not None]
        value = (min if lower else max)(values) if values else None
        if value is not None and (self.best is None or (value < self.best - delta if lower else
                                                        value > self.best + delta)):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        self.stopped = self.bad_epochs >= self.config.patience and epoch < epochs
        return self.stopped

    def record(self) -> dict:
        """What each epoch's metrics.jsonl record says about early stopping (nothing when it is off)."""
        if self.config is None:
            return {}
        return {"epochs_without_improvement": self.bad_epochs, **({"stopped_early": True} if self.stopped else {})}

    def counters(self) -> EarlyStopCounters | None:
        """The counters for the checkpoint's trainer state (None when off)."""
        return None if self.config is None else EarlyStopCounters(self.best, self.best_epoch, self.bad_epochs)

    def resume(self, state: TrainState, run: Path) -> None:
        """Continue from a checkpoint's trainer state. Raises FinetuneError when the run already stopped early
        and finished: training on would go past the stop its recipe asked for. One killed between its stop
        and the end of its scoring after training (val_report.json is written then) is `stopped`: the loop
        trains no further epoch and only finishes that."""
        if state.stopped_early and (run / VAL_REPORT_NAME).is_file():
            raise FinetuneError(
                f"--resume {run}: this run stopped early after epoch {state.epoch} (train.early_stop) and is "
                f"finished: its export (the best epoch's, epoch {state.best_epoch}), scores and model card are in "
                "its directory. To train longer, start a new run (another --output, or --overwrite) with a larger "
                "train.early_stop.patience or train.early_stop: null.", raised_on_every_process=True)
        self.stopped = state.stopped_early
        if self.config is not None and state.early_stop is not None:
            self.best, self.best_epoch, self.bad_epochs = (state.early_stop.best, state.early_stop.best_epoch,
                                                           state.early_stop.bad_epochs)

    def describe(self, epochs: int) -> str:
        """The log line of the stop."""
        c = self.config
        best = f"{100 * self.best:.2f}%" if c.metric.endswith(("_acc", "_map")) else f"{self.best:.4g}"
        return (f"early stop: {c.metric} has not improved by more than {c.min_delta:g} for {self.bad_epochs} "
                f"epoch(s) (best {best} at epoch {self.best_epoch}); stopping after epoch "
                f"{self.best_epoch + self.bad_epochs} of {epochs}. The export holds the best epoch's weights.")
