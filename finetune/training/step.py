"""One optimizer update at a time: the epoch of training that the loop, the LR finder and the benchmark
share. Each update runs `accumulation` micro-batches per process, exchanges the processes' health before
the backward that averages gradients (faults.py), then clips, steps and updates the moving average. The
accelerator is passed in (typed; only finetune/training imports Accelerate).
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from accelerate import Accelerator

from ..data.loaders import epoch_seed, mix_seed
from ..model.optim import drop_waiting_grads, set_lr
from .faults import FAULT_CHECK_UPDATES, Health, Requests
from .inputs import model_inputs
from .session import Session

# Devices whose work the host does itself: reading the health after every update waits for nothing there,
# and a stop signal then takes effect after the update it arrived in (on a GPU: within FAULT_CHECK_UPDATES).
HOST_DEVICES = ("cpu",)


def train_epoch(s: Session, accelerator: Accelerator, epoch: int, update: int, fault_hint: str = "",
                phase_epoch: int | None = None, requests: Requests | None = None,
                start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """One epoch of `updates_per_epoch` optimizer updates, each over `accumulation` micro-batches per
    process, from its update `start` on (a run resumed mid-epoch: the sampler skips what was drawn).
    Yields, after each update, the update count and that update's loss averaged over processes,
    as a device tensor: reading it makes the host wait for the device, so the loop reads it only where
    faults.py reads the health anyway (every FAULT_CHECK_UPDATES updates on a GPU, every update on a CPU,
    at the end of the epoch, and whenever `requests` asks).
    The training loop takes every update; the LR finder stops when it has seen enough, and trains every
    pass in the unfreezing phase of one epoch (`phase_epoch`, default `epoch`). `requests` (interrupt.Pauses,
    or the LR finder's read of every update): exchanged with the health and read on its cadence."""
    phase_epoch = epoch if phase_epoch is None else phase_epoch
    # The phase, the data order and the augmentation are functions of the epoch (and a sample's place in
    # it), dropout of the update, so a run resumed at any update repeats them: nothing depends on how many
    # updates this process ran before.
    keep_eval = _enter_phase(s, accelerator, phase_epoch)
    s.train_set.set_epoch_seed(epoch_seed(s.seed, epoch))
    s.sampler.start = start * s.batching.global_batch
    s.train_loader.set_epoch(epoch)
    s.model.train()
    for module in keep_eval:
        module.eval()
    every = 1 if accelerator.device.type in HOST_DEVICES else FAULT_CHECK_UPDATES
    watch = Health(accelerator, s.optimizer, every, fault_hint, requests)
    micro_batches = iter(s.train_loader)
    for i in range(start, s.batching.updates_per_epoch):
        seed_everything(mix_seed(s.seed, update, accelerator.process_index))  # dropout, drop-path
        set_lr(s.optimizer, s.schedule(update), phase_epoch, update, s.batching.updates_per_epoch, s.rewarm_updates)
        update_loss, last_loss, failure = None, None, None
        try:
            update_loss, last_loss = _forward_micro_batches(s, accelerator, micro_batches, epoch, i)
        except Exception as e:
            if accelerator.num_processes == 1:
                raise  # nobody else to stop: the exception itself is the clearest report
            failure = e
        loss = watch.record(update, update_loss, failure)
        if watch.every == 1:
            watch.check()  # this optimizer cannot skip on the device: read before anything is applied
        with watch.peers():
            accelerator.backward(last_loss)  # the backward that averages gradients over processes
        drop_waiting_grads(s.optimizer, phase_epoch)  # before clipping: a waiting group must not shrink the others
        if s.grad_clip is not None:
            accelerator.clip_grad_norm_(s.model.parameters(), s.grad_clip)
        s.optimizer.step()  # skipped on the device from a bad update on (faults.py)
        s.optimizer.zero_grad(set_to_none=True)
        if s.ema is not None:
            s.ema.update(s.network, step=update)
        update += 1
        watch.after_update(update, epoch_ended=i == s.batching.updates_per_epoch - 1)
        yield update, loss
    # The micro-batches that fill no global batch (fewer than `accumulation`): drained, so the loader
    # ends its epoch as Accelerate expects; they come first in another epoch's order.
    for _ in micro_batches:
        pass
    s.sampler.start = 0


def _enter_phase(s: Session, accelerator: Accelerator, epoch: int) -> list[torch.nn.Module]:
    """Set up the unfreezing phase `epoch` trains in; return the BatchNorm layers to keep in eval mode.
    Groups whose phase has not begun get LR 0 and their gradients dropped before every step, so they
    stay bit for bit. In one process their gradients are switched off, saving the backward pass; under
    DDP they stay on (see session.py) and are computed, averaged, then dropped. Same weights either way."""
    if accelerator.num_processes == 1:
        s.plan.apply_freezing(s.network, epoch)
    return s.plan.frozen_norm_modules(s.network, epoch)


def _forward_micro_batches(s: Session, accelerator: Accelerator, micro_batches, epoch: int = 0, update_in_epoch: int = 0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward every micro-batch of one update, and backward all but the last inside `no_sync` (gradients
    add up locally, no communication). Returns the update's loss (the mean over its micro-batches) and
    the last micro-batch's loss, whose backward, the one that averages gradients over processes, comes
    after the processes exchanged their health (faults.py). Accumulation is written out rather than taken
    from `accelerator.accumulate()`, which would run that averaging backward before that exchange."""
    update_loss = torch.zeros((), device=accelerator.device)
    accumulation = s.batching.accumulation
    for i in range(accumulation):
        images, labels = model_inputs(next(micro_batches), s.train_augment, s.runtime.channels_last)
        if s.mixing is not None:  # mixup/cutmix on the device's inputs; the labels become soft targets
            images, labels = s.mixing(images, labels, epoch, update_in_epoch, i)
        last = i == accumulation - 1
        # DDP decides at forward time whether the coming backward synchronises, so forward goes inside too.
        with contextlib.nullcontext() if last else accelerator.no_sync(s.model):
            # Equal micro-batches, each loss divided by their count: the gradients add up to the global mean.
            loss = s.criterion(s.model(images), labels) / accumulation
            if not last:
                accelerator.backward(loss)
        update_loss += loss.detach()
    return update_loss, loss


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every device's) with `seed`: a host-side call, cheap
    enough for every update."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
