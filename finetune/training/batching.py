"""How one global batch is split over processes and accumulation steps, so a recipe trains the same
on a laptop CPU, one GPU or eight.

`train.batch_size` is the global batch: the images behind one optimizer update, summed over every
process; `auto` picks it from the size of the training set, so that small data still gets enough
updates. Each process takes an equal share; when a share does not fit `train.micro_batch_size`, it is
cut into equal micro-batches whose gradients accumulate before the update. An epoch is the smallest
whole number of global batches that holds every training image: the sampler tops the last batch up
with images drawn again (data/sampling.py), so no image is left out and every update has the same size,
and the number of updates, with it the learning-rate schedule, does not depend on how the batch was split.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FinetuneError

AUTO_LARGEST = 64  # the batch the default learning rates are set for
AUTO_SMALLEST = 8  # below this BatchNorm statistics of a batch get noisy
AUTO_UPDATES = 16  # updates per epoch that batch_size auto aims for at least


@dataclass(frozen=True)
class Batching:
    global_batch: int  # images per optimizer update, all processes together (train.batch_size)
    processes: int
    per_device: int  # images per forward/backward pass on one process (a micro-batch)
    accumulation: int  # micro-batches per update on each process
    updates_per_epoch: int  # ceil(train images / global batch): every image at least once per epoch
    auto: bool = False  # the batch was chosen by batch_size auto
    train_images: int = 0

    @property
    def images_per_epoch(self) -> int:
        """What an epoch draws: the training images plus those drawn again to fill the last batch."""
        return self.updates_per_epoch * self.global_batch

    def describe(self) -> str:
        why = (f" (auto: the largest of 64, 32, 16, 8 giving >= {AUTO_UPDATES} updates/epoch for {self.train_images} "
               "images)" if self.auto else "")
        extra = self.images_per_epoch - self.train_images
        topped = f", the last topped up with {extra} image(s) drawn again" if extra > 0 else ""
        return (f"global batch {self.global_batch}{why} = {self.processes} process(es) x {self.per_device} per device "
                f"x {self.accumulation} accumulation step(s) | {self.updates_per_epoch} updates/epoch{topped}")


def auto_batch_size(train_images: int, processes: int) -> int:
    """The largest power of two from 64 down to 8 that gives at least 16 updates per epoch (a multiple of
    the process count): 64 for 1,000+ images, 16 for 245, 8 for 40."""
    size = AUTO_LARGEST
    while size > AUTO_SMALLEST and -(-train_images // size) < AUTO_UPDATES:
        size //= 2
    return max(processes, -(-size // processes) * processes)


def batch_size_problem(batch_size: int | str, train_images: int) -> str | None:
    """Why `batch_size` cannot train on `train_images` images, or None. A global batch above the image count
    repeats every image within each update (a batch of 4,096 on 6 images draws each 683 times): the update
    is that of a batch of the image count, at many times its cost. `auto` picks its own size (8 at least,
    for BatchNorm) and is never refused."""
    if batch_size == "auto" or batch_size <= train_images:
        return None
    return (f"train.batch_size={batch_size} is more than the {train_images} training images, so every update would "
            f"hold each image about {batch_size / train_images:.0f} times over; set train.batch_size={train_images} "
            "or less (or auto), or give more training images.")


def require_batch_fits(batch_size: int | str, train_images: int) -> None:
    """FinetuneError when batch_size_problem finds one; called once the data is read, before any write."""
    problem = batch_size_problem(batch_size, train_images)
    if problem:
        raise FinetuneError(problem)


def derive_batching(batch_size: int | str, micro_batch_size: int | None, processes: int,
                    train_images: int) -> Batching:
    """Split `batch_size` (or the auto choice) over `processes`, then into the largest equal micro-batches
    that fit `micro_batch_size`. Raises FinetuneError when the split cannot be even."""
    chosen = auto_batch_size(train_images, processes) if batch_size == "auto" else batch_size
    if chosen % processes:
        raise FinetuneError(f"train.batch_size={chosen} is the global batch and must divide evenly over "
                            f"{processes} processes; use a multiple of {processes}, e.g. "
                            f"{processes * max(1, round(chosen / processes))}.")
    share = chosen // processes
    cap = share if micro_batch_size is None else min(micro_batch_size, share)
    # The largest divisor of the share that fits the cap: every micro-batch has the same size, so each
    # one's mean loss weighs the same and the accumulated gradient is the mean over the global batch.
    per_device = max(d for d in range(1, cap + 1) if share % d == 0)
    return Batching(chosen, processes, per_device, share // per_device, -(-train_images // chosen),
                    batch_size == "auto", train_images)
