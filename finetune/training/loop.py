"""The training loop: the one module in finetune that talks to Accelerate. It reads top to bottom:

setup (processes -> run directory -> session -> accelerate), then one loop of epochs (train, validate,
log, export the best, checkpoint), then scoring with the best epoch and a summary. The same code runs
on CPU, one GPU or many processes: `train.batch_size` is global and batching.py splits it into
per-device micro-batches and accumulation steps, the schedule counts optimizer updates, and only the
main process writes files. Every update the processes exchange their losses on the device before
gradients are averaged, and the host reads them every few updates (faults.py): a fault on any process
stops all of them, and nothing of the bad update is applied. Requests travel with them (interrupt.py): a
checkpoint inside the epoch (train.checkpoint_every) or a stop signal, acted on by all processes at the
same update; early stopping (stopping.py) ends the epochs after a plateau.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import broadcast_object_list, set_seed
from safetensors.torch import load_file
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from ..data.badimages import SkipLog, save_data_report
from ..data.splits import Splits
from ..model.card import save_card
from ..model.custom import is_timm_like
from ..model.export import WEIGHTS_NAME, save_export
from ..recipe.schema import RecipeConfig
from ..reporting.plots import save_curves
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .evaluate import eval_loader, predict_all, validate
from .faults import FAULT_CHECK_UPDATES, resume_hint
from .features import fit_epoch_lbfgs, start_head, use_cached_features
from .inputs import choose_pipeline, use_decoded_images
from .interrupt import Pauses
from .launch import check_process_count, check_processes_per_machine
from .plugins import Plugins
from .rundir import RunDir
from .runtime import resolve_precision
from .session import Session, build_session, describe
from .step import train_epoch
from .stopping import EarlyStop
from .tracking import log_epoch, start_tracking, tracker_settings

Log = Callable[[str], None]


def build_accelerator(config: RecipeConfig, run_dir: Path | None = None) -> tuple[Accelerator, str]:
    """The Accelerator for this machine and launcher, and the precision it runs (trackers: into run_dir)."""
    cuda = torch.cuda.is_available()
    precision = resolve_precision(config.train.precision, cuda)
    if cuda:
        check_processes_per_machine(torch.cuda.device_count())
    forget_accelerator_state()
    accelerator = Accelerator(
        # Without cpu=True, torchrun on a machine without GPUs would start N unrelated single-process jobs;
        # with it, the processes form one gloo group.
        cpu=not cuda,
        mixed_precision={"fp32": "no"}.get(precision, precision),
        dynamo_backend="inductor" if config.train.compile else "no",  # torch.compile, applied by prepare()
        **tracker_settings(config, run_dir),  # train.log_with: Accelerate's own trackers (tracking.py)
        # Shuffling seeded by (seed, epoch): every process agrees on the order, and resume repeats it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.train.seed,
                                                  non_blocking=cuda),
    )
    check_process_count(accelerator.num_processes)
    if cuda:
        torch.backends.cudnn.benchmark = True  # training batches have one fixed shape: tune kernels once
    return accelerator, precision


def forget_accelerator_state() -> None:
    """Accelerate keeps its settings per Python process and refuses different ones later, but a second
    run in one process (a notebook, the tests) may ask for another precision. Accelerate has no public
    way to start over; these resets are the ones its own test suite uses (tests/test_loop.py runs two
    precisions in one process). The process group itself is kept."""
    AcceleratorState._reset_state()
    GradientState._reset_state()


def start_session(config: RecipeConfig, splits: Splits, accelerator: Accelerator, precision: str,
                  skip_log_folder, log: Log, plugins: Plugins = Plugins()) -> Session:
    """The run's objects, built with identical initial weights on every process and prepared for it."""
    set_seed(config.train.seed)
    s = build_session(config, splits, accelerator.num_processes, accelerator.process_index,
                      accelerator.device.type == "cuda", precision, skip_log_folder, log, plugins)
    # Cached features serve a softmax head (its probe, lbfgs) on unmixed images, through timm's body/head
    # split (which a module of one's own may lack); a multi-label linear probe and a mixed batch run the body.
    if (config.data.feature_cache == "auto" and s.plan.body_fixed and s.task.linear_probe
            and s.mixing is None and is_timm_like(s.network)):
        s = use_cached_features(s, splits, config.data, config.train.seed, accelerator.device,
                                accelerator.is_main_process, accelerator.wait_for_everyone, log)
    else:
        decoded, why = choose_pipeline(s, splits, config.data)
        s = dataclasses.replace(s, input_pipeline=why)
        if decoded:
            s = use_decoded_images(s, splits, config.data, accelerator.device, accelerator.is_local_main_process,
                                   accelerator.wait_for_everyone, log)
    s.criterion.to(accelerator.device)
    model, optimizer, train_loader, val_loader = accelerator.prepare(s.model, s.optimizer, s.train_loader,
                                                                     s.val_loader)
    # The moving average copies the network where it now lives (checkpoint.py saves and resumes it).
    ema = ModelEmaV3(s.network, decay=s.ema_decay) if s.ema_decay else None
    return dataclasses.replace(s, model=model, optimizer=optimizer, train_loader=train_loader, val_loader=val_loader,
                               ema=ema)


