"""The LR range test behind `finetune lr-find` (Leslie Smith's test, as fastai runs it).

It trains the recipe's model from its starting weights for up to `steps` updates while the base LR
(`optim.lr`) grows exponentially from `start` to `end`. Every group keeps its plan ratio (head 10x, layer
decay, lr_mult, frozen groups at 0): the sweep multiplies every group's peak LR by the same number, so the
suggestion is a value for `optim.lr` and nothing else. The loss is smoothed by an exponential moving
average with bias correction; the sweep stops when the smoothed loss exceeds 4x its best. The suggestion
is the LR where the smoothed loss falls fastest against log(LR) (fastai's "steep" rule), ignoring the
first 10% of the sweep (noise of the first batches) and its last 5 points (the divergence).

It is a separate, disposable run: it writes only into its own new folder (a PNG and a JSON file) and
never touches a training run. It needs no collectives, so it does not go through Accelerate: under a
multi-process launch the main process sweeps on its own device and every other process returns at once,
so nothing waits for anybody.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .config import RecipeConfig
from .data import EpochSeeded, Splits, Transformed, build_loader, build_transforms, resolve_data_config
from .errors import FinetuneError
from .groups import build_plan
from .model import build_model
from .optim import build_optimizer, drop_waiting_grads, set_lr
from .plots import save_lr_find

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


def find_lr(config: RecipeConfig, splits: Splits, output: Path, start: float = 1e-7, end: float = 10.0,
            steps: int = 100, epoch: int = 0, log: Callable[[str], None] = print) -> LRFindResult | None:
    """Run the range test and write lr_find.png and lr_find.json into `output` (a new folder). Returns
    None on every process but the main one of a multi-process launch."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None  # the main process sweeps alone; there is no collective for anybody to wait in
    if not 0 < start < end:
        raise FinetuneError(f"lr-find: --start {start:g} and --end {end:g} must satisfy 0 < start < end.")
    if steps < 10:
        raise FinetuneError(f"lr-find: --steps {steps} is too few for a smoothed curve; give 10 or more (100 is usual).")
    tc = config.train
    torch.manual_seed(tc.seed)  # the same starting head (and any random init) as `finetune train`
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available()
              else torch.device("cpu"))
    bf16 = device.type == "cuda" and tc.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()

    model = build_model(config.model, len(splits.class_names), log, config.data.image_size).to(device)
    data_cfg = resolve_data_config(model, config.data)
    train_tf, _ = build_transforms(data_cfg, config.data)
    plan = build_plan(model, config.optim, config.freeze)
    plan.apply_freezing(model, epoch)
    keep_eval = plan.frozen_norm_modules(model, epoch)
    optimizer = build_optimizer(config.optim, plan.optimizer_groups(model))
    micro = min(tc.micro_batch_size or tc.batch_size, tc.batch_size)
    accumulation = math.ceil(tc.batch_size / micro)
    train_set = EpochSeeded(Transformed(splits.train, splits.train_indices, train_tf))
    workers = 0 if config.data.num_workers is None else config.data.num_workers  # a short sweep: no worker start-up
    loader = build_loader(train_set, micro, True, workers, device.type == "cuda")
    if len(loader) < accumulation:
        raise FinetuneError(f"lr-find: {len(train_set)} training images make no batch of {tc.batch_size}; "
                            "lower train.batch_size.")
    log(f"lr-find: {config.model.backbone}, phase {plan.phase_at(epoch)} (epoch {epoch + 1}), base LR (optim.lr) "
        f"{start:.1e} -> {end:.1e} over up to {steps} updates of {tc.batch_size} images on {device}")

    lrs_planned = sweep_lrs(start, end, steps)
    lrs, losses, smoothed, best, stopped = [], [], [], math.inf, f"reached --end {end:g}"
    batches, sweep_epoch = iter(()), -1
    model.train()
    for module in keep_eval:
        module.eval()
    started = time.perf_counter()
    for lr in lrs_planned:
        set_lr(optimizer, lr / config.optim.lr, epoch)  # every group's peak LR scaled alike: ratios stay
        total = 0.0
        for _ in range(accumulation):
            try:
                images, labels = next(batches)
            except StopIteration:  # another pass over the data, in a new seeded order
                sweep_epoch += 1
                torch.manual_seed(tc.seed + 1000 * (sweep_epoch + 1))
                train_set.set_epoch_seed(int(torch.randint(2**62, ())))
                batches = iter(loader)
                images, labels = next(batches)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(images), labels, label_smoothing=tc.label_smoothing) / accumulation
            loss.backward()
            total += loss.item()
        drop_waiting_grads(optimizer, epoch)
        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(total):
            stopped = f"the loss became {total} at LR {lr:.2g}"
            break
        lrs.append(lr)
        losses.append(total)
        smoothed = smooth(losses)
        best = min(best, smoothed[-1])
        if smoothed[-1] > DIVERGED * best:
            stopped = f"the smoothed loss passed {DIVERGED:g}x its best at LR {lr:.2g}"
            break
    if len(lrs) < 10:
        raise FinetuneError(f"lr-find: the sweep stopped after {len(lrs)} updates ({stopped}); start lower "
                            f"(--start {start / 100:.0e}).")
    suggestion = suggest(lrs, smoothed)
    result = LRFindResult(lrs, losses, smoothed, suggestion, RULE, stopped, str(output))
    output.mkdir(parents=True, exist_ok=True)
    save_lr_find(lrs, losses, smoothed, suggestion, RULE, output / "lr_find.png")
    (output / "lr_find.json").write_text(json.dumps(
        {**dataclasses.asdict(result), "override": result.override, "phase": plan.phase_at(epoch),
         "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    log(f"lr-find: {len(lrs)} updates, stopped because {stopped}")
    log(f"suggested base LR {suggestion:.2g}: {RULE}")
    log(f"plot: {output / 'lr_find.png'}")
    log(f"train with the override: {result.override}")
    return result
