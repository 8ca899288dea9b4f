"""The training loop: the one module that talks to Accelerate. It reads top to bottom:

setup (processes -> run directory -> model -> plan -> optimizer -> loaders -> accelerate), then one loop
of epochs (train, validate, log, export the best, checkpoint), then a summary. The same code runs on CPU,
one GPU or many processes: `train.batch_size` is global and batching.py splits it into per-device
micro-batches and accumulation steps, the schedule counts optimizer updates, and only the main process
writes files. Every update the processes exchange their losses before gradients are averaged, so an
exception or a non-finite loss on any one of them stops all of them at the same update, before anything
of it is applied.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import broadcast_object_list, set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .badimages import DATA_REPORT_NAME, SkipLog, save_data_report
from .balance import BalancedSampler, inverse_frequency_weights
from .batching import Batching, derive_batching
from .config import RecipeConfig, TrainConfig
from .data import EpochSeeded, Splits, Transformed, build_loader, build_transforms, default_num_workers, resolve_data_config
from .errors import FinetuneError
from .export import WEIGHTS_NAME, save_export
from .groups import build_plan
from .launch import check_process_count, check_processes_per_machine
from .model import build_model
from .metrics import classification_metrics
from .optim import build_optimizer, drop_waiting_grads, lr_multiplier, set_lr
from .plots import save_curves
from .review import hard_example_entries, rank_hard_examples, save_hard_examples
from .rundir import TEST_METRICS_NAME, RunDir

STATE_NAME = "trainer_state.json"


@dataclass
class TrainResult:
    run_dir: str
    metrics: list[dict]  # one record per epoch, as in metrics.jsonl
    best_epoch: int
    best_val_acc: float
    test: dict | None = None  # test metrics of the best epoch, when data.test is given
    skipped_images: int = 0  # unreadable files skipped (listed in data_report.json)

    @property
    def final(self) -> dict:
        return self.metrics[-1] if self.metrics else {}


def build_accelerator(config: RecipeConfig) -> Accelerator:
    cuda = torch.cuda.is_available()
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise FinetuneError("train.precision=fp16 needs a CUDA GPU; on CPU use bf16 or fp32 (or auto).")
    if cuda:
        check_processes_per_machine(torch.cuda.device_count())
    # Accelerate keeps its settings per Python process and refuses new ones; a second train() in the same
    # process (a notebook, the tests) may ask for another precision. The process group itself is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        # Without cpu=True, torchrun on a machine without GPUs would start N unrelated single-process jobs;
        # with it, the processes form one gloo group.
        cpu=not cuda,
        mixed_precision={"fp32": "no"}.get(precision, precision),
        # Shuffling seeded by (seed, epoch): every process agrees on the order, and resume repeats it.
        # Batches come from pinned memory (build_loader), so the copy to the GPU can overlap compute.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.train.seed,
                                                  non_blocking=cuda),
    )
    check_process_count(accelerator.num_processes)
    if cuda:
        torch.backends.cudnn.benchmark = True  # training batches have one fixed shape: tune kernels once
    return accelerator


def train(config: RecipeConfig, run_dir: RunDir, splits: Splits, log: Callable[[str], None] | None = None) -> TrainResult:
    accelerator = build_accelerator(config)
    log = log or accelerator.print
    main = accelerator.is_main_process
    tc = config.train
    run_dir = _main_process_run_dir(accelerator, run_dir)
    set_seed(tc.seed)  # identical model init on every process

    # --- setup, in dependency order: the class list sizes the head; the model's config gives transforms;
    # BatchNorm conversion comes before the plan, which keeps references to norm modules.
    model = build_model(config.model, len(splits.class_names), log, config.data.image_size)
    data_cfg = resolve_data_config(model, config.data)
    train_tf, eval_tf = build_transforms(data_cfg, config.data)
    model, channels_last = _adapt_model(model, tc, accelerator)
    plan, keep_eval, optimizer = _plan_and_optimizer(config, model, accelerator)

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun
    workers = default_num_workers(local_processes) if config.data.num_workers is None else config.data.num_workers
    pin = accelerator.device.type == "cuda"
    # Loader workers record unreadable files here; the run directory keeps them across a resume.
    bad = {"on_bad_image": config.data.on_bad_image, "skip_log": SkipLog.for_process(run_dir.path,
                                                                                    accelerator.process_index)}
    train_set = EpochSeeded(Transformed(splits.train, splits.train_indices, train_tf, "train", **bad))
    val_set = Transformed(splits.val, splits.val_indices, eval_tf, "val", substitute=False, **bad)
    batching = derive_batching(tc.batch_size, tc.micro_batch_size, accelerator.num_processes, len(train_set))
    sampler = BalancedSampler(splits.train_targets, tc.seed) if config.data.sampler == "balanced" else None
    train_loader = build_loader(train_set, batching.per_device, True, workers, pin, sampler)
    val_loader = build_loader(val_set, batching.per_device, False, workers, pin)
    class_weights = (inverse_frequency_weights(splits.train_targets, len(splits.class_names))
                     if tc.class_weights == "auto" else None)
    criterion = torch.nn.CrossEntropyLoss(weight=class_weights, label_smoothing=tc.label_smoothing)
    criterion.to(accelerator.device)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    total_updates = tc.epochs * batching.updates_per_epoch
    warmup_updates = min(round(tc.warmup_epochs * batching.updates_per_epoch), total_updates - 1)

    def schedule(update: int) -> float:
        return lr_multiplier(update, total_updates, warmup_updates)
    log(f"finetune: {config.model.backbone} -> {len(splits.class_names)} classes | {len(train_set)} train, "
        f"{len(val_set)} val images | input {data_cfg['input_size'][1]}x{data_cfg['input_size'][2]}")
    precision = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    log(f"  {accelerator.num_processes} process(es) on {accelerator.device.type} in {precision} | "
        f"{batching.describe()}, {total_updates} total, {warmup_updates} warmup")
    log(f"  {workers} loader workers per process | channels_last {'on' if channels_last else 'off'} | sync_bn "
        f"{'on' if tc.sync_bn and accelerator.num_processes > 1 else 'off'}")
    if class_weights is not None or sampler is not None:
        log(f"  class balance: sampler {config.data.sampler}, loss weights {tc.class_weights}"
            + (f" ({class_weights.min():.3g} to {class_weights.max():.3g})" if class_weights is not None else ""))
    log(plan.table())
    log(f"run directory: {run_dir.path}")

    # --- the run directory: first write happens only now, after everything above was checked and built
    start_epoch, step, best_acc, best_epoch = 0, 0, -1.0, 0
    records: list[dict] = []
    checkpoint = _checkpoint_dir(run_dir) if run_dir.resuming else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / STATE_NAME).read_text())
        start_epoch, step, best_acc, best_epoch = state["epoch"], state["step"], state["best_val_acc"], state["best_epoch"]
        if state.get("phase", 1) != plan.phase_at(start_epoch):
            raise FinetuneError(f"--resume {run_dir.path}: the checkpoint was saved for unfreezing phase {state['phase']} "
                                f"but the recipe puts epoch {start_epoch + 1} in phase {plan.phase_at(start_epoch)}; "
                                "the run's recipe.yaml was edited. Restore it or start a new run.")
        log(f"resuming {run_dir.path} after epoch {start_epoch} (update {step}, phase {plan.phase_at(start_epoch)})")
    if main:
        if run_dir.resuming:
            records = run_dir.keep_metrics_through(start_epoch)
        else:
            run_dir.create()
        run_dir.write_recipe(config)
        run_dir.write_plan(plan.to_json())
    accelerator.wait_for_everyone()

    for epoch in range(start_epoch, tc.epochs):
        # The phase is a pure function of the epoch, so a resumed run is in the same one.
        keep_eval = _enter_phase(plan, accelerator.unwrap_model(model), epoch, accelerator.num_processes)
        if len(plan.phases) > 1 and (epoch == start_epoch or any(e == epoch for e, _ in plan.phases)):
            log(f"phase {plan.phase_at(epoch)} from epoch {epoch + 1}: {plan.describe_phase(plan.phase_at(epoch))}")
        # Augmentation and dropout seeded by (seed, epoch, process): distinct per process, repeated on resume.
        set_seed(tc.seed + 1000 * (epoch + 1), device_specific=True)
        train_set.set_epoch_seed(int(torch.randint(2**62, ())))  # loader workers follow the same rule
        train_loader.set_epoch(epoch)
        started = time.perf_counter()
        step, train_loss = train_epoch(model, train_loader, optimizer, accelerator, step, schedule, tc, batching,
                                       keep_eval, channels_last, desc=f"epoch {epoch + 1}/{tc.epochs}",
                                       fault_hint=_fault_hint(run_dir, epoch), criterion=criterion, epoch=epoch)
        seconds = time.perf_counter() - started

        val = evaluate(model, val_loader, accelerator, splits.class_names, channels_last=channels_last)
        record = {"epoch": epoch + 1, "step": step, "phase": plan.phase_at(epoch), "train_loss": round(train_loss, 6),
                  **val,
                  "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                  "epoch_seconds": round(seconds, 2),
                  "train_images_per_second": round(batching.updates_per_epoch * tc.batch_size / seconds, 1)}
        records.append(record)
        improved = val["val_acc"] > best_acc
        if improved:
            best_acc, best_epoch = val["val_acc"], epoch + 1
        if main:
            run_dir.append_metrics(record)
            save_curves(records, run_dir.curves)
            save_data_report(run_dir.path, config.data.on_bad_image, splits.sizes())
            if improved:
                save_export(accelerator.unwrap_model(model), run_dir.path, splits.class_names, data_cfg)
        log(f"epoch {epoch + 1}/{tc.epochs}: train loss {train_loss:.4f} | val loss {val['val_loss']:.4f} "
            f"acc {100 * val['val_acc']:.2f}% (balanced {100 * val['val_balanced_acc']:.2f}%)"
            f"{' (best, exported)' if improved else ''} | {seconds:.1f}s")
        _save_checkpoint(accelerator, run_dir, {"epoch": epoch + 1, "step": step, "best_val_acc": best_acc,
                                                "best_epoch": best_epoch, "phase": plan.phase_at(epoch + 1)})

    def eval_loader(dataset: Transformed):
        return accelerator.prepare(build_loader(dataset, batching.per_device, False, workers, pin))
    test = _after_training(model, accelerator, config, run_dir, splits, eval_tf, bad, eval_loader, best_epoch,
                           channels_last)
    skipped = save_data_report(run_dir.path, config.data.on_bad_image, splits.sizes(), final=True) if main else 0
    test_text = (f"; test acc {100 * test['test_acc']:.2f}% (balanced {100 * test['test_balanced_acc']:.2f}%)"
                 if test else "")
    skip_text = f"; {skipped} unreadable image(s) skipped, listed in {DATA_REPORT_NAME}" if skipped else ""
    log(f"done: best val acc {100 * best_acc:.2f}% at epoch {best_epoch}{test_text}{skip_text}; model in {run_dir.path}")
    accelerator.end_training()
    return TrainResult(str(run_dir.path.resolve()), records, best_epoch, best_acc, test, skipped)


def _after_training(model, accelerator: Accelerator, config: RecipeConfig, run_dir: RunDir, splits: Splits,
                    eval_tf: Callable, bad: dict, eval_loader: Callable, best_epoch: int,
                    channels_last: bool) -> dict | None:
    """With the best epoch's weights (the export): test metrics, then the hard examples of train and val."""
    accelerator.wait_for_everyone()  # the main process wrote the export
    accelerator.unwrap_model(model).load_state_dict(load_file(str(run_dir.path / WEIGHTS_NAME)))

    def scored(dataset: Transformed) -> dict:
        return predict_all(model, eval_loader(dataset), accelerator, channels_last)
    test = None
    if splits.test is not None:
        results = scored(Transformed(splits.test, None, eval_tf, "test", substitute=False, **bad))
        test = classification_metrics(results["loss"], results["pred"], results["label"], splits.class_names, "test")
        if accelerator.is_main_process:
            run_dir.write_json(TEST_METRICS_NAME, {"epoch": best_epoch, **test})
    k = config.train.hard_examples
    if k:
        entries, images = {}, []
        for split, base, indices in (("train", splits.train, splits.train_indices),
                                     ("val", splits.val, splits.val_indices)):
            dataset = Transformed(base, indices, eval_tf, split, substitute=False, **bad)
            results = scored(dataset)
            positions = rank_hard_examples(results["loss"], results["label"], k)
            entries[split] = hard_example_entries(split, results, positions, dataset, splits.class_names)
            images += [base[dataset.indices[p]][0] for p in positions] if accelerator.is_main_process else []
        if accelerator.is_main_process:
            save_hard_examples(entries, images, run_dir.path)
    return test