def train(config: RecipeConfig, run_dir: RunDir, splits: Splits, log: Log | None = None,
          after_checkpoint: Callable[[int], None] | None = None, plugins: Plugins = Plugins()) -> dict:
    """Train as the recipe says; return the per-epoch records, the best epoch and the test metrics.
    `after_checkpoint(epoch)` runs on every process once epoch's checkpoint is complete (tests use it to
    interrupt a run where a kill would leave it). `plugins`: a model, loss or metrics of one's own."""
    accelerator, precision = build_accelerator(config, run_dir.path)
    log = log or accelerator.print
    main, tc = accelerator.is_main_process, config.train
    run_dir = _main_process_run_dir(accelerator, run_dir)
    s = start_session(config, splits, accelerator, precision, run_dir.path, log, plugins)
    log(describe(s, config, splits))
    log(f"run directory: {run_dir.path}")

    # --- the run directory: the first write happens only now, after everything was checked and built
    start_epoch, update, best_acc, best_epoch, best_from = 0, 0, -1.0, 0, "model"
    done_in_epoch, earlier_losses = 0, []  # a checkpoint inside an epoch: its updates so far and their losses
    records: list[dict] = []
    per_epoch = s.batching.updates_per_epoch
    stopper = EarlyStop(tc.early_stop)
    checkpoint = find_checkpoint(run_dir) if run_dir.resuming else None
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, s.plan.phase_at, s)
        stopper.resume(state, run_dir.path)  # a run that stopped early and finished is refused
        start_epoch, update, best_acc, best_epoch = (state["epoch"], state["step"], state["best_val_acc"],
                                                     state["best_epoch"])
        best_from = state.get("best_from", "model")
        done_in_epoch, earlier_losses = state.get("epoch_updates", 0), state.get("epoch_losses", [])
        within = f" and {done_in_epoch} of the {per_epoch} updates of epoch {start_epoch + 1}" if done_in_epoch else ""
        log(f"resuming {run_dir.path} after epoch {start_epoch}{within} (update {update}, phase "
            f"{s.plan.phase_at(start_epoch)})")
    else:
        s = start_head(s, config, splits, accelerator, log)
    if main:
        records = run_dir.keep_metrics_through(start_epoch) if run_dir.resuming else []
        if not run_dir.resuming:
            run_dir.create()
        run_dir.write_recipe(config)
        run_dir.write_plan(s.plan.to_json())
        for bad in s.skipped:  # found while the features were cached, before the directory existed
            SkipLog.for_process(run_dir.path, 0).record(bad["split"], bad["file"], bad["reason"])
        # The export of a best epoch follows its checkpoint: a kill between the two left it unwritten.
        if checkpoint is not None and best_epoch == start_epoch and not done_in_epoch:
            save_export(s.ema.module if best_from == "ema" else s.network, run_dir.path, splits.class_names,
                        s.data_cfg, s.task.export_config())
    start_tracking(accelerator, config, run_dir.path.name)
    accelerator.wait_for_everyone()

    pauses = Pauses(tc.checkpoint_every, main)  # checkpoints inside an epoch, and stopping on SIGTERM/SIGINT
    lbfgs = config.optim.name == "lbfgs"  # a full-batch head fit: one update per epoch
    with pauses.catching_signals():
        for epoch in range(start_epoch, start_epoch if stopper.stopped else tc.epochs):  # stopped: only scoring
            if len(s.plan.phases) > 1 and (epoch == start_epoch or any(e == epoch for e, _ in s.plan.phases)):
                log(f"phase {s.plan.phase_at(epoch)} from epoch {epoch + 1}: "
                    f"{s.plan.describe_phase(s.plan.phase_at(epoch))}")
            started = time.perf_counter()
            start = done_in_epoch if epoch == start_epoch else 0
            bar = tqdm(total=per_epoch, initial=start, desc=f"epoch {epoch + 1}/{tc.epochs}", leave=False,
                       dynamic_ncols=True, **({} if main else {"disable": True}))  # TQDM_DISABLE=1 silences it
            losses = [torch.tensor(x, device=accelerator.device) for x in (earlier_losses if start else [])]
            lrs, first = [], None
            updates = (fit_epoch_lbfgs(s, accelerator, epoch, update, resume_hint(run_dir, epoch)) if lbfgs else
                       train_epoch(s, accelerator, epoch, update, resume_hint(run_dir, epoch), pauses=pauses,
                                   start=start))
            for update, loss in updates:
                losses.append(loss)
                lrs.append({g["name"]: g["lr"] for g in s.optimizer.param_groups})  # host values: no wait
                first = time.perf_counter() - started if first is None else first
                bar.update()
                if update % FAULT_CHECK_UPDATES == 0:  # the health was just read: no extra wait for the device
                    bar.set_postfix(loss=f"{float(loss):.3f}")
                if pauses.checkpoint_due(update, epoch_ended=update == (epoch + 1) * per_epoch):
                    save_checkpoint(accelerator, run_dir, {
                        "epoch": epoch, "step": update, "epoch_updates": update - epoch * per_epoch,
                        "epoch_losses": [round(float(x), 6) for x in losses], "best_val_acc": best_acc,
                        "best_epoch": best_epoch, "best_from": best_from, "phase": s.plan.phase_at(epoch),
                        **stopper.state()}, s)
                    pauses.saved()
                    if pauses.stopping:
                        raise pauses.interrupted(run_dir.path, f"in epoch {epoch + 1}, after update "
                                                 f"{update - epoch * per_epoch} of {per_epoch}")
            bar.close()
            train_loss = float(torch.stack([torch.as_tensor(x) for x in losses]).mean()) if losses else 0.0
            seconds = time.perf_counter() - started

            val, candidate, acc = validate(s, accelerator, s.val_loader, splits.class_names)  # model or its average
            improved = s.task.better(acc, best_acc if best_epoch else None)
            stop = stopper.update(epoch + 1, tc.epochs, val)
            if improved:
                best_acc, best_epoch, best_from = acc, epoch + 1, candidate
            records.append({"epoch": epoch + 1, "step": update, "phase": s.plan.phase_at(epoch),
                            "features_cached": s.features_cached,
                            "train_loss": round(train_loss, 6), **val, "exported": candidate if improved else None,
                            "lr": {g["name"]: g["lr"] for g in s.optimizer.param_groups},
                            "epoch_seconds": round(seconds, 2),
                            "train_images_per_second": round(len(lrs) * s.batching.global_batch / seconds, 1),
                            **({"compile_seconds": round(first, 2)} if tc.compile and epoch == start_epoch else {}),
                            **stopper.record()})
            log_epoch(accelerator, config, records[-1], losses[len(losses) - len(lrs):], lrs)
            if main:
                run_dir.append_metrics(records[-1])
                save_curves(records, run_dir.curves, s.task.curve_metric())
                save_data_report(run_dir.path, config.data.on_bad_image, splits.sizes())
            log(s.task.format_epoch(records[-1], tc.epochs)
                + (f"\n{stopper.describe(tc.epochs)}" if stop else ""))
            save_checkpoint(accelerator, run_dir, {"epoch": epoch + 1, "step": update, "best_val_acc": best_acc,
                                                   "best_epoch": best_epoch, "best_from": best_from,
                                                   "phase": s.plan.phase_at(epoch + 1), **stopper.state()}, s)
            pauses.saved()
            if after_checkpoint is not None:
                after_checkpoint(epoch + 1)
            if main and improved:  # after the checkpoint, which describes it: a resume writes it again if missed
                save_export(s.ema.module if candidate == "ema" else s.network, run_dir.path, splits.class_names,
                            s.data_cfg, s.task.export_config())
            if pauses.stop_after_epoch(accelerator):  # after the last epoch too: --resume does the scoring
                accelerator.wait_for_everyone()  # the main process wrote the export
                trained = stop or epoch + 1 == tc.epochs  # only the scoring is left
                raise pauses.interrupted(run_dir.path, f"after epoch {epoch + 1}" + (", the last" if trained else ""),
                                         trained)
            if stop:
                break

    # --- after training: the best epoch's weights (the export) score test, then train and val for review
    accelerator.wait_for_everyone()  # the main process wrote the export
    s.network.load_state_dict(load_file(str(run_dir.path / WEIGHTS_NAME)))
    test = s.task.score_after_training(lambda view: predict_all(s, accelerator, eval_loader(s, accelerator, view)),
                                       splits, s.eval_view, tc.hard_examples, run_dir.path if main else None, best_epoch)
    skipped = save_data_report(run_dir.path, config.data.on_bad_image, splits.sizes(), final=True) if main else 0
    if main:  # the model card again, now with every epoch and the test metrics
        save_card(run_dir.path)
    log(f"done: {s.task.summary(best_acc, best_epoch, test)}"
        + (f"; {skipped} unreadable image(s) skipped, listed in data_report.json" if skipped else "")
        + f"; model in {run_dir.path}")
    accelerator.end_training()
    return {"run_dir": str(run_dir.path.resolve()), "metrics": records, "best_epoch": best_epoch,
            "best_val_acc": best_acc, "test": test, "skipped_images": skipped}


def _main_process_run_dir(accelerator: Accelerator, run_dir: RunDir) -> RunDir:
    """Every process adopts the main process's run directory: a default name carries the second it was
    chosen in, so processes started a moment apart would each pick their own. The main process claimed
    it (finetune.train, rundir.py) before this broadcast, the run's first collective."""
    return broadcast_object_list([run_dir])[0]
