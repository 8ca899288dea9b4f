"""The bounds and combinations of a recipe's keys that their types alone cannot express, as rules load.py
checks all at once, so one error lists every problem of a recipe. Each bound (schema.py) lies far beyond
any sensible fine-tune: only a typo or `inf` trips it, before anything is written."""

from __future__ import annotations

from .interval import checkpoint_interval
from .schema import (
    MAX_BATCH_SIZE,
    MAX_COLOR_JITTER,
    MAX_EPOCHS,
    MAX_GRAD_CLIP,
    MAX_HARD_EXAMPLES,
    MAX_IMAGE_SIZE,
    MAX_LR,
    MAX_LR_MULT,
    MAX_NUM_WORKERS,
    MAX_SEED,
    MAX_STAGES,
    MAX_WEIGHT_DECAY,
    RecipeConfig,
)
from .techniques import technique_rules


def value_rules(c: RecipeConfig) -> list[tuple[str, bool, str]]:
    """(dotted key, whether its value is fine, what the message says after the value)."""
    rules = [
        ("optim.lr", 0 < c.optim.lr <= MAX_LR, f"must be in (0, {MAX_LR:g}]"),
        ("optim.head_lr_mult", 0 < c.optim.head_lr_mult <= MAX_LR_MULT, f"must be in (0, {MAX_LR_MULT:g}]"),
        ("optim.weight_decay", 0 <= c.optim.weight_decay <= MAX_WEIGHT_DECAY, f"must be in [0, {MAX_WEIGHT_DECAY:g}]"),
        ("optim.momentum", 0 <= c.optim.momentum < 1, "must be in [0, 1)"),
        ("train.epochs", 1 <= c.train.epochs <= MAX_EPOCHS, f"must be between 1 and {MAX_EPOCHS}"),
        ("train.batch_size", c.train.batch_size == "auto" or 1 <= c.train.batch_size <= MAX_BATCH_SIZE,
         f"must be between 1 and {MAX_BATCH_SIZE}, or auto"),
        ("train.ema", c.train.ema in (None, "auto") or 0 < c.train.ema < 1, "is a decay in (0, 1), auto or null"),
        ("train.micro_batch_size", c.train.micro_batch_size is None or 1 <= c.train.micro_batch_size <= MAX_BATCH_SIZE,
         f"must be between 1 and {MAX_BATCH_SIZE}, or null"),
        ("train.seed", 0 <= c.train.seed <= MAX_SEED, f"must be between 0 and 2**32 - 1 ({MAX_SEED})"),
        ("train.warmup_epochs", 0 <= c.train.warmup_epochs <= MAX_EPOCHS, f"must be in [0, {MAX_EPOCHS}]"),
        ("train.label_smoothing", 0 <= c.train.label_smoothing < 1, "must be in [0, 1)"),
        ("train.grad_clip", c.train.grad_clip is None or 0 < c.train.grad_clip <= MAX_GRAD_CLIP,
         f"must be in (0, {MAX_GRAD_CLIP:g}] or null"),
        ("train.checkpoint_every", _is_interval(c.train.checkpoint_every),
         "must be a number of updates (1 to 10,000,000), a duration from 1s to 168h such as 15min, 90s or 2h, "
         "or null"),
        ("data.val_fraction", 0 < c.data.val_fraction < 1, "must be between 0 and 1"),
        ("data.image_size", c.data.image_size is None or 8 <= c.data.image_size <= MAX_IMAGE_SIZE,
         f"must be between 8 and {MAX_IMAGE_SIZE} pixels, or null"),
        ("data.train_image_size", c.data.train_image_size in (None, "auto")
         or 8 <= c.data.train_image_size <= MAX_IMAGE_SIZE,
         f"must be between 8 and {MAX_IMAGE_SIZE} pixels, auto or null"),
        ("data.crop_pct", c.data.crop_pct is None or 0 < c.data.crop_pct <= 1, "must be in (0, 1] or null"),
        ("data.scale", 0 < c.data.scale[0] <= c.data.scale[1] <= 1, "must be [min, max] with 0 < min <= max <= 1"),
        ("data.hflip", 0 <= c.data.hflip <= 1, "is a probability, in [0, 1]"),
        ("data.color_jitter", 0 <= c.data.color_jitter <= MAX_COLOR_JITTER, f"must be in [0, {MAX_COLOR_JITTER:g}]"),
        ("data.num_workers", c.data.num_workers is None or 0 <= c.data.num_workers <= MAX_NUM_WORKERS,
         f"must be between 0 and {MAX_NUM_WORKERS}, or null (as many as this machine's cores suit)"),
        ("data.feature_views", 1 <= c.data.feature_views <= 64, "must be between 1 and 64"),
        ("train.hard_examples", 0 <= c.train.hard_examples <= MAX_HARD_EXAMPLES,
         f"must be between 0 and {MAX_HARD_EXAMPLES} (0 turns hard examples off)"),
        ("model.drop_path_rate", 0 <= c.model.drop_path_rate < 1, "must be in [0, 1)"),
        ("optim.layer_decay", c.optim.layer_decay is None or 0 < c.optim.layer_decay <= 1, "must be in (0, 1] or null"),
        ("optim.lr_mult", all(0 < v <= MAX_LR_MULT for v in c.optim.lr_mult.values()),
         f"multipliers must be in (0, {MAX_LR_MULT:g}] (to stop a parameter from learning, list it in "
         "freeze.patterns)"),
        ("freeze.stages", 0 <= c.freeze.stages <= MAX_STAGES, f"must be between 0 and {MAX_STAGES}"),
        ("freeze.stages", not (c.freeze.backbone and c.freeze.stages),
         "and freeze.backbone=true both set; the backbone already takes every stage: keep one"),
        ("freeze.unfreeze_at", c.freeze.unfreeze_at is None or 0 < c.freeze.unfreeze_at < c.train.epochs,
         f"must be an epoch between 1 and train.epochs - 1 ({c.train.epochs - 1}) or null"),
        ("freeze.unfreeze_at", c.freeze.unfreeze_at is None or c.freeze.backbone or c.freeze.stages > 0,
         "thaws what freeze.backbone or freeze.stages froze; set one of them too"),
        ("freeze.unfreeze_at", c.freeze.unfreeze_at is None or not c.freeze.phases,
         "and freeze.phases both set; unfreeze_at E is the same as phases {E: 0}: keep one"),
        ("optim.name", c.optim.name != "lbfgs" or (c.freeze.backbone and c.freeze.batch_norm() == "frozen"
                                                   and c.freeze.unfreeze_at is None and not c.freeze.phases
                                                   and c.data.feature_cache == "auto"),
         "fits a linear probe's head on cached features: it needs freeze.backbone=true for the whole run, "
         "freeze.bn auto or frozen and data.feature_cache auto; use adamw or sgd to train more than the head"),
        ("train.threshold", 0 < c.train.threshold < 1, "is a probability, in (0, 1)"),
        ("freeze.phases", all(0 <= e < c.train.epochs and 0 <= n <= MAX_STAGES for e, n in c.freeze.phases.items()),
         f"maps epochs in [0, {c.train.epochs - 1}] to numbers of frozen stages in [0, {MAX_STAGES}]"),
    ]
    return rules + technique_rules(c)  # mixing, early stopping, what the tasks cannot combine with


def _is_interval(value) -> bool:
    try:
        checkpoint_interval(value)
    except ValueError:
        return False
    return True
