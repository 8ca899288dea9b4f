"""Data: source strings -> labelled image datasets -> the backbone's own transforms -> data loaders.

A source yields (PIL RGB image, class index) lazily, one sample at a time, and knows its class names.
The class list is computed once per run from the training source (natural sort: c1, c2, c10) and
applied to validation. Transforms come from timm's pretrained data config of the backbone (mean, std,
interpolation, crop), so a ViT and a ResNet each see the preprocessing they were trained with.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import timm.data
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .config import DataConfig, SourceSpec, parse_source
from .errors import FinetuneError
from .images import IMAGE_EXTENSIONS, open_image, to_rgb


def natural_key(text: str) -> list:
    """Sort key putting c2 before c10 (numbers compared as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


class ImageSamples(Dataset):
    """A map-style dataset of (PIL RGB image, class index), decoded lazily from `items` by `load`."""

    def __init__(self, items: Sequence, targets: Sequence[int], class_names: list[str],
                 load: Callable[[object], Image.Image], origin: str):
        self.items, self.targets, self.class_names = items, list(targets), class_names
        self.load, self.origin = load, origin

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(self.items[index]), self.targets[index]


class Transformed(Dataset):
    """A view of some indices of a dataset with a transform applied to each image."""

    def __init__(self, base: Dataset, indices: Sequence[int] | None, transform: Callable):
        self.base, self.transform = base, transform
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, label = self.base[self.indices[index]]
        if isinstance(image, torch.Tensor):  # Python-API datasets may hold tensors (CHW, uint8 or float in [0, 1])
            from torchvision.transforms.functional import to_pil_image

            image = to_pil_image(image)
        return self.transform(to_rgb(image)), int(label)


# ----------------------------------------------------------------------------------------------------
# Sources


def load_source(text: str, class_names: list[str] | None = None) -> ImageSamples:
    """Open a source string. With `class_names` (the training classes) its labels are mapped onto them."""
    spec = parse_source(text)
    if spec.scheme == "sklearn":
        return _sklearn_digits(spec, class_names)
    if spec.scheme == "python":
        raise FinetuneError(f"{text} names an in-memory dataset: pass it to finetune.train(train_data=..., "
                            "val_data=...) from Python, or give a folder path in the recipe.")
    return _image_folder(Path(text).expanduser(), class_names)


def _image_folder(root: Path, class_names: list[str] | None) -> ImageSamples:
    """ImageFolder layout: root/<class>/<image>. Classes in natural order; non-image files ignored."""
    classes = sorted((e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")), key=natural_key)
    if not classes:
        raise FinetuneError(f"{root} has no class subfolders; lay images out as {root}/<class name>/<image>.")
    index = {name: i for i, name in enumerate(class_names or classes)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise FinetuneError(f"{root} has classes the training data lacks: {unknown[:10]}; every class in "
                            f"validation must also appear in training ({len(index)} training classes).")
    items, targets = [], []
    for name in classes:
        files = sorted((e.path for e in os.scandir(root / name)
                        if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)), key=natural_key)
        items += files
        targets += [index[name]] * len(files)
    if not items:
        raise FinetuneError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders.")
    return ImageSamples(items, targets, class_names or classes, open_image, str(root))


def _sklearn_digits(spec: SourceSpec, class_names: list[str] | None) -> ImageSamples:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 16 grey levels) as RGB images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    names = [str(i) for i in range(10)]
    if class_names is not None and class_names != names:
        raise FinetuneError(f"sklearn:digits has classes 0-9 but the training data has {class_names[:10]}.")
    return ImageSamples(list(pixels), digits.target.tolist(), names, _grey_to_rgb, "sklearn:digits")


def _grey_to_rgb(array: np.ndarray) -> Image.Image:  # module-level: loader workers must pickle it
    return Image.fromarray(array, mode="L").convert("RGB")


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


def build_splits(cfg: DataConfig, seed: int, train: Dataset | None = None, val: Dataset | None = None,
                 class_names: list[str] | None = None) -> Splits:
    """Open train (and val, or split it off train). In-memory datasets from the Python API take precedence."""
    if train is None:
        train = load_source(cfg.train)
        class_names = train.class_names
    elif class_names is None:
        class_names = getattr(train, "class_names", None) or getattr(train, "classes", None)
        if class_names is None:
            raise FinetuneError("an in-memory training dataset needs class names: pass class_names=[...].")
    class_names = list(class_names)
    if len(train) == 0:
        raise FinetuneError(f"the training data {cfg.train!r} is empty.")
    if val is None and cfg.val is not None:
        val = load_source(cfg.val, class_names)
    if val is not None:
        return Splits(train, val, None, None, class_names)
    targets = getattr(train, "targets", None)
    if targets is None:
        targets = [int(train[i][1]) for i in range(len(train))]
    train_idx, val_idx = stratified_split(targets, cfg.val_fraction, seed)
    if not val_idx:
        raise FinetuneError(f"cannot split validation off {len(train)} training images: no class has two or more; "
                            "give data.val or more images.")
    return Splits(train, train, train_idx, val_idx, class_names)


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


def build_loader(dataset: Dataset, batch_size: int, training: bool, num_workers: int, pin_memory: bool) -> DataLoader:
    """A loader of one device's micro-batches. Accelerate shards it across processes later."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=training,
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
