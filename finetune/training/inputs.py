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

import dataclasses
from typing import Callable

import torch
from torch.utils.data import Dataset

from ..data.cachedir import CacheUnavailable
from ..data.decoded import auto_cache_fits, build_decoded, estimate_decoded_bytes
from ..data.device_augment import build_device_steps, collate_crops, why_not_on_device
from ..data.loaders import EpochSeeded, Transformed, available_cores, build_loader
from ..data.splits import Splits
from ..errors import FinetuneError
from ..recipe.schema import DataConfig
from .session import Session


def choose_pipeline(s: Session, splits: Splits, dc: DataConfig) -> tuple[bool, str]:
    """(decoded?, why) for this run, as data.cache says."""
    if dc.cache == "none":
        return False, "PIL decoding in loader workers (data.cache=none)"
    reason = why_not_on_device(s.data_cfg, dc)
    if reason is None and any(not callable(getattr(b, "fingerprint", None)) or b.fingerprint() is None
                              for b in _bases(splits)):
        reason = "the data has no lasting identity to key a disk cache by (in-memory images)"
    if reason is not None:
        if dc.cache == "decoded":
            raise FinetuneError(f"data.cache=decoded cannot be used here: {reason}. Set data.cache=auto or none.")
        return False, f"PIL decoding in loader workers (data.cache=auto: {reason})"
    if dc.cache == "decoded":
        return True, "decoded-image cache (data.cache=decoded)"
    fits, budget = auto_cache_fits(sum(estimate_decoded_bytes(b, s.data_cfg) for b in _bases(splits)), dc.cache_dir)
    return fits, ("decoded-image cache" if fits else "PIL decoding in loader workers") + f" (data.cache=auto: {budget})"


def use_decoded_images(s: Session, splits: Splits, dc: DataConfig, device: torch.device, build: bool,
                       wait: Callable[[], None], log: Callable[[str], None]) -> Session:
    """The session with its datasets, loaders and eval views reading the decoded-image cache, and the
    batched augmentation for the device. `build`: this process fills a missing cache (one per machine);
    every process then calls `wait` before reading it. With data.cache=auto, a cache that cannot be written
    leaves the session on the PIL pipeline, its set-up line saying why."""
    decoded: dict[int, Dataset] = {}
    bases = _bases(splits)
    for position, base in enumerate(bases):
        try:
            decoded[id(base)] = build_decoded(base, s.data_cfg, dc.cache_dir, available_cores(), build, wait, log)
        except CacheUnavailable as e:  # raised on every process of this machine: they all fall back together
            if dc.cache == "decoded":
                raise
            for _ in bases[position + 1:]:
                wait()  # the barriers of the builds still running on other machines: each is passed once by all
            return dataclasses.replace(s, input_pipeline=f"PIL decoding in loader workers (data.cache=auto: {e.note})")
    train_step, eval_step, train_augment, eval_augment = build_device_steps(
        s.data_cfg, dc, s.train_side, resize_in_workers=device.type == "cpu")
    for augment in (train_augment, eval_augment):
        augment.channels_last = s.runtime.channels_last
    bad = {"on_bad_image": s.train_set.dataset.on_bad_image, "skip_log": s.train_set.dataset.skip_log}

    def eval_view(base: Dataset, indices: list[int] | None, split: str) -> Transformed:
        return Transformed(decoded[id(base)], indices, eval_step, split, substitute=False, raw=True, **bad)
    train_set = EpochSeeded(Transformed(decoded[id(splits.train)], splits.train_indices, train_step, "train",
                                        raw=True, **bad))
    loader = dict(num_workers=s.runtime.workers, pin_memory=s.runtime.pin_memory, collate_fn=collate_crops)
    return dataclasses.replace(
        s, train_set=train_set, eval_view=eval_view, collate=collate_crops, train_transform=train_step,
        train_augment=train_augment,
        eval_augment=eval_augment,
        train_loader=build_loader(train_set, s.batching.per_device, True, sampler=s.sampler, **loader),
        val_loader=build_loader(eval_view(splits.val, splits.val_indices, "val"), s.batching.per_device, False,
                                **loader))


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