def _main_process_run_dir(accelerator: Accelerator, run_dir: RunDir) -> RunDir:
    """Every process adopts the main process's run directory: a default name carries the second it was
    chosen in, so processes started a moment apart would each pick their own. Each process checked its
    choice (an existing non-empty directory is refused) before this broadcast, the run's first
    collective, and the main process writes nothing before it: no check can see another process's files."""
    return broadcast_object_list([run_dir])[0]


def _adapt_model(model: torch.nn.Module, tc: TrainConfig, accelerator: Accelerator) -> tuple[torch.nn.Module, bool]:
    """SyncBatchNorm across processes when asked, and the NHWC memory layout for conv nets on GPUs."""
    if tc.sync_bn and accelerator.num_processes > 1:
        if accelerator.device.type != "cuda":
            raise FinetuneError("train.sync_bn=true needs GPUs: PyTorch synchronises BatchNorm only on CUDA devices. "
                                "With CPU processes set it to false (each process normalises its own micro-batch).")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the parameters stay the same objects
    channels_last = tc.channels_last
    if channels_last is None:
        # A ViT's only convolution embeds patches; everything else with convolutions is a conv net.
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        channels_last = accelerator.device.type == "cuda" and convs > 1
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, channels_last


def _fault_hint(run_dir: RunDir, finished_epochs: int) -> str:
    if finished_epochs == 0:
        return "No epoch had finished, so there is no checkpoint yet."
    return (f"The checkpoint after epoch {finished_epochs} in {run_dir.checkpoint} is intact: fix the cause, then "
            f"continue with `finetune train --resume {run_dir.path}`.")


