"""Mixup and CutMix of training batches (train.mixup, train.cutmix, train.mix_prob, train.mix_switch_prob),
through timm's `Mixup`, and the soft-target loss they train with.

The mixing happens on the device, on the model's inputs (after `inputs.model_inputs`, so the decoded-image
pipeline's augmentation has run), inside each training micro-batch of step.py; validation, test, the LR
finder's scoring and the hard examples never see it. timm's `Mixup` pairs each image with its mirror in the
reversed batch, so a micro-batch must hold an even number of images (checked when the session is built).
Its targets are soft, [B, C] rows that sum to 1 with `train.label_smoothing` folded in by timm, and the loss
is timm's `SoftTargetCrossEntropy` (the single-label task builds it, tasks/single_label.py). A loss of
one's own (finetune.train(loss=...)) then receives those soft [B, C] targets in place of class indices.

Why randomness per micro-batch: timm draws λ and the CutMix box from NumPy's global generator. Drawn
from a generator seeded by (train.seed, epoch, the micro-batch's global index), the mixing of a micro-batch
does not depend on how the global batch is split: with Accelerate's sharding, process p's i-th micro-batch
of update u is global micro-batch (u * accumulation + i) * processes + p, so 1 process accumulating 2
micro-batches mixes exactly as 2 processes with 1 each, and a resumed run mixes as the run it continues.
NumPy's global state is restored after each draw, so nothing else that reads it changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from timm.data import Mixup

from ..errors import FinetuneError
from ..recipe.schema import TrainConfig
from .batching import Batching

MIX_STREAM = 0x6D6978  # "mix": keeps these draws apart from other generators seeded by (seed, epoch)


@dataclass(frozen=True)
class Mixing:
    """Mixes one training micro-batch: (images, class indices) -> (mixed images, soft targets [B, C])."""
    mixup: Mixup
    seed: int  # train.seed
    accumulation: int  # micro-batches per update on each process
    processes: int
    process_index: int

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, update_in_epoch: int,
                 micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix the `micro_batch`-th micro-batch of update `update_in_epoch` of `epoch` on this process."""
        index = (update_in_epoch * self.accumulation + micro_batch) * self.processes + self.process_index
        saved = np.random.get_state()
        np.random.seed([self.seed, epoch, index, MIX_STREAM])
        try:
            return self.mixup(images, labels)
        finally:
            np.random.set_state(saved)

    def describe(self) -> str:
        m = self.mixup
        kinds = [f"mixup alpha {m.mixup_alpha:g}" if m.mixup_alpha > 0 else "",
                 f"cutmix alpha {m.cutmix_alpha:g}" if m.cutmix_alpha > 0 else ""]
        share = "every training micro-batch" if m.mix_prob == 1 else f"{100 * m.mix_prob:g}% of training micro-batches"
        switch = f" ({100 * m.switch_prob:g}% of those by cutmix)" if all(kinds) else ""
        return (f"mixing: {' and '.join(k for k in kinds if k)} on {share}{switch}, soft targets with label "
                f"smoothing {m.label_smoothing:g}; validation is never mixed")


def mixing_on(tc: TrainConfig) -> bool:
    return tc.mixup > 0 or tc.cutmix > 0


def build_mixing(tc: TrainConfig, num_classes: int, batching: Batching, process_index: int) -> Mixing | None:
    """The run's mixing, or None when train.mixup and train.cutmix are both 0. Raises FinetuneError when a
    micro-batch is odd: timm's Mixup mixes each image with its partner in the reversed batch."""
    if not mixing_on(tc):
        return None
    if batching.per_device % 2:
        share = batching.global_batch // batching.processes
        even = [d for d in range(2, share + 1, 2) if share % d == 0]
        hint = (f"set train.micro_batch_size to an even divisor of the {share} images per process, e.g. "
                f"{max([d for d in even if d <= batching.per_device] or even[:1])}" if even else
                f"make train.batch_size a multiple of {2 * batching.processes}")
        raise FinetuneError(f"train.mixup/train.cutmix need an even number of images per micro-batch (timm's Mixup "
                            f"mixes each image with its partner in the reversed batch), but train.batch_size "
                            f"{batching.global_batch} over {batching.processes} process(es) gives "
                            f"{batching.per_device} per device; {hint}.")
    mixup = Mixup(mixup_alpha=tc.mixup, cutmix_alpha=tc.cutmix, prob=tc.mix_prob, switch_prob=tc.mix_switch_prob,
                  mode="batch", label_smoothing=tc.label_smoothing, num_classes=num_classes)
    return Mixing(mixup, tc.seed, batching.accumulation, batching.processes, process_index)
