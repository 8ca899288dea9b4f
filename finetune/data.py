"""Data: sources -> the run's train/val/test splits -> the backbone's own transforms -> data loaders.

Sources (sources.py) yield (PIL RGB image, class index) lazily and know their class names. Here the
class list is fixed once per run from the training data and applied to val and test; validation is
split off train when not given; `Transformed` applies timm's transforms and survives bad files; and the
loaders shuffle, or take a sampler that draws classes evenly (balance.py). Transforms come from timm's
pretrained data config of the backbone (mean, std, interpolation, crop), so a ViT and a ResNet each see
their own preprocessing.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import timm.data
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .badimages import BAD_IMAGE_ERRORS, IGNORE_LABEL, MAX_BAD_IN_A_ROW, SkipLog, describe_error
from .config import DataConfig
from .errors import FinetuneError
from .sources import ImageSamples, align, as_pil, load_source, natural_key, wrap_in_memory

__all__ = ["ImageSamples", "load_source", "natural_key", "Transformed", "Splits", "build_splits",
           "stratified_split", "resolve_data_config", "build_transforms", "build_loader", "default_num_workers"]


class Transformed(Dataset):
    """A view of some indices of a dataset with a transform applied to each image, surviving bad files.

    A sample that fails to decode is recorded in `skip_log` and replaced by the next readable one: with
    its own label when `substitute` (training), with IGNORE_LABEL otherwise (evaluation: the metrics leave
    it out). With on_bad_image="error" it raises instead."""

    def __init__(self, base: Dataset, indices: Sequence[int] | None, transform: Callable, split: str = "train",
                 on_bad_image: str = "skip", skip_log: SkipLog | None = None, substitute: bool = True):
        self.base, self.transform, self.split = base, transform, split
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.on_bad_image, self.skip_log, self.substitute = on_bad_image, skip_log, substitute

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        for attempt in range(min(len(self.indices), MAX_BAD_IN_A_ROW)):
            i = self.indices[(index + attempt) % len(self.indices)]
            try:
                image, label = self.base[i]
                tensor = self.transform(as_pil(image))
            except BAD_IMAGE_ERRORS as e:
                self._bad(i, describe_error(e))
                continue
            return tensor, (int(label) if attempt == 0 or self.substitute else IGNORE_LABEL)
        raise FinetuneError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row in the {self.split} data (around "
                            f"{self._name(self.indices[index])}); run `finetune check-data` on the recipe.")

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


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split: about `fraction` of each class to val, at least one image of every class
    that has two or more, so every such class is validated."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    train, val = [], []
    for label in np.unique(targets):
        idx = np.flatnonzero(targets == label)
        rng.shuffle(idx)
        n_val = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(fraction * len(idx))))
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


@dataclass
class Splits:
    train: Dataset  # untransformed: yields (PIL image, label)
    val: Dataset
    train_indices: list[int] | None
    val_indices: list[int] | None
    class_names: list[str]
    test: Dataset | None = None  # data.test (or test_data), aligned to class_names

    @property
    def train_targets(self) -> list[int]:
        """The labels of the images that train (not those split off for validation)."""
        targets = self.train.targets
        return list(targets) if self.train_indices is None else [targets[i] for i in self.train_indices]

    def sizes(self) -> dict[str, int | None]:
        """Images per split as the run uses them (test: None without one)."""
        return {"train": len(self.train_indices) if self.train_indices is not None else len(self.train),
                "val": len(self.val_indices) if self.val_indices is not None else len(self.val),
                "test": len(self.test) if self.test is not None else None}


def build_splits(cfg: DataConfig, seed: int, train: Any = None, val: Any = None,
                 class_names: Sequence[str] | None = None, test: Any = None) -> Splits:
    """Open train, val (or split it off train) and test; in-memory datasets from the Python API take
    precedence over the recipe's strings. One class list, from train, for all three."""
    if train is None:
        train = load_source(cfg.train, cfg)
    else:
        train = wrap_in_memory(train, class_names, cfg, "train_data")
    if class_names is not None and list(class_names) != train.class_names:
        train = align(train, list(class_names))
    class_names = train.class_names
    if len(train) == 0:
        raise FinetuneError(f"the training data {cfg.train!r} is empty.")
    if len(class_names) < 2:
        raise FinetuneError(f"the training data {train.origin} has {len(class_names)} class ({class_names}); "
                            "a classifier needs at least two.")

    def open_other(data: Any, text: str | None, what: str) -> Dataset | None:
        if data is not None:
            return align(wrap_in_memory(data, class_names, cfg, what), class_names)
        return None if text is None else load_source(text, cfg, class_names)
    val = open_other(val, cfg.val, "val_data")
    test = open_other(test, cfg.test, "test_data")
    if val is not None:
        return Splits(train, val, None, None, class_names, test)
    train_idx, val_idx = stratified_split(train.targets, cfg.val_fraction, seed)
    if not val_idx:
        raise FinetuneError(f"cannot split validation off {len(train)} training images: no class has two or more; "
                            "give data.val or more images.")
    return Splits(train, train, train_idx, val_idx, class_names, test)


