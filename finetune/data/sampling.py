"""Which training images an epoch draws: every image once in a shuffled order, topped up to whole global
batches (`EpochShuffle`), or every class equally often (`BalancedSampler`, data.sampler: balanced); and
the inverse-frequency loss weights of train.class_weights: auto.

Both samplers draw each epoch from a generator seeded by (seed, epoch) alone, so every process draws the
same sequence and Accelerate's batch sharding hands each process different batches of it; a resumed run
draws exactly what the interrupted one would have. Accelerate calls `set_epoch` on them through the
prepared loader's `set_epoch`. Both yield `length` indices: a whole number of global batches, so every
update has the same size on any number of processes and accumulation steps. `Positioned` hands the loader
each draw with its place in the epoch, for per-sample augmentation seeds and mid-epoch resumes.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def class_counts(targets: Sequence[int], num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes)


def inverse_frequency_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """N / (classes x count_c) per class (scikit-learn's "balanced"): a sample's weight averages to 1 over
    the data, and each class contributes equally to the loss. A class with no images gets 0. Written out
    rather than `sklearn.utils.class_weight.compute_class_weight`: that one raises for a class with no
    training images (a class seen only in a user's class_names), and scikit-learn is no core dependency."""
    counts = class_counts(targets, num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


class _EpochSampler(Sampler[int]):
    """`length` indices per epoch from a generator seeded by (seed, epoch) alone; set_epoch picks the epoch."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)


class EpochShuffle(_EpochSampler):
    """Every one of `n` images once, in a new order each epoch, then as many more as fill the last global
    batch (drawn from another permutation, so no image comes twice before every image came once). No
    image is left out of an epoch, and no update is smaller than the others."""

    def __init__(self, n: int, length: int, seed: int):
        super().__init__(length, seed)
        self.n = n

    def __iter__(self) -> Iterator[int]:
        generator, drawn = self._generator(), 0
        while drawn < self.length:  # more than one pass only when the batch is larger than the data
            order = torch.randperm(self.n, generator=generator)[: self.length - drawn].tolist()
            drawn += len(order)
            yield from order


class BalancedSampler(_EpochSampler):
    """Draws `length` positions per epoch (default: one per image), with replacement, every class equally
    likely."""

    def __init__(self, targets: Sequence[int], seed: int, length: int | None = None):
        targets = np.asarray(targets, dtype=np.int64)
        self.weights = torch.tensor(1.0 / np.bincount(targets)[targets], dtype=torch.float64)
        super().__init__(len(self.weights) if length is None else length, seed)

    def __iter__(self) -> Iterator[int]:
        yield from torch.multinomial(self.weights, self.length, replacement=True, generator=self._generator()).tolist()


class Positioned(Sampler):
    """An epoch sampler's draws as (index, position) pairs, from position `start` on.

    The position (the draw's place in the epoch, 0 to length - 1, the same on every process) lets
    loaders.EpochSeeded seed each sample's augmentation by (epoch, position) alone, so an image is augmented
    the same whichever process or loader worker draws it and however many batches came before. `start`
    skips the draws of updates a resumed run already made (a whole number of global batches), so a run
    resumed mid-epoch sees exactly the remaining batches; the loop sets it before such an epoch and back
    to 0 after."""

    def __init__(self, sampler: _EpochSampler):
        self.sampler, self.start = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.sampler):
            if position >= self.start:
                yield index, position
