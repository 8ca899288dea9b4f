"""The run's splits: train, val (given, or a stratified seeded split of train) and test, with one class
list taken from the training data and applied to val and test.

Sources yield (PIL RGB image, target) lazily and know their class names; the task reads them
(targets.py: one class per image unless a task of finetune/tasks/ reads label sets or numbers). Nothing
here decodes an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from ..errors import FinetuneError
from ..recipe.schema import DataConfig
from .targets import OneClassPerImage, TargetReader


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split: about `fraction` of each class to val, at least one image of every class
    that has two or more, so every such class is validated. `sklearn.model_selection.train_test_split(
    stratify=...)` gives no such guarantee (a small class can get no val image) and refuses a class with a
    single image, which here simply stays in train."""
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
                 class_names: Sequence[str] | None = None, test: Any = None,
                 task: TargetReader = OneClassPerImage()) -> Splits:
    """Open train, val (or split it off train) and test; in-memory datasets from the Python API take
    precedence over the recipe's strings. One class list, from train, for all three. `task` reads the
    targets (targets.py): class indices unless it reads label sets or numbers."""
    if train is None:
        train = task.load_source(cfg.train, cfg)
    else:
        train = task.wrap_in_memory(train, class_names, cfg, "train_data")
    if class_names is not None and list(class_names) != train.class_names:
        train = task.align(train, list(class_names))
    class_names = train.class_names
    if len(train) == 0:
        raise FinetuneError(f"the training data {cfg.train!r} is empty.")
    task.check_train(train)

    def open_other(data: Any, text: str | None, what: str) -> Dataset | None:
        if data is not None:
            return task.align(task.wrap_in_memory(data, class_names, cfg, what), class_names)
        return None if text is None else task.load_source(text, cfg, class_names)
    val = open_other(val, cfg.val, "val_data")
    test = open_other(test, cfg.test, "test_data")
    if val is not None:
        task.check_val(val)
        return Splits(train, val, None, None, class_names, test)
    train_idx, val_idx = stratified_split(task.stratify_keys(train.targets, class_names), cfg.val_fraction, seed)
    if not val_idx:
        raise FinetuneError(f"cannot split validation off {len(train)} training images: no class has two or more; "
                            "give data.val or more images.")
    return Splits(train, train, train_idx, val_idx, class_names, test)
