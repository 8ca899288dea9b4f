"""From a split to batches: `Transformed` applies a transform and survives bad files, `EpochSeeded` seeds
each training sample's augmentation by its epoch and position, and `build_loader` makes one device's loader
(Accelerate shards it later).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import FinetuneError
from .badimages import BAD_IMAGE_ERRORS, MAX_BAD_IN_A_ROW, SkipLog, describe_error
from .multilabel import multi_hot
from .samples import IGNORE_LABEL, as_pil


class Transformed(Dataset):
    """A view of some indices of a dataset with a transform applied to each image, surviving bad files.

    A sample that fails to decode is recorded in `skip_log` and replaced by the next readable one: with
    its own label when `substitute` (training), with IGNORE_LABEL otherwise (evaluation: the metrics leave
    it out). With on_bad_image="error" it raises instead. `raw` hands the transform the base's image as it
    is (decoded.DecodedImages' uint8 tensors for device_augment's steps) instead of as a PIL image."""

    def __init__(self, base: Dataset, indices: Sequence[int] | None, transform: Callable, split: str = "train",
                 on_bad_image: str = "skip", skip_log: SkipLog | None = None, substitute: bool = True,
                 raw: bool = False):
        self.base, self.transform, self.split, self.raw = base, transform, split, raw
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.on_bad_image, self.skip_log, self.substitute = on_bad_image, skip_log, substitute

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        for attempt in range(min(len(self.indices), MAX_BAD_IN_A_ROW)):
            i = self.indices[(index + attempt) % len(self.indices)]
            try:
                image, label = self.base[i]
                tensor = self.transform(image if self.raw else as_pil(image))
            except BAD_IMAGE_ERRORS as e:
                self._bad(i, describe_error(e))
                continue
            if isinstance(label, tuple):  # multi-label: the multi-hot vector [C] (multilabel.py)
                return tensor, multi_hot(label, len(self.base.class_names), attempt > 0 and not self.substitute)
            return tensor, (int(label) if attempt == 0 or self.substitute else IGNORE_LABEL)
        tried = min(len(self.indices), MAX_BAD_IN_A_ROW)
        where = (f"all {tried} images of the {self.split} data are unreadable" if tried == len(self.indices) else
                 f"{tried} unreadable images in a row in the {self.split} data")
        raise FinetuneError(f"{where} (around {self._name(self.indices[index])}); run `finetune check-data` on the "
                            "recipe, and fix or replace them.")

    def name(self, position: int) -> str:
        """Where the sample at `position` of this view comes from (a path, or source[index])."""
        return self._name(self.indices[position])

    def _name(self, i: int) -> str:
        return self.base.name(i) if hasattr(self.base, "name") else f"{self.split}[{i}]"

    def _bad(self, i: int, reason: str) -> None:
        if self.on_bad_image == "error":
            raise FinetuneError(f"cannot read {self._name(i)} ({self.split}): {reason}. Fix or remove the file, or "
                                "set data.on_bad_image=skip to train without it.")
        if self.skip_log is not None:
            self.skip_log.record(self.split, self._name(i), reason)


def available_cores() -> int:
    """The cores this process may run on (a container or taskset limits them below os.cpu_count())."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_workers(processes_on_machine: int = 1) -> int:
    """Loader workers per training process: the machine's cores shared by the training processes on it
    (8 GPUs on 16 cores must not start 8 x 8 workers), one core of each share left to its process."""
    return max(0, min(8, available_cores() // max(1, processes_on_machine) - 1))


def build_loader(dataset: Dataset, batch_size: int, training: bool, num_workers: int, pin_memory: bool,
                 sampler: Sampler | None = None, collate_fn: Callable | None = None,
                 persistent: bool = True) -> DataLoader:
    """A loader of one device's micro-batches. Accelerate shards it across processes later.
    `sampler` (sampling.EpochShuffle or BalancedSampler: whole global batches) replaces shuffling."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=training and sampler is None,
        sampler=sampler,
        # A ragged last batch of one image breaks BatchNorm; drop it whenever there is a full batch.
        drop_last=training and len(dataset) > batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        # Workers live for the whole run instead of being forked again every epoch; training sets seed each
        # sample (EpochSeeded), so resuming still repeats the augmentation exactly. A loader used
        # once (scoring after training) lets its workers go when it is done (`persistent` False).
        persistent_workers=persistent and num_workers > 0,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )


class EpochSeeded(Dataset):
    """A training dataset whose augmentation is a function of (epoch, position in the epoch) alone.

    Its loader's sampler (sampling.Positioned) hands it (index, position) pairs; before each sample, torch,
    random and numpy are seeded from the epoch's seed and the position. An image is then augmented the same
    in whichever loader worker or process draws it, however many batches came before it, and whether or
    not the run was resumed in the middle of the epoch. The loop calls `set_epoch_seed` before each epoch
    (a function of train.seed and the epoch). Without loader workers the samples are drawn in the training
    process, whose torch and Python random states (dropout) are put back after each one. Plain integer
    indices (a loader without Positioned, the benchmark's) reseed each worker once per epoch with the epoch
    seed plus its id. Seeding costs about 7 us a sample in a worker, 20 us in the training process.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.epoch_seed = multiprocessing.Value("q", -1, lock=False)  # shared memory, read by the workers
        self.seeded_with = -1  # per worker: the epoch seed it last applied (integer indices)

    def set_epoch_seed(self, seed: int) -> None:
        self.epoch_seed.value = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        worker = torch.utils.data.get_worker_info()
        if isinstance(key, tuple):
            index, position = key
            seed = mix_seed(self.epoch_seed.value, position)
            if worker is not None:
                _seed_generators(seed)
                return self.dataset[index]
            # Dropout draws from torch's generator: it is put back. NumPy's (saving it costs 60 us) is left
            # seeded by the last sample, as deterministic as the rest.
            saved = torch.get_rng_state(), random.getstate()
            try:
                _seed_generators(seed)
                return self.dataset[index]
            finally:
                torch.set_rng_state(saved[0])
                random.setstate(saved[1])
        if worker is not None and self.seeded_with != self.epoch_seed.value:
            self.seeded_with = self.epoch_seed.value
            _seed_generators(self.seeded_with + worker.id)
        return self.dataset[key]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's augmentation: train.seed and the epoch, nothing of the process or worker."""
    return (seed * 100_003 + epoch + 1) % 2**31


def mix_seed(*parts: int) -> int:
    """A 32-bit seed from several numbers (splitmix64 of each in turn). torch and numpy seed their Mersenne
    twisters from the lower 32 bits only, so seeds that differ above them (seed * 2**32 + position) would
    all draw the same numbers."""
    x = 0
    for part in parts:
        x = (x ^ (part & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0xFFFFFFFF


def _seed_generators(seed: int) -> None:
    torch.default_generator.manual_seed(seed)  # the CPU's alone: torch.manual_seed also seeds every GPU (70 us)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT and SIGTERM to their training process: a Ctrl-C in a terminal or a
    scheduler's SIGTERM reaches the whole process group (SLURM signals every process of a job step), and a
    worker that died of it would end the graceful stop (a checkpoint first) that the training process runs.
    A SIGTERM from the training process itself (the loader's or multiprocessing's shutdown) still ends the
    worker at once, as PyTorch's own worker handler does; so does the training process's death."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # Linux: who sent a signal can be told (not on macOS: default kept)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _end_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)
