"""The training loop: the one module that talks to Accelerate. It reads top to bottom:

setup (data -> model -> plan -> optimizer -> loaders -> accelerate), then one loop of epochs (train,
validate, log, export the best, checkpoint), then a summary. The same code runs on CPU, one GPU or many
processes: `train.batch_size` is global, the schedule counts optimizer updates, and only the main
process writes files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .badimages import SkipLog, read_skip_logs, remove_skip_logs
from .balance import BalancedSampler, inverse_frequency_weights
from .config import RecipeConfig
from .data import Splits, Transformed, build_loader, build_transforms, default_num_workers, resolve_data_config
from .errors import FinetuneError
from .export import WEIGHTS_NAME, save_export
from .groups import build_plan
from .model import build_model
from .metrics import classification_metrics
from .optim import build_optimizer, lr_multiplier, set_lr
from .plots import save_curves, save_image_grid
from .review import HARD_EXAMPLES_PNG, hard_example_entries, rank_hard_examples, save_hard_examples
from .rundir import DATA_REPORT_NAME, TEST_METRICS_NAME, RunDir

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
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise FinetuneError("train.precision=fp16 needs a CUDA GPU; on CPU use bf16 or fp32 (or auto).")
    accelerator = Accelerator(
        # Without cpu=True, torchrun on a machine without GPUs would start N unrelated single-process jobs.
        cpu=not torch.cuda.is_available(),
        mixed_precision={"fp32": "no"}.get(precision, precision),
        # Shuffling seeded by (seed, epoch): every process agrees on the order, and resume repeats it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.train.seed),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise FinetuneError(f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate runs "
                            f"{accelerator.num_processes}; check `accelerate config` or launch with torchrun.")
    return accelerator


def train(config: RecipeConfig, run_dir: RunDir, splits: Splits, log: Callable[[str], None] | None = None) -> TrainResult:
    accelerator = build_accelerator(config)
    log = log or accelerator.print
    main = accelerator.is_main_process
    tc = config.train
    set_seed(tc.seed)  # identical model init on every process

    # --- setup, in dependency order: the class list sizes the head; the model's config gives transforms
    model = build_model(config.model, len(splits.class_names), log, config.data.image_size)
    data_cfg = resolve_data_config(model, config.data)
    train_tf, eval_tf = build_transforms(data_cfg, config.data)
    plan, keep_eval, optimizer = _plan_and_optimizer(config, model, accelerator)

    processes = accelerator.num_processes
    per_device = _per_device_batch(tc.batch_size, processes)
    workers = default_num_workers() if config.data.num_workers is None else config.data.num_workers
    pin = accelerator.device.type == "cuda"
    # Loader workers record unreadable files here; the run directory keeps them across a resume.
    bad = {"on_bad_image": config.data.on_bad_image, "skip_log": SkipLog.for_process(run_dir.path,
                                                                                    accelerator.process_index)}
    train_set = Transformed(splits.train, splits.train_indices, train_tf, "train", **bad)
    val_set = Transformed(splits.val, splits.val_indices, eval_tf, "val", substitute=False, **bad)
    sampler = BalancedSampler(splits.train_targets, tc.seed) if config.data.sampler == "balanced" else None
    train_loader = build_loader(train_set, per_device, True, workers, pin, sampler)
    val_loader = build_loader(val_set, per_device, False, workers, pin)
    class_weights = (inverse_frequency_weights(splits.train_targets, len(splits.class_names))
                     if tc.class_weights == "auto" else None)
    criterion = torch.nn.CrossEntropyLoss(weight=class_weights, label_smoothing=tc.label_smoothing)
    criterion.to(accelerator.device)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    updates_per_epoch = len(train_loader)
    total_updates = tc.epochs * updates_per_epoch
    warmup_updates = min(round(tc.warmup_epochs * updates_per_epoch), total_updates - 1)

    def schedule(update: int) -> float:
        return lr_multiplier(update, total_updates, warmup_updates)
    log(f"finetune: {config.model.backbone} -> {len(splits.class_names)} classes | {len(train_set)} train, "
        f"{len(val_set)} val images | input {data_cfg['input_size'][1]}x{data_cfg['input_size'][2]}")
    log(f"  {processes} process(es) on {accelerator.device.type} in {accelerator.mixed_precision} | global batch "
        f"{tc.batch_size} = {per_device} per process x {processes} | {updates_per_epoch} updates/epoch, "
        f"{total_updates} total, {warmup_updates} warmup | {workers} loader workers per process")
    if class_weights is not None or sampler is not None:
        log(f"  class balance: sampler {config.data.sampler}, loss weights {tc.class_weights}"
            + (f" ({class_weights.min():.3g} to {class_weights.max():.3g})" if class_weights is not None else ""))
    log(plan.table())
    log(f"run directory: {run_dir.path}")

    # --- the run directory: first write happens only now, after everything above was checked and built
    start_epoch, step, best_acc, best_epoch = 0, 0, -1.0, 0
    records: list[dict] = []
    if run_dir.resuming and _checkpoint_dir(run_dir) is not None:
        accelerator.load_state(str(_checkpoint_dir(run_dir)))
        state = json.loads((_checkpoint_dir(run_dir) / STATE_NAME).read_text())
        start_epoch, step, best_acc, best_epoch = state["epoch"], state["step"], state["best_val_acc"], state["best_epoch"]
        log(f"resuming {run_dir.path} after epoch {start_epoch} (update {step})")
    if main:
        if run_dir.resuming:
            records = run_dir.keep_metrics_through(start_epoch)
        else:
            run_dir.create()
        run_dir.write_recipe(config)
        run_dir.write_plan(plan.to_json())
    accelerator.wait_for_everyone()

    for epoch in range(start_epoch, tc.epochs):
        # Augmentation and dropout seeded by (seed, epoch, process): distinct per process, repeated on resume.
        set_seed(tc.seed + 1000 * (epoch + 1), device_specific=True)
        train_loader.set_epoch(epoch)
        started = time.perf_counter()
        step, loss_sum = train_epoch(model, train_loader, optimizer, accelerator, step, schedule, tc, keep_eval,
                                     desc=f"epoch {epoch + 1}/{tc.epochs}", criterion=criterion)
        train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(1, updates_per_epoch)
        seconds = time.perf_counter() - started

        val = evaluate(model, val_loader, accelerator, splits.class_names)
        record = {"epoch": epoch + 1, "step": step, "train_loss": round(train_loss, 6), **val,
                  "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                  "epoch_seconds": round(seconds, 2),
                  "train_images_per_second": round(updates_per_epoch * tc.batch_size / seconds, 1)}
        records.append(record)
        improved = val["val_acc"] > best_acc
        if improved:
            best_acc, best_epoch = val["val_acc"], epoch + 1
        if main:
            run_dir.append_metrics(record)
            save_curves(records, run_dir.curves)
            _write_data_report(run_dir, splits, config)
            if improved:
                save_export(accelerator.unwrap_model(model), run_dir.path, splits.class_names, data_cfg)
        log(f"epoch {epoch + 1}/{tc.epochs}: train loss {train_loss:.4f} | val loss {val['val_loss']:.4f} "
            f"acc {100 * val['val_acc']:.2f}% (balanced {100 * val['val_balanced_acc']:.2f}%)"
            f"{' (best, exported)' if improved else ''} | {seconds:.1f}s")
        _save_checkpoint(accelerator, run_dir, {"epoch": epoch + 1, "step": step, "best_val_acc": best_acc,
                                                "best_epoch": best_epoch})

    def eval_loader(dataset: Transformed):
        return accelerator.prepare(build_loader(dataset, per_device, False, workers, pin))
    test = _after_training(model, accelerator, config, run_dir, splits, eval_tf, bad, eval_loader, best_epoch)
    skipped = _write_data_report(run_dir, splits, config, final=True) if main else 0
    test_text = (f"; test acc {100 * test['test_acc']:.2f}% (balanced {100 * test['test_balanced_acc']:.2f}%)"
                 if test else "")
    skip_text = f"; {skipped} unreadable image(s) skipped, listed in {DATA_REPORT_NAME}" if skipped else ""
    log(f"done: best val acc {100 * best_acc:.2f}% at epoch {best_epoch}{test_text}{skip_text}; model in {run_dir.path}")
    accelerator.end_training()
    return TrainResult(str(run_dir.path.resolve()), records, best_epoch, best_acc, test, skipped)


def _after_training(model, accelerator: Accelerator, config: RecipeConfig, run_dir: RunDir, splits: Splits,
                    eval_tf: Callable, bad: dict, eval_loader: Callable, best_epoch: int) -> dict | None:
    """With the best epoch's weights (the export): test metrics, then the hard examples of train and val."""
    accelerator.wait_for_everyone()  # the main process wrote the export
    accelerator.unwrap_model(model).load_state_dict(load_file(str(run_dir.path / WEIGHTS_NAME)))

    def scored(dataset: Transformed) -> dict:
        return predict_all(model, eval_loader(dataset), accelerator)
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
            save_hard_examples(entries, run_dir.path)
            captions = [f"{e['split']} {e['index']}: given {e['given']}\npredicted {e['predicted']} "
                        f"({100 * e['predicted_prob']:.0f}%)" for split in entries for e in entries[split]]
            save_image_grid(images, captions, run_dir.path / HARD_EXAMPLES_PNG,
                            title="highest loss first, train then val: review these labels")
    return test


