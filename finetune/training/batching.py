"""How one global batch is split over processes and accumulation steps, so a recipe trains the same
on a laptop CPU, one GPU or eight.

`train.batch_size` is the global batch: the images behind one optimizer update, summed over every
process. Each process takes an equal share; when a share does not fit `train.micro_batch_size`, it is
cut into equal micro-batches whose gradients accumulate before the update. An epoch is a whole number
of global batches (the remainder of the shuffled data waits for the next epoch's order), so the number
of updates, and with it the learning-rate schedule, does not depend on how the batch was split.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FinetuneError


@dataclass(frozen=True)
class Batching:
    global_batch: int  # images per optimizer update, all processes together (train.batch_size)
    processes: int
    per_device: int  # images per forward/backward pass on one process (a micro-batch)
    accumulation: int  # micro-batches per update on each process
    updates_per_epoch: int

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.processes} process(es) x {self.per_device} per device x "
                f"{self.accumulation} accumulation step(s) | {self.updates_per_epoch} updates/epoch")


def derive_batching(batch_size: int, micro_batch_size: int | None, processes: int, train_images: int) -> Batching:
    """Split `batch_size` over `processes`, then into the largest equal micro-batches that fit
    `micro_batch_size`. Raises FinetuneError when the split cannot be even or the data is too small."""
    if batch_size % processes:
        raise FinetuneError(f"train.batch_size={batch_size} is the global batch and must divide evenly over "
                            f"{processes} processes; use a multiple of {processes}, e.g. "
                            f"{processes * max(1, round(batch_size / processes))}.")
    share = batch_size // processes
    cap = share if micro_batch_size is None else min(micro_batch_size, share)
    # The largest divisor of the share that fits the cap: every micro-batch has the same size, so each
    # one's mean loss weighs the same and the accumulated gradient is the mean over the global batch.
    per_device = max(d for d in range(1, cap + 1) if share % d == 0)
    if train_images < batch_size:
        raise FinetuneError(f"train.batch_size={batch_size} is larger than the {train_images} training images, so "
                            f"not one full batch fits in an epoch; set train.batch_size to {train_images} or less.")
    return Batching(batch_size, processes, per_device, share // per_device, train_images // batch_size)