def _plan_and_optimizer(config: RecipeConfig, model, accelerator: Accelerator):
    """The plan, and an optimizer holding every group that trains in any phase. Gradients go on for all
    of them now, before accelerator.prepare: DDP registers the parameters that require gradients when it
    wraps the model and never looks again, so a group thawing at a later epoch must be on from the start
    (it waits at LR 0 with its gradients dropped, see _enter_phase). Never-trained groups stay off, so
    DDP skips them and no unused-parameter search is needed."""
    plan = build_plan(model, config.optim, config.freeze)
    plan.apply_freezing(model)
    keep_eval = plan.frozen_norm_modules(model)  # frozen BatchNorm keeps its loaded statistics
    optimizer = build_optimizer(config.optim, plan.optimizer_groups(model), fused=accelerator.device.type == "cuda")
    return plan, keep_eval, optimizer


def _enter_phase(plan, model, epoch: int, processes: int) -> list[torch.nn.Module]:
    """Set up the unfreezing phase `epoch` trains in; return the BatchNorm layers to keep in eval mode.

    Groups whose phase has not begun get LR 0 and have their gradients dropped before every optimizer step
    (train_epoch), so they stay bit for bit and no optimizer state builds up for them. In a single process
    their gradients are simply switched off, which also saves the backward pass through them; under DDP
    they stay on (see _plan_and_optimizer) and are computed, averaged, then dropped. Both give the same
    weights."""
    if processes == 1:
        plan.apply_freezing(model, epoch)
    return plan.frozen_norm_modules(model, epoch)