def _write_data_report(run_dir: RunDir, splits: Splits, config: RecipeConfig, final: bool = False) -> int:
    """data_report.json from every process's skip log (main process only). Returns the skipped count."""
    skipped = read_skip_logs(run_dir.path)
    sizes = {"train": len(splits.train_indices) if splits.train_indices is not None else len(splits.train),
             "val": len(splits.val_indices) if splits.val_indices is not None else len(splits.val),
             "test": len(splits.test) if splits.test is not None else 0}
    run_dir.write_json(DATA_REPORT_NAME, {"on_bad_image": config.data.on_bad_image, "images": sizes,
                                          "skipped_count": len(skipped), "skipped": skipped})
    if final:
        remove_skip_logs(run_dir.path)
    return len(skipped)


def _plan_and_optimizer(config: RecipeConfig, model, accelerator: Accelerator):
    plan = build_plan(model, config.optim, config.freeze)
    plan.apply_freezing(model)
    keep_eval = plan.frozen_norm_modules(model)  # frozen BatchNorm keeps its loaded statistics
    optimizer = build_optimizer(config.optim, plan.optimizer_groups(model), fused=accelerator.device.type == "cuda")
    return plan, keep_eval, optimizer


def _per_device_batch(batch_size: int, processes: int) -> int:
    if batch_size % processes:
        raise FinetuneError(f"train.batch_size={batch_size} is the global batch and must divide evenly over "
                            f"{processes} processes; use a multiple of {processes}.")
    return batch_size // processes


