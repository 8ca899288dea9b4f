"""The input pipeline a run feeds its model from, and the one step that turns a loader's batch into the
model's input.

Two pipelines give the same eval tensors and the same kind of training augmentation:
- PIL (`data.cache: none`): loader workers decode every file every epoch and run timm's transforms.
- decoded (`data.cache: decoded`, or `auto` when it fits): every image is decoded once into the decoded-image
  cache (data/decoded.py); loader workers cut crops out of it, and flips, colour jitter and normalisation run
  batched on the training device (data/device_augment.py). One process per machine builds a missing cache
  while the others wait (the barrier comes from the loop: only it touches Accelerate).
`auto` picks decoded when the augmentation can run on the device, the sources have a lasting identity
(files, not in-memory arrays), the cache fits data/decoded.py's RAM and disk budget, and no cached
features make images unnecessary; when the cache then cannot be written (a read-only folder, a full disk)
it goes on with the PIL pipeline. The printed set-up says which pipeline runs and why. An explicit
`decoded` that cannot be written is an error instead (data/cachedir.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from ..data.cachedir import CacheUnavailable, fingerprint
from ..data.decoded import auto_cache_fits, build_decoded, estimate_decoded_bytes
from ..data.device_augment import build_device_steps, collate_crops, why_not_on_device
from ..data.loaders import EpochSeeded, Transformed, available_cores, build_loader
from ..data.sampling import Positioned
from ..data.splits import Splits
from ..errors import FinetuneError
from ..recipe.schema import DataConfig
from .batching import Batching
from .runtime import Runtime


@dataclass(frozen=True)
class Place:
    """Where this process runs in its launch: what building the inputs needs of Accelerate (start.py
    makes it), so that this module and features.py need no accelerator."""
    processes: int = 1
    index: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True  # of the whole launch: fills the feature cache
    is_local_main: bool = True  # of this machine: fills the decoded-image cache
    wait: Callable[[], None] = lambda: None  # every process of the launch reaches this point

    @classmethod
    def of(cls, accelerator: Accelerator) -> "Place":
        return cls(accelerator.num_processes, accelerator.process_index, accelerator.device,
                   accelerator.is_main_process, accelerator.is_local_main_process, accelerator.wait_for_everyone)


@dataclass(frozen=True)
class Loading:
    """How a run loads its images, whatever the pipeline: timm's preprocessing, the training crop side,
    the run-time settings (workers, pinning, channels_last), the batch split, the sampler's order, the
    train and eval transforms of the PIL pipeline, and what becomes of a bad file."""
    data_cfg: dict
    train_side: int
    runtime: Runtime
    batching: Batching
    sampler: Positioned
    train_transform: Callable
    eval_transform: Callable
    bad: dict  # on_bad_image and this process's skip log, for every view of a split
    seed: int  # train.seed: augmentation by (seed, epoch, position); feature views by (seed, view)


@dataclass(frozen=True)
class Inputs:
    """What one pipeline feeds the model: the training set and loaders, the view of any split for
    scoring, and (decoded images) the device-side augmentation; cached features also swap the model for
    its head and change how it loads (features.py). Chosen once, before the session is built."""
    description: str  # which pipeline feeds the model and why, for the printed set-up
    train_set: EpochSeeded
    train_loader: DataLoader
    val_loader: DataLoader
    eval_view: Callable[[Dataset, list[int] | None, str], Dataset]
    train_transform: Callable  # the augmentation (features.py draws augmented views with it)
    train_augment: Callable | None = None  # decoded images: uint8 crops to model inputs on the device
    eval_augment: Callable | None = None
    collate: Callable | None = None  # the loaders' collate function (None: PyTorch's default)
    model: torch.nn.Module | None = None  # cached features: the head alone; None: the network
    runtime: Runtime | None = None  # cached features: in-memory vectors, no workers; None: the run's
    batching: Batching | None = None  # cached features under L-BFGS: one full batch; None: the run's
    features_cached: bool = False
    skipped: tuple[dict, ...] = ()  # unreadable files met while building them (split, file, reason)


def pil_inputs(splits: Splits, how: Loading, description: str) -> Inputs:
    """PIL decoding and timm's transforms in the loader workers."""
    def eval_view(base: Dataset, indices: list[int] | None, split: str) -> Transformed:
        return Transformed(base, indices, how.eval_transform, split, substitute=False, **how.bad)
    train_set = EpochSeeded(Transformed(splits.train, splits.train_indices, how.train_transform, "train", **how.bad))
    loader = dict(num_workers=how.runtime.workers, pin_memory=how.runtime.pin_memory)
    return Inputs(description, train_set,
                  build_loader(train_set, how.batching.per_device, True, sampler=how.sampler, **loader),
                  build_loader(eval_view(splits.val, splits.val_indices, "val"), how.batching.per_device, False,
                               **loader),
                  eval_view, how.train_transform)


