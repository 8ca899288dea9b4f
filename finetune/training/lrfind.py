"""The LR range test behind `finetune lr-find` (Leslie Smith's test, as fastai runs it).

It trains the recipe's model from its starting weights for up to `steps` updates while the base LR
(`optim.lr`) grows exponentially from `start` to `end`. Every group keeps its plan ratio (head 10x, layer
decay, lr_mult, frozen groups at 0): the sweep multiplies every group's peak LR by the same number, so the
suggestion is a value for `optim.lr` and nothing else. The loss is smoothed by an exponential moving
average with bias correction; the sweep stops when the smoothed loss exceeds 4x its best. The suggestion
is the LR where the smoothed loss falls fastest against log(LR) (fastai's "steep" rule), ignoring the
first 10% of the sweep (noise of the first batches) and its last 5 points (the divergence).

The sweep runs the training loop's own session and `train_epoch` with only the schedule replaced, so it
sees the same updates as `finetune train` (global batch, micro-batches, class weights, precision, memory
layout, processes). It is a separate, disposable run: only the main process writes, and only into its
own new folder (a PNG and a JSON file); it never touches a training run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from accelerate import Accelerator

from ..atomic import write_atomic
from ..data.splits import Splits
from ..errors import FinetuneError
from ..recipe.schema import RecipeConfig
from ..reporting.plots import save_lr_find
from .faults import NonFiniteLoss
from .headfit import start_head
from .plugins import Plugins
from .start import build_accelerator, start_session
from .step import train_epoch

RULE = "steepest descent of the smoothed loss against log(LR) (fastai's 'steep')"
BETA = 0.98  # smoothing of the loss: an average over roughly the last 50 updates
DIVERGED = 4.0  # stop once the smoothed loss is this many times its best


@dataclass
class LRFindResult:
    lrs: list[float]  # the base LR (optim.lr) at each update
    losses: list[float]  # raw training loss at each update
    smoothed: list[float]
    suggestion: float  # a value for optim.lr
    rule: str
    stopped: str  # why the sweep ended
    output: str  # the folder holding lr_find.png and lr_find.json

    @property
    def override(self) -> str:
        return f"optim.lr={self.suggestion:.2g}"


def sweep_lrs(start: float, end: float, steps: int) -> list[float]:
    """`steps` base LRs from start to end, evenly spaced in log(LR)."""
    return [start * (end / start) ** (i / max(1, steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """Exponential moving average, divided by (1 - beta^n) so the first values are not pulled to zero."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The LR at the steepest descent of the smoothed loss against log(LR), skipping the first 10% of the
    points and the last 5. With too few points left, a tenth of the LR at the lowest loss."""
    lo, hi = len(lrs) // 10, len(lrs) - 5
    if hi - lo < 3:
        best = min(range(len(smoothed)), key=smoothed.__getitem__)
        return lrs[best] / 10
    slopes = [(smoothed[i + 1] - smoothed[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(lo, hi - 1)]
    return lrs[lo + min(range(len(slopes)), key=slopes.__getitem__)]


@dataclass(frozen=True)
class Sweep:
    """The range test's sweep: base LRs from `start` to `end`, `steps` updates at most, in the unfreezing
    phase of `epoch` (0-based)."""
    start: float = 1e-7
    end: float = 10.0
    steps: int = 100
    epoch: int = 0


def find_lr(config: RecipeConfig, splits: Splits, output: Path, sweep: Sweep = Sweep(),
            log: Callable[[str], None] | None = None, plugins: Plugins = Plugins()) -> LRFindResult | None:
    """Run the range test and write lr_find.png and lr_find.json into `output` (a new folder). Every
    process of a launch sweeps its share of the batches; the main process writes and returns the result,
    the others return None."""
    start, end, steps, epoch = sweep.start, sweep.end, sweep.steps, sweep.epoch
    if not 0 < start < end:
        raise FinetuneError(f"lr-find: --start {start:g} and --end {end:g} must satisfy 0 < start < end.")
    if steps < 10:
        raise FinetuneError(f"lr-find: --steps {steps} is too few for a smoothed curve; give 10 or more (100 is usual).")
    accelerator, precision = build_accelerator(config)
    log = log or accelerator.print
    # The session and the head that `finetune train` would start from.
    session = start_session(config, splits, accelerator, precision, None, log, plugins)
    start_head(session, config, splits, accelerator, log)
    lrs_planned = sweep_lrs(start, end, steps)
    # Only the schedule differs from training: every group's peak LR scaled alike, so the ratios stay.
    session = dataclasses.replace(session, schedule=lambda update: lrs_planned[update] / config.optim.lr,
                                  rewarm_updates=0)
    log(f"lr-find: {config.model.backbone}, phase {session.plan.phase_at(epoch)} (epoch {epoch + 1}), base LR "
        f"(optim.lr) {start:.1e} -> {end:.1e} over up to {steps} updates of {session.batching.global_batch} images "
        f"({session.batching.describe()})")

    lrs, losses, smoothed, best, stopped = [], [], [], math.inf, f"reached --end {end:g}"
    started = time.perf_counter()
    updates = train_epochs_from(session, accelerator, epoch)
    while len(lrs) < steps:
        try:
            update, loss = next(updates)
        except NonFiniteLoss:  # raised on every process alike, before that update was applied
            stopped = f"the loss became non-finite at LR {lrs_planned[len(lrs)]:.2g}"
            break
        lrs.append(lrs_planned[update - 1])
        losses.append(loss)
        smoothed = smooth(losses)
        best = min(best, smoothed[-1])
        if smoothed[-1] > DIVERGED * best:
            stopped = f"the smoothed loss passed {DIVERGED:g}x its best at LR {lrs[-1]:.2g}"
            break
    updates.close()
    accelerator.end_training()
    if len(lrs) < 10:
        raise FinetuneError(f"lr-find: the sweep stopped after {len(lrs)} updates ({stopped}); start lower "
                            f"(--start {start / 100:.0e}).")
    if not accelerator.is_main_process:
        return None
    result = LRFindResult(lrs, losses, smoothed, suggest(lrs, smoothed), RULE, stopped, str(output))
    output.mkdir(parents=True, exist_ok=True)
    save_lr_find(lrs, losses, smoothed, result.suggestion, RULE, output / "lr_find.png")
    write_atomic(output / "lr_find.json", json.dumps(
        {**dataclasses.asdict(result), "override": result.override, "phase": session.plan.phase_at(epoch),
         "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    log(f"lr-find: {len(lrs)} updates, stopped because {stopped}")
    log(f"suggested base LR {result.suggestion:.2g}: {RULE}")
    log(f"plot: {output / 'lr_find.png'}")
    log(f"train with the override: {result.override}")
    return result


class _EveryUpdate:
    """The sweep asks for no checkpoint or stop, but for the health after every update: a non-finite loss
    ends the sweep at the update it happened in (faults.Requests)."""

    def request(self) -> int:
        return 0

    def read_due(self, updates_done: int) -> bool:
        return True

    def agree(self, requested: int) -> None:
        pass


def train_epochs_from(session, accelerator: Accelerator, epoch: int) -> Iterator[tuple[int, float]]:
    """Updates for as long as the sweep wants them: passes over the data follow the order and
    augmentation of epochs `epoch`, `epoch + 1`, ..., all in the unfreezing phase of `epoch`."""
    update = 0
    for data_epoch in itertools.count(epoch):
        for update, loss in train_epoch(session, accelerator, data_epoch, update, phase_epoch=epoch,
                                        requests=_EveryUpdate()):
            yield update, float(loss)