def prepare_benchmark(config: RecipeConfig, model, datasets: list) -> tuple[list[Callable[[], float]], torch.device, Batching, bool]:
    """The toolkit's own training step, set up as train() sets it up (precision, memory layout, pinned
    memory, batch split), over in-memory datasets of ready tensors. Returns one `run()` per dataset: an
    epoch over it through train_epoch, timed to the last kernel, in seconds; then the device, the
    batching and whether channels_last is on, so that a plain loop can be set up the same way."""
    accelerator = build_accelerator(config)
    model, channels_last = _adapt_model(model, config.train, accelerator)
    _, keep_eval, optimizer = _plan_and_optimizer(config, model, accelerator)
    tc, pin = config.train, accelerator.device.type == "cuda"
    splits = [derive_batching(tc.batch_size, tc.micro_batch_size, accelerator.num_processes, len(d)) for d in datasets]
    loaders = [build_loader(d, b.per_device, True, 0, pin) for d, b in zip(datasets, splits)]
    model, optimizer, *loaders = accelerator.prepare(model, optimizer, *loaders)
    state = {"step": 0}

    def timed(loader, batching: Batching) -> Callable[[], float]:
        def run() -> float:
            _synchronize(accelerator.device)
            started = time.perf_counter()
            state["step"], _ = train_epoch(model, loader, optimizer, accelerator, state["step"], lambda _: 1.0, tc,
                                           batching, keep_eval, channels_last, progress=False)
            _synchronize(accelerator.device)
            return time.perf_counter() - started
        return run

    return [timed(loader, b) for loader, b in zip(loaders, splits)], accelerator.device, splits[0], channels_last


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(model, loader, optimizer, accelerator: Accelerator, step: int, schedule: Callable[[int], float],
                tc: TrainConfig, batching: Batching, keep_eval=(), channels_last: bool = False, desc: str = "train",
                progress: bool = True, fault_hint: str = "", criterion: Callable | None = None,
                epoch: int = 0) -> tuple[int, float]:
    """One epoch of `batching.updates_per_epoch` optimizer updates, each over `batching.accumulation`
    micro-batches per process. Returns the update count after it and the mean loss over all processes.
    `criterion(logits, labels)` defaults to label-smoothed cross-entropy."""
    criterion = criterion or partial(F.cross_entropy, label_smoothing=tc.label_smoothing)
    model.train()
    for module in keep_eval:
        module.eval()
    main = accelerator.is_main_process
    bar = tqdm(total=batching.updates_per_epoch, desc=desc, leave=False, dynamic_ncols=True,
               **({} if main and progress else {"disable": True}))  # TQDM_DISABLE=1 silences it
    micro_batches = iter(loader)
    loss_sum = 0.0
    for _ in range(batching.updates_per_epoch):
        set_lr(optimizer, schedule(step), epoch)
        update_loss, last_loss, failure = None, None, None
        try:
            update_loss, last_loss = _forward_micro_batches(model, micro_batches, accelerator, tc,
                                                            batching.accumulation, channels_last, criterion)
        except Exception as e:
            if accelerator.num_processes == 1:
                raise  # nobody else to stop: the exception itself is the clearest report
            failure = e
            print(f"[process {accelerator.process_index}] finetune: update {step + 1} failed, stopping every "
                  f"process:\n{''.join(traceback.format_exception(e))}", file=sys.stderr, flush=True)
        losses, failed = _exchange_losses(accelerator, update_loss)
        _stop_on_fault(losses, failed, step, failure, fault_hint)
        accelerator.backward(last_loss)  # the backward that averages gradients over processes
        drop_waiting_grads(optimizer, epoch)  # before clipping: a waiting group must not shrink the others
        if tc.grad_clip is not None:
            accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum += sum(losses) / len(losses)
        bar.update()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[accelerator.process_index]:.3f}")
    # The micro-batches that fill no global batch (fewer than `accumulation`): drained, so the loader
    # ends its epoch as Accelerate expects; they come first in another epoch's order.
    for _ in micro_batches:
        pass
    bar.close()
    return step, loss_sum / max(1, batching.updates_per_epoch)


