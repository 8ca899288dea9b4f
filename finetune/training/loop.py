"""The training loop. `train` reads top to bottom as the story of a run: start (start.py: the accelerator
and the session prepared with it), resume from a checkpoint or fit the head, the run directory's first
writes; then for each epoch its updates (with checkpoints inside), validation, the record, the epoch's
checkpoint and export; then scoring with the best epoch and a summary. What changes from update to update
is one frozen `TrainState` (state.py), saved with every checkpoint; each stage below returns the next one.

The same code runs on CPU, one GPU or many processes: `train.batch_size` is global and batching.py splits
it into per-device micro-batches and accumulation steps, the schedule counts optimizer updates, and only
the main process writes files. Every update the processes exchange their losses on the device before
gradients are averaged, and the host reads them every few updates (faults.py): a fault on any process
stops all of them, and nothing of the bad update is applied. Requests travel with them (interrupt.py): a
checkpoint inside the epoch (train.checkpoint_every) or a stop signal, acted on by all processes at the
same update; early stopping (stopping.py) ends the epochs after a plateau."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..data.badimages import SkipLog, save_data_report
from ..data.splits import Splits
from ..model.export import WEIGHTS_NAME, save_export
from ..recipe.schema import RecipeConfig
from ..reporting.plots import save_curves
from ..rundir.card import save_card
from ..rundir.folder import RunDir
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .evaluate import eval_loader, predict_all, validate
from .faults import FAULT_CHECK_UPDATES, resume_hint
from .headfit import fit_epoch_lbfgs, start_head
from .interrupt import Pauses
from .plugins import Plugins
from .session import Session, describe
from .start import build_accelerator, start_session
from .state import TrainState
from .step import train_epoch
from .stopping import EarlyStop
from .tracking import log_epoch, start_tracking

Log = Callable[[str], None]


@dataclass(frozen=True)
class Run:
    """The objects every stage of one run reads, fixed once the session is built (the state is not here:
    it changes, and each stage returns the next one)."""
    config: RecipeConfig
    splits: Splits
    s: Session
    accelerator: Accelerator
    run_dir: RunDir
    log: Log

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass(frozen=True)
class EpochLog:
    """What one epoch's updates leave for its record: the losses (device tensors, read once at the end),
    the LRs of the updates this process ran, the epoch's seconds and the first update's."""
    losses: list
    lrs: list[dict]
    seconds: float
    first_update_seconds: float | None


def train(config: RecipeConfig, run_dir: RunDir, splits: Splits, log: Log | None = None,
          after_checkpoint: Callable[[int], None] | None = None, plugins: Plugins = Plugins()) -> dict:
    """Train as the recipe says; return the per-epoch records, the best epoch and the test metrics.
    `after_checkpoint(epoch)` runs on every process once epoch's checkpoint is complete (tests use it to
    interrupt a run where a kill would leave it). `plugins`: a model, loss or metrics of one's own."""
    accelerator, precision = build_accelerator(config, run_dir.path)
    log = log or accelerator.print
    run_dir = _main_process_run_dir(accelerator, run_dir)
    s = start_session(config, splits, accelerator, precision, run_dir.path, log, plugins)
    log(describe(s, config, splits))
    log(f"run directory: {run_dir.path}")
    stopper = EarlyStop(config.train.early_stop)
    # Resume (or fit the head) before the first write: a checkpoint that cannot be used leaves the folder as it was.
    run = Run(config, splits, s, accelerator, run_dir, log)
    state, skipped = _resume_or_start(run, stopper)
    records = _prepare_run_dir(run, state, s.skipped + skipped)
    start_tracking(accelerator, config, run_dir.path.name)
    accelerator.wait_for_everyone()

    epochs, first_epoch = config.train.epochs, state.epoch
    pauses = Pauses(config.train.checkpoint_every, run.main)  # checkpoints inside an epoch; SIGTERM/SIGINT
    with pauses.catching_signals():
        for epoch in range(first_epoch, first_epoch if stopper.stopped else epochs):  # stopped: only scoring
            if len(s.plan.phases) > 1 and (epoch == first_epoch or any(e == epoch for e, _ in s.plan.phases)):
                log(f"phase {s.plan.phase_at(epoch)} from epoch {epoch + 1}: "
                    f"{s.plan.describe_phase(s.plan.phase_at(epoch))}")
            state, epoch_log = _train_epoch(run, state, epoch, pauses)
            state, record = _validate(run, state, epoch_log, stopper, epoch == first_epoch)
            records.append(record)
            _report_epoch(run, records, epoch_log, stopper)
            _end_epoch(run, state, record["exported"], pauses, after_checkpoint)
            if stopper.stopped:
                break
    return _finish(run, state, records)