def prepare_benchmark(config: RecipeConfig, model, dataset) -> tuple[Callable[[int], float], torch.device]:
    """The toolkit's own training step, set up as train() sets it up, over an in-memory dataset of ready
    tensors. Returns `run(n)`: n updates through train_epoch, timed to the last kernel, in seconds."""
    accelerator = build_accelerator(config)
    _, keep_eval, optimizer = _plan_and_optimizer(config, model, accelerator)
    per_device = _per_device_batch(config.train.batch_size, accelerator.num_processes)
    loader = build_loader(dataset, per_device, True, 0, accelerator.device.type == "cuda")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = {"step": 0}

    def run(n: int) -> float:
        _synchronize(accelerator.device)
        started = time.perf_counter()
        state["step"], loss_sum = train_epoch(model, loader, optimizer, accelerator, state["step"], lambda _: 1.0,
                                              config.train, keep_eval, max_steps=n, progress=False)
        loss_sum.item()
        _synchronize(accelerator.device)
        return time.perf_counter() - started

    return run, accelerator.device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(model, loader, optimizer, accelerator: Accelerator, step: int, schedule: Callable[[int], float],
                tc, keep_eval=(), desc: str = "train", max_steps: int | None = None,
                progress: bool = True, criterion: Callable | None = None) -> tuple[int, torch.Tensor]:
    """One pass over `loader` (or `max_steps` batches): one optimizer update per batch. Returns the update
    count after it and the summed loss, kept on the device so that no step waits for a host sync.
    `criterion(logits, labels)` defaults to label-smoothed cross-entropy."""
    criterion = criterion or partial(F.cross_entropy, label_smoothing=tc.label_smoothing)
    model.train()
    for module in keep_eval:
        module.eval()
    main = accelerator.is_main_process
    loss_sum = torch.zeros((), device=accelerator.device)
    total = len(loader) if max_steps is None else min(max_steps, len(loader))
    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
               **({} if main and progress else {"disable": True}))  # TQDM_DISABLE=1 silences it
    for done, (images, labels) in enumerate(loader):
        if done == total:
            break
        set_lr(optimizer, schedule(step))
        loss = criterion(model(images), labels)
        accelerator.backward(loss)
        if tc.grad_clip is not None:
            accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum += loss.detach()
        bar.update()
        if step % 20 == 0 and main and not bar.disable:  # reading the loss syncs the device: only now and then
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return step, loss_sum


@torch.no_grad()
def predict_all(model: torch.nn.Module, loader, accelerator: Accelerator) -> dict:
    """Per-sample loss, prediction, its probability, the given label's probability and the label, over
    exactly the loader's dataset in its order (gather_for_metrics drops the padding duplicates)."""
    model.eval()
    parts: dict[str, list] = {"loss": [], "pred": [], "pred_prob": [], "given_prob": [], "label": []}
    for images, labels in loader:
        logits = model(images).float()
        probs = logits.softmax(dim=-1)
        pred_prob, pred = probs.max(dim=-1)
        given_prob = probs.gather(1, labels.clamp(min=0)[:, None])[:, 0]  # ignored labels (-100) read class 0
        loss = F.cross_entropy(logits, labels, reduction="none")  # 0 for ignored labels
        for key, value in zip(parts, accelerator.gather_for_metrics((loss, pred, pred_prob, given_prob, labels))):
            parts[key].append(value)
    return {key: torch.cat(values).cpu() for key, values in parts.items()}


def evaluate(model: torch.nn.Module, loader, accelerator: Accelerator, class_names: list[str] | None = None,
             prefix: str = "val") -> dict:
    """Loss, top-1, balanced and per-class accuracy over exactly the loader's dataset."""
    results = predict_all(model, loader, accelerator)
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
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps(state))
        if run_dir.checkpoint.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(run_dir.checkpoint, old)
        os.replace(tmp, run_dir.checkpoint)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
