"""Checks of the training techniques' keys, mixing (train.mixup, cutmix, mix_prob, mix_switch_prob) and
early stopping (train.early_stop), and of what the tasks other than single_label cannot combine with
(`task: multi_label`, `task: regression`, finetune/tasks/): ranges and the combinations that cannot work,
as rules that load.py checks with every other key's, so one error lists every problem of a recipe.
"""

from __future__ import annotations

from .schema import MAX_EARLY_STOP_DELTA, MAX_EPOCHS, MAX_MIX_ALPHA, RecipeConfig

# The val_* metrics each task writes every epoch (tasks/*.py), which early stopping may watch.
TASK_METRICS = {"single_label": ("val_acc", "val_balanced_acc", "val_loss"), "multi_label": ("val_map", "val_loss"),
                "regression": ("val_mae", "val_rmse", "val_r2", "val_loss")}


def technique_rules(c: RecipeConfig) -> list[tuple[str, bool, str]]:
    """(dotted key, whether its value is fine, what the message says after the value) for load.py."""
    tc, mixing = c.train, c.train.mixup > 0 or c.train.cutmix > 0
    single = c.task == "single_label"  # the other tasks refuse what assumes one class per image
    numbers = c.task == "regression"
    advice = ("train.class_weights=auto (BCE pos_weight)" if c.task == "multi_label" else
              "a sampler that draws every image (shuffle)")
    rules = [
        ("data.sampler", single or c.data.sampler == "shuffle", "draws every class equally often, which needs one "
         f"class per image; with task {c.task} use {advice}"),
        ("optim.name", single or c.optim.name != "lbfgs", f"fits a softmax regression; with task {c.task} use adamw"),
        ("train.head_init", single or c.train.head_init != "probe", f"fits a softmax probe; with task {c.task} use "
         "zero"),
        ("train.mixup", single or not mixing, f"and train.cutmix mix one-hot targets with timm's Mixup; task {c.task} "
         "cannot use them yet: set both to 0"),
        ("train.class_weights", not numbers or tc.class_weights == "none", "weighs each class's loss, but task "
         "regression has numbers, not classes: set train.class_weights=none (train.loss=huber lets a few wrong "
         "targets pull less)"),
        ("train.loss", numbers or tc.loss is None, f"chooses the loss of task regression (mse or huber); task "
         f"{c.task} trains with its own cross-entropy (train.label_smoothing and train.class_weights adjust it). "
         "Remove train.loss, or set task: regression to predict a number per image"),
        ("train.mixup", 0 <= tc.mixup <= MAX_MIX_ALPHA, f"must be in [0, {MAX_MIX_ALPHA:g}] (0 turns mixup off)"),
        ("train.cutmix", 0 <= tc.cutmix <= MAX_MIX_ALPHA, f"must be in [0, {MAX_MIX_ALPHA:g}] (0 turns cutmix off)"),
        ("train.mix_prob", 0 <= tc.mix_prob <= 1, "is a probability, in [0, 1]"),
        ("train.mix_switch_prob", 0 <= tc.mix_switch_prob <= 1, "is a probability, in [0, 1]"),
        # Soft targets have no single class to weigh; a balanced sampler evens the classes out before mixing.
        ("train.class_weights", tc.class_weights == "none" or not mixing,
         "weighs each image's loss by its class, but with train.mixup/train.cutmix an image is a mix of two classes "
         "and the loss is timm's SoftTargetCrossEntropy, which has no class weights; set train.class_weights=none "
         "and data.sampler=balanced to give rare classes their share"),
        ("optim.name", c.optim.name != "lbfgs" or not mixing,
         "fits the head once on cached features of unmixed images, but train.mixup/train.cutmix mix the images of "
         "every step; set both to 0, or train the head with adamw or sgd (the frozen body then runs every step)"),
    ]
    stop = tc.early_stop
    if stop is not None:
        watched = TASK_METRICS[c.task]
        rules += [("train.early_stop.metric", stop.metric in watched, f"is not a metric task {c.task} writes; watch "
                   f"one of {', '.join(watched)} (its best epoch is picked by {watched[0]})"),("train.early_stop.patience", 1 <= stop.patience <= MAX_EPOCHS,
                   f"must be between 1 and {MAX_EPOCHS} epochs (train.early_stop: null turns early stopping off)"),
                  ("train.early_stop.min_delta", 0 <= stop.min_delta <= MAX_EARLY_STOP_DELTA,
                   f"must be in [0, {MAX_EARLY_STOP_DELTA:g}], in the metric's unit (accuracies are fractions)")]
    return rules
