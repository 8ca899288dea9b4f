"""A fault on any process stops every process at the same update, before anything of it is applied.

Every update the processes exchange their losses and whether they raised (one all-reduce of 2 x processes
numbers) before the backward pass that averages gradients. An exception or a non-finite loss anywhere
then raises the same FinetuneError on every process, naming the process and the update; nothing of that
update reaches the weights, and the last checkpoint stays intact. The accelerator is passed in: only
the loop imports Accelerate.
"""

from __future__ import annotations

import math

import torch

from ..errors import FinetuneError


class NonFiniteLoss(FinetuneError):
    """The loss of an update was NaN or infinite on some process (the LR finder ends its sweep on it)."""


def exchange_losses(accelerator, loss: torch.Tensor | None) -> tuple[list[float], list[int]]:
    """Every process's loss for this update (None: it raised), and the processes that raised, known to
    every process. Because every process takes part every update, the epoch's loss needs no further
    reduction."""
    health = torch.zeros(2, accelerator.num_processes, device=accelerator.device)
    if loss is None:
        health[1, accelerator.process_index] = 1
    else:
        health[0, accelerator.process_index] = loss
    health = accelerator.reduce(health, reduction="sum").cpu()
    return health[0].tolist(), [rank for rank, raised in enumerate(health[1].tolist()) if raised]


def stop_on_fault(losses: list[float], failed: list[int], update: int, failure: Exception | None, hint: str) -> None:
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
        raise NonFiniteLoss(f"training stopped at update {update + 1}: the loss is {losses[bad[0]]}{where}, so "
                            f"nothing of that update was applied. {hint} A diverging loss usually means too high a "
                            "learning rate: lower optim.lr or set train.grad_clip (e.g. 1.0); with "
                            "train.precision=fp16, try bf16 or fp32.", raised_on_every_process=True)


def resume_hint(run_dir, finished_epochs: int) -> str:
    """What a user can do after a fault in epoch `finished_epochs + 1`."""
    if run_dir is None:
        return ""
    if finished_epochs == 0:
        return "No epoch had finished, so there is no checkpoint yet."
    return (f"The checkpoint after epoch {finished_epochs} in {run_dir.checkpoint} is intact: fix the cause, then "
            f"continue with `finetune train --resume {run_dir.path}`.")