def _forward_micro_batches(model, micro_batches, accelerator: Accelerator, tc: TrainConfig, accumulation: int,
                           channels_last: bool, criterion: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward every micro-batch of one update, and backward all but the last inside `no_sync` (gradients
    add up locally, no communication). Returns the update's loss (the mean over its micro-batches) and
    the last micro-batch's loss, whose backward, the one that averages gradients over processes, waits
    until every process has reported a finite loss."""
    update_loss = torch.zeros((), device=accelerator.device)
    for i in range(accumulation):
        images, labels = next(micro_batches)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last = i == accumulation - 1
        # DDP decides at forward time whether the coming backward synchronises, so forward goes inside too.
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            # Equal micro-batches, each loss divided by their count: the gradients add up to the global mean.
            loss = criterion(model(images), labels) / accumulation
            if not last:
                accelerator.backward(loss)
        update_loss += loss.detach()
    return update_loss, loss


def _exchange_losses(accelerator: Accelerator, loss: torch.Tensor | None) -> tuple[list[float], list[int]]:
    """Every process's loss for this update, and the processes that raised, known to every process: one
    all-reduce of 2 x processes numbers, and the loop's only wait for the device. Because every process
    takes part every update, a fault anywhere stops all of them at the same update, and the epoch's
    loss needs no further reduction."""
    health = torch.zeros(2, accelerator.num_processes, device=accelerator.device)
    if loss is None:
        health[1, accelerator.process_index] = 1
    else:
        health[0, accelerator.process_index] = loss
    health = accelerator.reduce(health, reduction="sum").cpu()
    return health[0].tolist(), [rank for rank, raised in enumerate(health[1].tolist()) if raised]


def _stop_on_fault(losses: list[float], failed: list[int], update: int, failure: Exception | None, hint: str) -> None:
    """Raise the same error on every process when any of them raised or has a non-finite loss. Nothing of
    this update was applied: gradients were not averaged and the optimizer did not step."""
    processes = len(losses)
    if failed:
        who = "process" + ("es " if len(failed) > 1 else " ") + ", ".join(map(str, failed))
        raise FinetuneError(f"training stopped at update {update + 1}: {who} (of {processes}) raised an exception; "
                            f"its traceback is printed above, marked [process {failed[0]}]. {hint}",
                            raised_on_every_process=True) from failure
    bad = [rank for rank, loss in enumerate(losses) if not math.isfinite(loss)]
    if bad:
        where = f" on process {', '.join(map(str, bad))} (of {processes})" if processes > 1 else ""
        raise FinetuneError(f"training stopped at update {update + 1}: the loss is {losses[bad[0]]}{where}, so "
                            f"nothing of that update was applied. {hint} A diverging loss usually means too high a "
                            "learning rate: lower optim.lr or set train.grad_clip (e.g. 1.0); with "
                            "train.precision=fp16, try bf16 or fp32.", raised_on_every_process=True)


@torch.no_grad()
def predict_all(model: torch.nn.Module, loader, accelerator: Accelerator, channels_last: bool = False) -> dict:
    """Per-sample loss, prediction, its probability, the given label's probability and the label, over
    exactly the loader's dataset in its order (gather_for_metrics drops the padding duplicates)."""
    model.eval()
    parts: dict[str, list] = {"loss": [], "pred": [], "pred_prob": [], "given_prob": [], "label": []}
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images).float()
        probs = logits.softmax(dim=-1)
        pred_prob, pred = probs.max(dim=-1)
        given_prob = probs.gather(1, labels.clamp(min=0)[:, None])[:, 0]  # ignored labels (-100) read class 0
        loss = F.cross_entropy(logits, labels, reduction="none")  # 0 for ignored labels
        for key, value in zip(parts, accelerator.gather_for_metrics((loss, pred, pred_prob, given_prob, labels))):
            parts[key].append(value)
    return {key: torch.cat(values).cpu() for key, values in parts.items()}