def _resume_or_start(run: Run, stopper: EarlyStop) -> tuple[TrainState, tuple[dict, ...]]:
    """The state to train from: a checkpoint's (restoring the session's weights, optimizer and RNG from
    it), or a fresh one after the head's start (a probe fit on cached features: features.py); and the
    unreadable files that start met."""
    checkpoint = find_checkpoint(run.run_dir) if run.run_dir.resuming else None
    if checkpoint is None:
        return TrainState(), tuple(start_head(run.s, run.config, run.splits, run.accelerator, run.log))
    state = load_checkpoint(run.accelerator, checkpoint, run.s.plan.phase_at, run.s)
    stopper.resume(state, run.run_dir.path)  # a run that stopped early and finished is refused
    per_epoch = run.s.batching.updates_per_epoch
    within = (f" and {state.epoch_updates} of the {per_epoch} updates of epoch {state.epoch + 1}"
              if state.mid_epoch else "")
    run.log(f"resuming {run.run_dir.path} after epoch {state.epoch}{within} (update {state.update}, phase "
            f"{run.s.plan.phase_at(state.epoch)})")
    return state, ()


def _prepare_run_dir(run: Run, state: TrainState, skipped: tuple[dict, ...]) -> list[dict]:
    """The run directory's first writes (main process): the folder, recipe and plan, the unreadable files
    met before it existed; on resume, the metrics of the epochs the checkpoint holds (returned) and the
    export of its best epoch, if a kill came between that epoch's checkpoint and its export."""
    if not run.main:
        return []
    run_dir, s = run.run_dir, run.s
    records = run_dir.keep_metrics_through(state.epoch) if run_dir.resuming else []
    if not run_dir.resuming:
        run_dir.create()
    run_dir.write_recipe(run.config)
    run_dir.write_plan(s.plan.to_json())
    for bad in skipped:
        SkipLog.for_process(run_dir.path, 0).record(bad["split"], bad["file"], bad["reason"])
    if state.best_epoch and state.best_epoch == state.epoch and not state.mid_epoch:
        _export(run, state.best_from)
    return records


def _train_epoch(run: Run, state: TrainState, epoch: int, pauses: Pauses) -> tuple[TrainState, EpochLog]:
    """The updates of epoch `epoch` (from where a checkpoint inside it left off), with the checkpoints
    train.checkpoint_every or a stop signal ask for; a stop raises `Interrupted` once its checkpoint is saved."""
    s, accelerator, tc = run.s, run.accelerator, run.config.train
    per_epoch, start, update = s.batching.updates_per_epoch, state.epoch_updates, state.update
    started, first = time.perf_counter(), None
    bar = tqdm(total=per_epoch, initial=start, desc=f"epoch {epoch + 1}/{tc.epochs}", leave=False,
               dynamic_ncols=True, **({} if run.main else {"disable": True}))  # TQDM_DISABLE=1 silences it
    losses = [torch.tensor(x, device=accelerator.device) for x in state.epoch_losses]
    lrs: list[dict] = []
    hint = resume_hint(run.run_dir, epoch)
    updates = (fit_epoch_lbfgs(s, accelerator, epoch, update, hint) if run.config.optim.name == "lbfgs"  # full batch
               else train_epoch(s, accelerator, epoch, update, hint, requests=pauses, start=start))
    for update, loss in updates:
        losses.append(loss)
        lrs.append({g["name"]: g["lr"] for g in s.optimizer.param_groups})  # host values: no wait
        first = time.perf_counter() - started if first is None else first
        bar.update()
        if update % FAULT_CHECK_UPDATES == 0:  # the health was just read: no extra wait for the device
            bar.set_postfix(loss=f"{float(loss):.3f}")
        if pauses.checkpoint_due(update, epoch_ended=update == (epoch + 1) * per_epoch):
            state = state.replace(update=update, phase=s.plan.phase_at(epoch), epoch_updates=update - epoch * per_epoch,
                                  epoch_losses=tuple(round(float(x), 6) for x in losses))
            save_checkpoint(accelerator, run.run_dir, state, s)
            pauses.saved()
            if pauses.stopping:
                raise pauses.interrupted(run.run_dir.path, f"in epoch {epoch + 1}, after update "
                                         f"{state.epoch_updates} of {per_epoch}")
    bar.close()
    return state.replace(update=update), EpochLog(losses, lrs, time.perf_counter() - started, first)


