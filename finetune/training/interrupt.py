"""Stopping without losing work: checkpoints in the middle of an epoch (train.checkpoint_every) and a
graceful stop on SIGTERM or SIGINT, the signals schedulers (SLURM, Kubernetes, spot instances) and Ctrl-C
send before a kill.

A process decides nothing alone. Each update it puts its request (0 nothing, 1 a checkpoint is due by the
clock, 2 a stop signal arrived) into the health tensor the processes all-reduce anyway (faults.py); when
the host reads that tensor, every process sees the same requests at the same update and they act together:
all write one checkpoint, and on a stop all raise `Interrupted`, which names the checkpoint and the command
that continues the run. A checkpoint due by update count needs no exchange: every process counts the same.
On a CPU the health is read after every update (it costs nothing there), on a GPU every FAULT_CHECK_UPDATES
updates, so a stop takes effect within that many updates. A signal that arrives while the epoch's end is
validated or checkpointed stops the run right after that checkpoint (one small exchange per epoch).

A stop after the last epoch (or the epoch early stopping ended training with) is a stop too, exit code
and all: the checkpoint and the export hold the finished training, and the scoring that follows (test
metrics, val report, hard examples, model card) is left to `finetune train --resume RUN`, which trains
nothing and only scores. A scheduler's SIGTERM leaves seconds before its kill, and scoring a large test set
takes longer; a Ctrl-C means stop. Outside training (set-up, scoring) signals keep their default actions:
Ctrl-C becomes a stop saying what to run next (rundir/folder.py), SIGTERM ends the process.

The first signal asks for this stop; a second one, a second or more later, ends the process at once (the
default action of the signal). Copies of one signal that arrive together count once: a terminal's Ctrl-C
reaches torchrun and its workers, and torchrun then sends it on to the workers again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator

from ..errors import Stopped
from ..recipe.interval import checkpoint_interval

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELAY_SECONDS = 1.0  # copies of one signal within this time (a launcher passing it on) count as one
NOTHING, CHECKPOINT, STOP = 0, 1, 2  # a process's request, exchanged with its health


class Interrupted(Stopped):
    """A stop signal ended training after a checkpoint, on every process; the exit code is the shell's for
    that signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, signum, raised_on_every_process=True)


class Pauses:
    """When this run writes a checkpoint inside an epoch, and whether it stops after it."""

    def __init__(self, checkpoint_every: int | str | None, is_main_process: bool):
        self.every_updates, self.every_seconds = checkpoint_interval(checkpoint_every)
        self.main = is_main_process
        self.signum: int | None = None  # the first stop signal this process received
        self.signal_time = 0.0
        self.agreed = NOTHING  # what the processes requested, as of the last health read
        self.last_save = time.monotonic()

    def request(self) -> int:
        """This process's request for the update that just ran (exchanged with its health)."""
        if self.signum is not None:
            return STOP
        due = self.every_seconds is not None and time.monotonic() - self.last_save >= self.every_seconds
        return CHECKPOINT if due and self.main else NOTHING  # one clock decides: the main process's

    def read_due(self, updates_done: int) -> bool:
        """Whether the health must be read after this update: a checkpoint is due by count."""
        return self.every_updates is not None and updates_done % self.every_updates == 0

    def agree(self, requested: int) -> None:
        self.agreed = max(self.agreed, requested)

    def checkpoint_due(self, updates_done: int, epoch_ended: bool) -> bool:
        """Whether every process writes a checkpoint now, after this update (the end of an epoch has its own)."""
        return not epoch_ended and (self.agreed != NOTHING or self.read_due(updates_done))

    @property
    def stopping(self) -> bool:
        return self.agreed == STOP

    def saved(self) -> None:
        self.last_save = time.monotonic()
        if self.agreed == CHECKPOINT:
            self.agreed = NOTHING

    def stop_after_epoch(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop (also while the epoch's end was validated and saved):
        one small all-reduce, at the end of an epoch."""
        flag = torch.tensor(float(self.signum is not None or self.stopping), device=accelerator.device)
        stop = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        if stop:
            self.agreed = STOP
        return stop

    def interrupted(self, run_path: Path, where: str, trained: bool = False) -> Interrupted:
        """The error every process raises once the stop's checkpoint is written (`where`: its place;
        `trained`: it was the last epoch's, and only the scoring is left)."""
        name = signal.Signals(self.signum).name if self.signum is not None else "a signal to another process"
        if trained:
            return Interrupted(f"stopped by {name} {where}: training is complete (its state is in "
                               f"{run_path / 'checkpoint'}, the best epoch's model in {run_path}) but not yet scored "
                               f"(test metrics, val report, model card). `finetune train --resume {run_path}` scores "
                               "it without training again.", self.signum or signal.SIGTERM)
        return Interrupted(f"stopped by {name} {where}; every process saved its state in {run_path / 'checkpoint'}. "
                           f"Continue with `finetune train --resume {run_path}` (a requeued job script can always run "
                           f"`finetune train RECIPE --output {run_path} --resume auto`, which starts afresh when "
                           "there is nothing to resume).", self.signum or signal.SIGTERM)

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT ask for a graceful stop while training runs; the previous handlers come back
        after. Outside the main thread (a server's worker thread) Python cannot take signals: nothing changes."""
        previous = {}
        try:
            for signum in STOP_SIGNALS:
                previous[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not the main thread of the main interpreter
            pass
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.signal_time = signum, now
            if self.main:
                print(f"\nfinetune: {signal.Signals(signum).name} received: finishing this update, then writing a "
                      "checkpoint on every process and stopping. Send it again to stop at once.",
                      file=sys.stderr, flush=True)
            return
        if now - self.signal_time < RELAY_SECONDS:
            return  # the same stop passed on by a launcher, not a second request
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
