"""The optimizer over the plan's groups (ours, or timm's by name), and the learning-rate schedule as a pure
function of the update.

The schedule is a multiplier in [0, 1] applied to each group's own peak LR, so every ratio the plan set
(head 10x, layer decay) holds at every step whatever the schedule. It counts optimizer updates, not
batches or processes, so it ends exactly at the last update on 1 or N processes.
"""

from __future__ import annotations

import math

import torch

from ..errors import FinetuneError
from ..recipe.schema import OptimConfig

LBFGS_ITERATIONS = 25  # per epoch: 10 epochs of a linear probe run 250, enough to converge on a few thousand images


def build_optimizer(cfg: OptimConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or SGD with Nesterov momentum over explicit-LR groups; timm's optimizer
    of that name (lamb, lion, ...) over the same groups; or L-BFGS,
    which takes one group and finds its steps by line search (its L2 penalty is added to the loss by the
    fit, features.fit_epoch_lbfgs, so each group's weight decay is kept on the group for it)."""
    if cfg.name == "lbfgs":
        one_group = {"params": [p for g in param_groups for p in g["params"]],
                     "name": "+".join(g["name"] for g in param_groups)}
        return torch.optim.LBFGS([one_group], lr=cfg.lr, max_iter=LBFGS_ITERATIONS, history_size=LBFGS_ITERATIONS,
                                 line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
    # Fused kernels: the fastest step on CUDA and on CPUs (AdamW 5x the foreach step for efficientnet_lite0
    # on 2 cores), and they can skip a bad update on the device (training/faults.py).
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, fused=True)
    return _timm_optimizer(cfg, param_groups)


def _timm_optimizer(cfg: OptimConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """timm's optimizer named optim.name over the plan's groups, each keeping its explicit lr and weight decay
    (given groups, timm builds no groups of its own: the lr and weight_decay passed are defaults that every
    group overrides). These cannot skip a bad update on the device, so the loop reads the processes' health
    before every step instead (training/faults.py)."""
    from timm.optim import create_optimizer_v2

    try:
        optimizer = create_optimizer_v2(param_groups, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        momentum=cfg.momentum)
    except (ImportError, AssertionError, RuntimeError, ValueError) as e:  # bitsandbytes/apex: CUDA or a package
        raise FinetuneError(f"optim.name={cfg.name}: timm could not create it ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else 'no reason given'}). Names starting "
                            "bnb need bitsandbytes and a GPU, names starting fused need apex and a GPU; otherwise "
                            "choose another optimizer (adamw, sgd, lamb, lion, ...).") from None
    built = [(g.get("name"), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    if built != [(g["name"], g["lr"], g["weight_decay"]) for g in param_groups]:
        raise FinetuneError(f"optim.name={cfg.name}: timm's optimizer changed the plan's parameter groups or their "
                            "learning rates and weight decays, which finetune sets explicitly for every group; "
                            "choose another optimizer.")
    return optimizer


def lr_multiplier(update: int, total_updates: int, warmup_updates: int) -> float:
    """Linear warmup from ~0 to 1 over `warmup_updates`, then cosine from 1 to 0 at `total_updates`.

    `update` is the index of the update about to be taken (0-based), so the first update uses a small
    but non-zero LR and the last one a small but non-zero LR too.
    """
    if update < warmup_updates:
        return (update + 1) / (warmup_updates + 1)
    progress = (update - warmup_updates + 1) / max(1, total_updates - warmup_updates + 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def rewarm_multiplier(update: int, thaw_update: int, warmup_updates: int) -> float:
    """A group that thaws mid-run warms up again over `warmup_updates` from its first update: its Adam
    moments start from zero, and jumping straight into the cosine would hit freshly thawed weights with
    nearly the full LR while their gradients are still those of a head-only model."""
    if warmup_updates <= 0:
        return 1.0
    return min(1.0, max(0, update - thaw_update + 1) / (warmup_updates + 1))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float, epoch: int = 0, update: int = 0,
           updates_per_epoch: int = 0, rewarm_updates: int = 0) -> None:
    """Every group at its peak LR times the multiplier; a group whose phase has not begun at LR 0, and one
    that thawed mid-run times its own warmup (rewarm_multiplier) for `rewarm_updates` after its thaw."""
    for group in optimizer.param_groups:
        start = group.get("trains_from", 0)
        rewarm = rewarm_multiplier(update, start * updates_per_epoch, rewarm_updates) if start else 1.0
        group["lr"] = group["peak_lr"] * multiplier * rewarm if epoch >= start else 0.0


def drop_waiting_grads(optimizer: torch.optim.Optimizer, epoch: int) -> None:
    """Forget the gradients of groups whose phase has not begun. Torch optimizers skip a parameter whose
    .grad is None entirely: no step, no weight decay, no momentum or Adam moments, so the group waits
    bit for bit and its optimizer state starts fresh when it thaws."""
    for group in optimizer.param_groups:
        if epoch < group.get("trains_from", 0):
            for p in group["params"]:
                p.grad = None