def evaluate(model: torch.nn.Module, loader, accelerator: Accelerator, class_names: list[str] | None = None,
             prefix: str = "val", channels_last: bool = False) -> dict:
    """Loss, top-1, balanced and per-class accuracy over exactly the loader's dataset."""
    results = predict_all(model, loader, accelerator, channels_last)
    names = class_names or [str(i) for i in range(int(results["label"].max()) + 1)]
    return classification_metrics(results["loss"], results["pred"], results["label"], names, prefix)


def _checkpoint_dir(run_dir: RunDir):
    for path in (run_dir.checkpoint, run_dir.checkpoint.with_name(run_dir.checkpoint.name + ".old")):
        if (path / STATE_NAME).is_file():
            return path
    return None


def _save_checkpoint(accelerator: Accelerator, run_dir: RunDir, state: dict) -> None:
    """Write the state beside the last checkpoint, then swap: a kill mid-save keeps the previous one."""
    tmp = run_dir.checkpoint.with_name(run_dir.checkpoint.name + ".tmp")
    old = run_dir.checkpoint.with_name(run_dir.checkpoint.name + ".old")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its own part (its RNG states) into tmp
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps(state))
        if run_dir.checkpoint.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(run_dir.checkpoint, old)
        os.replace(tmp, run_dir.checkpoint)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