def _validate(run: Run, state: TrainState, log: EpochLog, stopper: EarlyStop, first_in_process: bool
              ) -> tuple[TrainState, dict]:
    """Validate the epoch's model and its moving average; return the state at the epoch's end and the
    epoch's record for metrics.jsonl (`exported`: whose weights become the export, None: no improvement)."""
    s, tc, epoch = run.s, run.config.train, state.epoch + 1
    train_loss = float(torch.stack([torch.as_tensor(x) for x in log.losses]).mean()) if log.losses else 0.0
    val, candidate, metric = validate(s, run.accelerator, s.val_loader, run.splits.class_names)
    improved = s.task.better(metric, state.best_metric)
    stopper.update(epoch, tc.epochs, val)
    if improved:
        state = state.replace(best_metric=metric, best_epoch=epoch, best_from=candidate)
    record = {"epoch": epoch, "step": state.update, "phase": s.plan.phase_at(epoch - 1),
              "features_cached": s.features_cached, "train_loss": round(train_loss, 6), **val,
              "exported": candidate if improved else None,
              "lr": {g["name"]: g["lr"] for g in s.optimizer.param_groups},
              "epoch_seconds": round(log.seconds, 2),
              "train_images_per_second": round(len(log.lrs) * s.batching.global_batch / log.seconds, 1),
              **({"compile_seconds": round(log.first_update_seconds, 2)}
                 if tc.compile and first_in_process and log.first_update_seconds is not None else {}),
              **stopper.record()}
    return state.replace(epoch=epoch, phase=s.plan.phase_at(epoch), epoch_updates=0, epoch_losses=(),
                         stopped_early=stopper.stopped, early_stop=stopper.counters()), record


def _report_epoch(run: Run, records: list[dict], log: EpochLog, stopper: EarlyStop) -> None:
    """The epoch in the trackers, metrics.jsonl, the curves, the data report and the printed line."""
    record = records[-1]
    log_epoch(run.accelerator, run.config, record, log.losses[len(log.losses) - len(log.lrs):], log.lrs)
    if run.main:
        run.run_dir.append_metrics(record)
        save_curves(records, run.run_dir.curves, run.s.task.curve_metric())
        save_data_report(run.run_dir.path, run.config.data.on_bad_image, run.splits.sizes())
    epochs = run.config.train.epochs
    run.log(run.s.task.format_epoch(record, epochs)
            + (f"\n{stopper.describe(epochs)}" if stopper.stopped else ""))


def _end_epoch(run: Run, state: TrainState, exported: str | None, pauses: Pauses,
               after_checkpoint: Callable[[int], None] | None) -> None:
    """The epoch's checkpoint, then its export if it improved (a resume writes it again if a kill came
    between), then a stop if a signal asked for one (after the last epoch too: --resume does the scoring)."""
    save_checkpoint(run.accelerator, run.run_dir, state, run.s)
    pauses.saved()
    if after_checkpoint is not None:
        after_checkpoint(state.epoch)
    if run.main and exported is not None:
        _export(run, exported)
    if pauses.stop_after_epoch(run.accelerator):
        run.accelerator.wait_for_everyone()  # the main process wrote the export
        trained = state.stopped_early or state.epoch == run.config.train.epochs  # only the scoring is left
        raise pauses.interrupted(run.run_dir.path, f"after epoch {state.epoch}" + (", the last" if trained else ""),
                                 trained)


def _export(run: Run, which: str) -> None:
    """The export, and the model card rewritten for it."""
    s = run.s
    save_export(s.ema.module if which == "ema" else s.network, run.run_dir.path, run.splits.class_names, s.data_cfg,
                s.task.export_config())
    save_card(run.run_dir.path)


def _finish(run: Run, state: TrainState, records: list[dict]) -> dict:
    """After training: the best epoch's weights (the export) score test, then train and val for review;
    the model card with every epoch; the summary line."""
    s, accelerator, run_dir, tc = run.s, run.accelerator, run.run_dir, run.config.train
    accelerator.wait_for_everyone()  # the main process wrote the export
    s.network.load_state_dict(load_file(str(run_dir.path / WEIGHTS_NAME)))
    test = s.task.score_after_training(lambda view: predict_all(s, accelerator, eval_loader(s, accelerator, view)),
                                       run.splits, s.eval_view, tc.hard_examples, run_dir.path if run.main else None,
                                       state.best_epoch)
    skipped = (save_data_report(run_dir.path, run.config.data.on_bad_image, run.splits.sizes(), final=True)
               if run.main else 0)
    if run.main:  # the model card again, now with every epoch and the test metrics
        save_card(run_dir.path)
    best = -1.0 if state.best_metric is None else state.best_metric
    run.log(f"done: {s.task.summary(best, state.best_epoch, test)}"
            + (f"; {skipped} unreadable image(s) skipped, listed in data_report.json" if skipped else "")
            + f"; model in {run_dir.path}")
    accelerator.end_training()
    return {"run_dir": str(run_dir.path.resolve()), "metrics": records, "best_epoch": state.best_epoch,
            "best_val_acc": best, "test": test, "skipped_images": skipped}


def _main_process_run_dir(accelerator: Accelerator, run_dir: RunDir) -> RunDir:
    """Every process adopts the main process's run directory: a default name carries the second it was
    chosen in, so processes started a moment apart would each pick their own. The main process claimed
    it (finetune.train, rundir/folder.py) before this broadcast, the run's first collective."""
    return broadcast_object_list([run_dir])[0]
