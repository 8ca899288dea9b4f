"""A fault on any process stops every process, and nothing of a bad update is applied, without the loop
waiting for the device every update.

Every update the processes all-reduce a small health tensor (each process's loss, whether it raised, and
its request to checkpoint or stop: interrupt.py) before the backward pass that averages gradients. The
tensor stays on the device: reading it would make the host wait for the device once per update, which
idles a GPU while the next update is queued.
Instead the optimizer skips every update from a non-finite loss on, on the device (the `found_inf` flag
that PyTorch's fused AdamW and SGD read, as GradScaler uses it), and the host reads the collected health
every FAULT_CHECK_UPDATES updates and at the end of each epoch, before anything is validated, exported or
checkpointed. A bad update then raises the same FinetuneError on every process, naming the process and
the update; the weights are those before it, and the last checkpoint is intact. Optimizers that cannot
skip on the device (and fp16, whose GradScaler owns that flag) are checked after every update instead.

An exception is different: the process that raised reports it through the health all-reduce, prints
it and stops. The others learn of it in the next collective they block in (a gloo peer closing its
connection), or are stopped by the launcher, which ends every process when one exits with an error.
The accelerator is passed in (typed; only finetune/training imports Accelerate).
"""

from __future__ import annotations

import contextlib
import math
import sys
import traceback
from typing import Protocol

import torch
from accelerate import Accelerator

from ..errors import FinetuneError

FAULT_CHECK_UPDATES = 50  # host reads of the health per epoch: one per 50 updates, and one at its end


class NonFiniteLoss(FinetuneError):
    """The loss of an update was NaN or infinite on some process (the LR finder ends its sweep on it)."""


class Requests(Protocol):
    """What travels with the health besides faults (interrupt.Pauses): this process's request after an
    update, which updates must be read whatever the fault cadence, and what every process read."""

    def request(self) -> int: ...

    def read_due(self, updates_done: int) -> bool: ...

    def agree(self, requested: int) -> None: ...


class Health:
    """The health of one epoch's updates: each process's loss, whether it raised, and its request (none,
    checkpoint, stop), kept on the device in one record and read on one cadence: every `every` updates,
    at the end of the epoch, and whenever `requests` needs an answer (a checkpoint due by count)."""

    def __init__(self, accelerator: Accelerator, optimizer, every: int = FAULT_CHECK_UPDATES, hint: str = "",
                 requests: Requests | None = None):
        self.accelerator, self.hint, self.requests = accelerator, hint, requests
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps the torch optimizer
        can_skip = (getattr(inner, "_step_supports_amp_scaling", False)
                    and getattr(accelerator, "scaler", None) is None)
        self.every = every if can_skip else 1
        self.requested = 0  # the largest request (interrupt.py) of any process read so far
        self.rows: list[torch.Tensor] = []
        self.first_update = 0
        # 1 from the first bad update on: the fused optimizer then leaves weights and moments as they are.
        self.skip = torch.zeros((), device=accelerator.device)
        if can_skip:
            inner.found_inf, inner.grad_scale = self.skip, None

    def record(self, update: int, loss: torch.Tensor | None, failure: BaseException | None = None) -> torch.Tensor:
        """Exchange this update's health (`loss` None: this process raised `failure`) and this process's
        request; return the mean loss over processes as a device tensor. The process that raised stops
        here, reporting it."""
        processes = self.accelerator.num_processes
        request = self.requests.request() if self.requests is not None else 0
        if not self.rows:
            self.first_update = update
        health = torch.zeros(3, processes, device=self.accelerator.device)
        health[2, self.accelerator.process_index] = request
        if loss is None:
            health[1, self.accelerator.process_index] = 1
        else:
            health[0, self.accelerator.process_index] = loss
        health = self.accelerator.reduce(health, reduction="sum")
        self.rows.append(health)
        if failure is not None:
            print(f"[process {self.accelerator.process_index}] finetune: update {update + 1} failed, stopping every "
                  f"process:\n{''.join(traceback.format_exception(failure))}", file=sys.stderr, flush=True)
            self.check(raised_here=True)
        bad = (~torch.isfinite(health[0])).any() | (health[1] > 0).any()
        self.skip.copy_(torch.maximum(self.skip, bad.float()))
        return health[0].sum() / processes

    def due(self, updates_done: int, epoch_ended: bool) -> bool:
        asked = self.requests is not None and self.requests.read_due(updates_done)
        return bool(self.rows) and (epoch_ended or asked or updates_done % self.every == 0)

    def after_update(self, updates_done: int, epoch_ended: bool) -> None:
        """Read the health when due; then every process knows the same requests (interrupt.py)."""
        if self.due(updates_done, epoch_ended):
            self.check()
        if self.requests is not None:
            self.requests.agree(self.requested)

    def check(self, raised_here: bool = False) -> list[float]:
        """Read the collected health (one wait for the device); raise on the first bad update; return
        the mean loss of each update read."""
        if not self.rows:
            return []
        rows, first = torch.stack(self.rows).cpu(), self.first_update
        self.rows = []
        self.requested = max(self.requested, int(rows[:, 2].max()))
        means = []
        for k, row in enumerate(rows):
            losses, failed = row[0].tolist(), [rank for rank, raised in enumerate(row[1].tolist()) if raised]
            stop_on_fault(losses, failed, first + k, self.hint, raised_here=raised_here,
                          skipped_after=len(rows) - 1 - k)
            means.append(sum(losses) / len(losses))
        return means

    @contextlib.contextmanager
    def peers(self):
        """A collective that fails because another process stopped: report that process's fault."""
        try:
            yield
        except Exception:
            if self.accelerator.num_processes == 1 or not self.rows:
                raise
            self.check()
            raise


