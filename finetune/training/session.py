"""Everything one run trains with, built once from the recipe, the data and this machine: the model, its
plan and optimizer, the loss, the batch split, the datasets and loaders, the LR schedule.

The training loop, the LR finder and the benchmark all start from a `Session`, so they train the same
model with the same batches, loss, precision and memory layout. Building it touches no process group:
the loop hands the model, optimizer and loaders to Accelerate afterwards (`accelerator.prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from ..data.badimages import SkipLog
from ..data.sampling import BalancedSampler, EpochShuffle, Positioned
from ..data.splits import Splits
from ..data.transforms import build_transforms, resolve_data_config, train_size
from ..errors import FinetuneError
from ..model.backbone import build_model, fixed_input_size
from ..model.custom import check_custom_model, is_timm_like
from ..model.groups import build_plan
from ..model.optim import build_optimizer, lr_multiplier
from ..model.plan import Plan
from ..recipe.schema import RecipeConfig, TrainConfig
from ..tasks import SingleLabel, Task, build_task
from .batching import Batching, derive_batching
from .features import feature_inputs
from .inputs import Inputs, Loading, Place, image_inputs, pil_inputs
from .mixing import Mixing, build_mixing
from .plugins import Plugins, UserLoss
from .runtime import Runtime, adapt_model, resolve_runtime

WARMUP_SHARE = 0.2  # the most of a run that warmup may take


@dataclass(frozen=True)
class Session:
    model: torch.nn.Module  # what each step runs, prepared: the network, or its head alone on cached features
    network: torch.nn.Module  # the whole model, unwrapped: the plan's, the export's and the checkpoint's
    plan: Plan
    optimizer: torch.optim.Optimizer
    criterion: torch.nn.Module  # (logits, labels) -> the mean loss of a micro-batch (the task's, tasks/)
    runtime: Runtime  # as the input pipeline runs it (cached features: no workers, no channels_last)
    batching: Batching
    train_loader: DataLoader  # prepared by Accelerate: each process gets its share
    val_loader: DataLoader | None
    inputs: Inputs  # the pipeline that feeds the model (inputs.py, features.py), chosen before this was built
    loading: Loading  # how images load whatever the pipeline (the probe draws features through it)
    schedule: Callable[[int], float]  # optimizer update -> multiplier of every group's peak LR
    total_updates: int
    warmup_updates: int
    seed: int  # train.seed: augmentation by (seed, epoch, position), dropout by (seed, update, process)
    grad_clip: float | None
    data_cfg: dict  # timm's preprocessing of this backbone (the export records it)
    rewarm_updates: int = 0  # a group thawing mid-run warms up again over this many updates (0: LR-find)
    ema_decay: float | None = None  # per update; None: no moving average of the weights
    head_init: str = "zero"  # "probe": the loop fits the head on cached features before the body trains
    train_side: int = 0  # pixels of a training crop (data.train_image_size decided)
    ema: torch.nn.Module | None = None  # timm's ModelEmaV3 of the network, on the device
    mixing: Mixing | None = None  # mixup/cutmix of training micro-batches (mixing.py); None: off
    task: Task = field(default_factory=SingleLabel)  # the recipe's (or one's own), fitted to the training data
    metrics: Mapping[str, Callable] = field(default_factory=dict)  # extra val metrics of one's own (plugins.py)

    # What the input pipeline decided, read where it is used.
    train_set = property(lambda self: self.inputs.train_set)  # augmentation seeded by (epoch, position)
    sampler = property(lambda self: self.loading.sampler)  # draws with their place in the epoch (resumes skip)
    eval_view = property(lambda self: self.inputs.eval_view)  # any split as the model sees it for scoring
    train_transform = property(lambda self: self.inputs.train_transform)
    train_augment = property(lambda self: self.inputs.train_augment)  # None: loaders yield ready tensors
    eval_augment = property(lambda self: self.inputs.eval_augment)
    collate = property(lambda self: self.inputs.collate)
    input_pipeline = property(lambda self: self.inputs.description)
    features_cached = property(lambda self: self.inputs.features_cached)
    skipped = property(lambda self: self.inputs.skipped)  # unreadable files met while building the inputs


Prepare = Callable[..., tuple]  # Accelerate's prepare: (model, optimizer, loaders) for this process


def build_session(config: RecipeConfig, splits: Splits, place: Place, precision: str, skip_log_folder: Path | None,
                  log: Callable[[str], None], plugins: Plugins, prepare: Prepare) -> Session:
    """Build the run's objects in dependency order, once: the model, its plan and optimizer, the loss, how
    images load, then the input pipeline (cached features, decoded images or PIL), then Accelerate's
    `prepare` and the moving average. The caller seeds torch first (identical init on every process).
    `skip_log_folder`: where loader workers record unreadable files (None: nowhere). `plugins`: a model,
    loss or metrics of one's own (finetune.train's model=, loss=, metrics=)."""
    tc, dc = config.train, config.data
    # The class list sizes the head; the model's pretrained config gives the transforms; the runtime
    # settings depend on the model (conv net or not); SyncBatchNorm conversion comes before the plan,
    # which keeps references to the norm modules.
    model = (plugins.model if plugins.model is not None
             else build_model(config.model, len(splits.class_names), log, dc.image_size))
    data_cfg = resolve_data_config(model, dc)
    if plugins.model is not None:
        check_custom_model(model, len(splits.class_names), data_cfg["input_size"])
        log(f"model: yours, {type(model).__name__} (model.backbone {config.model.backbone}), trained in place")
    train_side = train_size(data_cfg, dc, fixed_input_size(config.model.backbone))
    runtime = resolve_runtime(tc, dc, model, precision, place.processes, place.device.type == "cuda")
    model = adapt_model(model, runtime)
    plan = build_plan(model, config.optim, config.freeze, config.model.head)
    # Gradients go on now for every group that trains in any phase: DDP registers the parameters that
    # require gradients when it wraps the model and never looks again, so a group thawing later must be
    # on from the start (it waits at LR 0 with its gradients dropped). Never-trained groups stay off.
    plan.apply_freezing(model)
    optimizer = build_optimizer(config.optim, plan.optimizer_groups(model))
    loading = _build_loading(config, splits, place, runtime, data_cfg, train_side, skip_log_folder)
    task = (plugins.task or build_task(config)).fit(splits)
    mixing = build_mixing(tc, len(splits.class_names), loading.batching, place.index)
    criterion = _build_loss(task, splits, mixing, plugins, tc, log)
    # Cached features serve a softmax head (its probe, lbfgs) on unmixed images, through timm's body/head
    # split (which a module of one's own may lack); a multi-label linear probe and a mixed batch run the body.
    if (dc.feature_cache == "auto" and plan.body_fixed and task.linear_probe and mixing is None
            and is_timm_like(model)):
        inputs = feature_inputs(model, splits, dc, loading, pil_inputs(splits, loading, "PIL, for the features"),
                                place, isinstance(optimizer, torch.optim.LBFGS), log)
    else:
        inputs = image_inputs(splits, dc, loading, place, log)
    runtime, batching = inputs.runtime or runtime, inputs.batching or loading.batching

    total = tc.epochs * batching.updates_per_epoch
    # A warmup of whole epochs would eat most of a short run: it never takes more than a fifth of it.
    warmup = min(round(tc.warmup_epochs * batching.updates_per_epoch), int(WARMUP_SHARE * total))
    head_init = tc.head_init if tc.head_init != "auto" else (
        "probe" if config.model.pretrained is not False and not plan.body_fixed and task.linear_probe
        else "zero")
    if plugins.model is not None and not is_timm_like(model):  # the probe needs timm's body/head split
        head_init = _custom_head_init(tc.head_init, model)
    ema_decay = None if inputs.features_cached else _ema_decay(tc.ema, total)  # a probe's head needs no average
    criterion.to(place.device)
    prepared_model, optimizer, train_loader, val_loader = prepare(inputs.model or model, optimizer,
                                                                  inputs.train_loader, inputs.val_loader)
    # The moving average copies the network where it now lives (checkpoint.py saves and resumes it).
    ema = ModelEmaV3(model, decay=ema_decay) if ema_decay else None
    return Session(prepared_model, model, plan, optimizer, criterion, runtime, batching, train_loader, val_loader,
                   inputs, loading, partial(lr_multiplier, total_updates=total, warmup_updates=warmup), total,
                   warmup, tc.seed, tc.grad_clip, data_cfg, rewarm_updates=warmup, ema_decay=ema_decay,
                   head_init="zero" if inputs.features_cached else head_init, train_side=train_side, ema=ema,
                   mixing=mixing, task=task,
                   metrics=plugins.metrics)


def _build_loss(task: Task, splits: Splits, mixing: Mixing | None, plugins: Plugins, tc: TrainConfig,
                log: Callable[[str], None]) -> torch.nn.Module:
    criterion = task.build_loss(splits.train_targets, len(splits.class_names), tc, mixing is not None)
    if plugins.loss is not None:  # it gets the targets above would (plugins.py); val_loss stays the built-in one
        criterion = UserLoss(plugins.loss)
        log(f"loss: yours, {criterion.name} (train.label_smoothing and class_weights not applied; val_loss is "
            "finetune's own)")
    return criterion


def _build_loading(config: RecipeConfig, splits: Splits, place: Place, runtime: Runtime, data_cfg: dict,
                   train_side: int, skip_log_folder: Path | None) -> Loading:
    """How images load whatever the pipeline: transforms, batch split, the order an epoch draws."""
    tc, dc = config.train, config.data
    train_tf, eval_tf = build_transforms(data_cfg, dc, train_side)
    images = len(splits.train) if splits.train_indices is None else len(splits.train_indices)
    batching = derive_batching(tc.batch_size, tc.micro_batch_size, place.processes, images)
    draws = batching.images_per_epoch
    sampler = Positioned(BalancedSampler(splits.train_targets, tc.seed, draws) if dc.sampler == "balanced"
                         else EpochShuffle(images, draws, tc.seed))
    skip_log = SkipLog.for_process(skip_log_folder, place.index) if skip_log_folder is not None else None
    return Loading(data_cfg, train_side, runtime, batching, sampler, train_tf, eval_tf,
                   {"on_bad_image": dc.on_bad_image, "skip_log": skip_log}, tc.seed)


def _custom_head_init(asked: str, model: torch.nn.Module) -> str:
    """train.head_init for a module of one's own without timm's interface: its head as it comes ("zero": the
    loop fits nothing first; finetune zeroes only heads it made itself)."""
    if asked == "probe":
        raise FinetuneError(f"train.head_init=probe fits the head on the body's features, which needs timm's "
                            f"forward_features, forward_head and get_classifier; {type(model).__name__} lacks them. "
                            "Set train.head_init to zero (your head as you initialised it) or auto.")
    return "zero"


def _ema_decay(ema: float | str | None, total_updates: int) -> float | None:
    """train.ema as a decay per update; auto: the weight of an update halves after a tenth of the run."""
    if ema == "auto":
        return 0.5 ** (1 / max(1.0, total_updates / 10))
    return ema


def describe(session: Session, config: RecipeConfig, splits: Splits) -> str:
    """The set-up as printed before training: what trains on what, how the batch is split, the plan."""
    size = session.data_cfg["input_size"]
    weights = getattr(session.criterion, "weight", None)  # a loss of one's own may have none
    lines = [f"finetune: {config.model.backbone} -> {session.task.describe_head(splits.class_names)} | "
             f"{len(session.train_set)} train, {len(session.val_loader.dataset)} val images | input {size[1]}x{size[2]}"
             + (f", training crops {session.train_side}x{session.train_side}" if session.train_side != size[2] else ""),
             f"  {session.runtime.describe()}"
             + (f"\n  input: {session.input_pipeline}" if session.input_pipeline else ""),
             f"  {session.batching.describe()}, {session.total_updates} total, {session.warmup_updates} warmup"
             + (" (and again for each group that thaws)" if session.rewarm_updates and len(session.plan.phases) > 1
                else "")
             + (f" | EMA of the weights, decay {session.ema_decay:.4g}" if session.ema_decay else "")]
    if weights is not None or config.data.sampler == "balanced":
        lines.append(f"  class balance: sampler {config.data.sampler}, loss weights {config.train.class_weights}"
                     + (f" ({weights.min():.3g} to {weights.max():.3g})" if weights is not None else ""))
    if session.mixing is not None:
        frozen = " | the frozen body runs every step: cached features are not images" if session.plan.body_fixed else ""
        lines.append(f"  {session.mixing.describe()}{frozen}")
    return "\n".join(lines + [session.plan.table()])