# ----------------------------------------------------------------------------------------------------
# Transforms and loaders


def resolve_data_config(model: torch.nn.Module, cfg: DataConfig) -> dict:
    """timm's preprocessing for this backbone (mean, std, interpolation, crop), at data.image_size if set."""
    data_cfg = timm.data.resolve_model_data_config(model)
    if cfg.image_size is not None:
        data_cfg["input_size"] = (data_cfg["input_size"][0], cfg.image_size, cfg.image_size)
    if cfg.crop_pct is not None:
        data_cfg["crop_pct"] = cfg.crop_pct
    if cfg.interpolation is not None:
        data_cfg["interpolation"] = cfg.interpolation
    return data_cfg


def build_transforms(data_cfg: dict, cfg: DataConfig) -> tuple[Callable, Callable]:
    """(train transform with augmentation, eval transform: resize + center crop), both from timm."""
    train = timm.data.create_transform(**data_cfg, is_training=True, scale=cfg.scale, hflip=cfg.hflip,
                                       color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment)
    return train, timm.data.create_transform(**data_cfg, is_training=False)


def default_num_workers(processes_on_machine: int = 1) -> int:
    """Loader workers per training process: the machine's cores shared by the training processes on it
    (8 GPUs on 16 cores must not start 8 x 8 workers), one core of each share left to its process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, processes_on_machine) - 1))


def build_loader(dataset: Dataset, batch_size: int, training: bool, num_workers: int, pin_memory: bool,
                 sampler: Sampler | None = None) -> DataLoader:
    """A loader of one device's micro-batches. Accelerate shards it across processes later.
    `sampler` (e.g. balance.BalancedSampler) replaces shuffling."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=training and sampler is None,
        sampler=sampler,
        # A ragged last batch of one image breaks BatchNorm; drop it whenever there is a full batch.
        drop_last=training and len(dataset) > batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Workers live for the whole run instead of being forked again every epoch; training sets reseed
        # them each epoch (EpochSeeded), so resuming still repeats the augmentation exactly.
        persistent_workers=num_workers > 0,
    )


class EpochSeeded(Dataset):
    """A training dataset whose loader workers reseed their random generators at each new epoch.

    Persistent workers would otherwise carry their random streams from one epoch into the next, so an
    epoch's augmentation would depend on every epoch before it in the same process and a resumed run
    would augment differently. The loop calls `set_epoch_seed` before each epoch (a seed drawn from its
    per-epoch, per-process generator); each worker seeds torch, random and numpy with it plus its worker
    id on the first sample it sees of that epoch. Without workers the loop's own reseeding does the job.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.epoch_seed = multiprocessing.Value("q", -1, lock=False)  # shared memory, read by the workers
        self.seeded_with = -1  # per worker: the epoch seed it last applied

    def set_epoch_seed(self, seed: int) -> None:
        self.epoch_seed.value = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        worker = torch.utils.data.get_worker_info()
        if worker is not None and self.seeded_with != self.epoch_seed.value:
            self.seeded_with = self.epoch_seed.value
            seed = self.seeded_with + worker.id
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        return self.dataset[index]