def stop_on_fault(losses: list[float], failed: list[int], update: int, hint: str, raised_here: bool = False,
                  skipped_after: int = 0) -> None:
    """Raise the same error on every process when any of them raised or has a non-finite loss at
    `update` (0-based). Nothing of that update, nor of the `skipped_after` updates queued after it before
    this check, was applied. The process that raised reports an exception; the others stay silent."""
    processes = len(losses)
    if failed:
        who = "process" + ("es " if len(failed) > 1 else " ") + ", ".join(map(str, failed))
        raise FinetuneError(f"training stopped at update {update + 1}: {who} (of {processes}) raised an exception; "
                            f"its traceback is printed above, marked [process {failed[0]}]. {hint}",
                            raised_on_every_process=processes > 1 and not raised_here,
                            reported_elsewhere=processes > 1 and not raised_here)
    bad = [rank for rank, loss in enumerate(losses) if not math.isfinite(loss)]
    if bad:
        where = f" on process {', '.join(map(str, bad))} (of {processes})" if processes > 1 else ""
        later = (f" (nor of the {skipped_after} update{'s' if skipped_after > 1 else ''} after it, skipped on the "
                 "device until this check)" if skipped_after > 0 else "")
        raise NonFiniteLoss(f"training stopped at update {update + 1}: the loss is {losses[bad[0]]}{where}, so "
                            f"nothing of that update was applied{later}. {hint} A diverging loss usually means too "
                            "high a learning rate: lower optim.lr or set train.grad_clip (e.g. 1.0); with "
                            "train.precision=fp16, try bf16 or fp32.", raised_on_every_process=True)


def resume_hint(run_dir, finished_epochs: int) -> str:
    """What a user can do after a fault in epoch `finished_epochs + 1`."""
    if run_dir is None:
        return ""
    if finished_epochs == 0:
        return "No epoch had finished, so there is no checkpoint yet."
    return (f"The checkpoint after epoch {finished_epochs} in {run_dir.checkpoint} is intact: fix the cause, then "
            f"continue with `finetune train --resume {run_dir.path}`.")