def image_inputs(splits: Splits, dc: DataConfig, how: Loading, place: Place, log: Callable[[str], None]) -> Inputs:
    """Decoded images or PIL, as data.cache says: the decoded cache when it is asked for or fits."""
    decoded, why = choose_pipeline(how.data_cfg, splits, dc)
    if not decoded:
        return pil_inputs(splits, how, why)
    return decoded_inputs(splits, dc, how, place, log)


def choose_pipeline(data_cfg: dict, splits: Splits, dc: DataConfig) -> tuple[bool, str]:
    """(decoded?, why) for this run, as data.cache says."""
    if dc.cache == "none":
        return False, "PIL decoding in loader workers (data.cache=none)"
    reason = why_not_on_device(data_cfg, dc)
    if reason is None and any(fingerprint(b) is None for b in _bases(splits)):
        reason = "the data has no lasting identity to key a disk cache by (in-memory images)"
    if reason is not None:
        if dc.cache == "decoded":
            raise FinetuneError(f"data.cache=decoded cannot be used here: {reason}. Set data.cache=auto or none.")
        return False, f"PIL decoding in loader workers (data.cache=auto: {reason})"
    if dc.cache == "decoded":
        return True, "decoded-image cache (data.cache=decoded)"
    fits, budget = auto_cache_fits(sum(estimate_decoded_bytes(b, data_cfg) for b in _bases(splits)), dc.cache_dir)
    return fits, ("decoded-image cache" if fits else "PIL decoding in loader workers") + f" (data.cache=auto: {budget})"


def decoded_inputs(splits: Splits, dc: DataConfig, how: Loading, place: Place, log: Callable[[str], None]) -> Inputs:
    """Datasets, loaders and eval views reading the decoded-image cache, and the batched augmentation for
    the device. One process per machine fills a missing cache; every process waits before reading it.
    With data.cache=auto, a cache that cannot be written leaves the run on the PIL pipeline, its set-up
    line saying why."""
    decoded: dict[int, Dataset] = {}
    bases = _bases(splits)
    for position, base in enumerate(bases):
        try:
            decoded[id(base)] = build_decoded(base, how.data_cfg, dc.cache_dir, available_cores(), place.is_local_main,
                                              place.wait, log)
        except CacheUnavailable as e:  # raised on every process of this machine: they all fall back together
            if dc.cache == "decoded":
                raise
            for _ in bases[position + 1:]:
                place.wait()  # the barriers of the builds still running on other machines: each is passed once by all
            return pil_inputs(splits, how, f"PIL decoding in loader workers (data.cache=auto: {e.note})")
    train_step, eval_step, train_augment, eval_augment = build_device_steps(
        how.data_cfg, dc, how.train_side, resize_in_workers=place.device.type == "cpu")
    for augment in (train_augment, eval_augment):
        augment.channels_last = how.runtime.channels_last

    def eval_view(base: Dataset, indices: list[int] | None, split: str) -> Transformed:
        return Transformed(decoded[id(base)], indices, eval_step, split, substitute=False, raw=True, **how.bad)
    train_set = EpochSeeded(Transformed(decoded[id(splits.train)], splits.train_indices, train_step, "train",
                                        raw=True, **how.bad))
    loader = dict(num_workers=how.runtime.workers, pin_memory=how.runtime.pin_memory, collate_fn=collate_crops)
    pipeline = "decoded-image cache" + (" (data.cache=decoded)" if dc.cache == "decoded" else
                                        choose_pipeline(how.data_cfg, splits, dc)[1].removeprefix("decoded-image cache"))
    return Inputs(pipeline, train_set,
                  build_loader(train_set, how.batching.per_device, True, sampler=how.sampler, **loader),
                  build_loader(eval_view(splits.val, splits.val_indices, "val"), how.batching.per_device, False,
                               **loader),
                  eval_view, train_step, train_augment, eval_augment, collate_crops)


def model_inputs(batch, augment: Callable | None, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) for the model from a loader's batch: ready tensors from the PIL pipeline, or
    (uint8 crops, their parameters, labels) that `augment` turns into images on the device."""
    if augment is not None:
        images, params, labels = batch
        return augment(images, params), labels
    images, labels = batch
    return (images.contiguous(memory_format=torch.channels_last) if channels_last else images), labels


def _bases(splits: Splits) -> list[Dataset]:
    """The distinct sources of the run's images (val split off train shares train's)."""
    bases = [splits.train, splits.val] + ([splits.test] if splits.test is not None else [])
    return list({id(b): b for b in bases}.values())
