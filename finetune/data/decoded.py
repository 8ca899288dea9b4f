"""The decoded-image cache: every image of a source decoded once, resized as the eval transform's first step
resizes it, and kept as raw 8-bit pixels that loader workers read through a memory map instead of decoding
JPEGs every epoch.

What is stored is exactly what timm's eval transform (crop_mode center) holds after its first step: the
short side resized to floor(image_size / crop_pct) with the backbone's interpolation, from the RGB image
images.open_image decodes. An eval centre crop cut from it is therefore bit for bit today's eval input,
and training crops (random-resized, at a training side no larger than image_size) come from the same
pixels. Layout: one flat uint8 file (`decoded-<key>.u8`, images one after another, HWC) and a JSON index
(`decoded-<key>.json`: per image its byte offset, height and width, or why it could not be decoded). The
key (cachedir.cache_key) hashes the source's fingerprint, the stored side, the interpolation and PIL's
version, so a touched file or a changed label gives a new key and never a stale cache; a source without
a lasting identity gets no disk cache. The data file is renamed into place before the index, so an index
means a complete cache; it also records the data file's size, which the reader checks.

A complete cache is read without writing anything (no lock either): a read-only disk serves. A missing one
is built under a filelock lock, so two runs of one key take turns; a build that cannot write (read-only,
full disk) leaves no data file or index and raises cachedir.CacheUnavailable on every process of the
machine. Images over images.MAX_ASPECT_RATIO are recorded as unreadable, never resized.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import timm.data
import torch
from filelock import FileLock
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from ..atomic import replacing, write_atomic
from ..recipe.userfiles import open_regular
from . import cachedir
from .badimages import BAD_IMAGE_ERRORS
from .cachedir import CacheUnavailable, cache_folder, cache_unavailable, fingerprint, free_space
from .images import MAX_ASPECT_RATIO
from .samples import FileSamples, as_pil, class_index

VERSION = 2  # part of every key: bump when what the files hold changes (2: elongated images left out)
# `data.cache: auto` keeps the cache only when it stays in the page cache (a share of RAM: epochs then read
# memory, not disk) and leaves most of the disk free for checkpoints and other caches.
RAM_SHARE, DISK_SHARE = 0.25, 0.5


def why_not_cached(data_cfg: dict) -> str | None:
    """None when a centre crop of the cache reproduces timm's eval transform for this data config; else the
    reason, for the set-up printout of a run that falls back to decoding files every epoch."""
    size = data_cfg["input_size"]
    if (data_cfg.get("crop_mode") or "center") != "center":
        return f"crop_mode {data_cfg['crop_mode']!r} is not a resize and centre crop"
    if size[-1] != size[-2]:
        return f"the input size {tuple(size[-2:])} is not square"
    if data_cfg.get("crop_border_pixels"):
        return "crop_border_pixels trims the image before resizing"
    if stored_side(data_cfg) < size[-1]:
        return f"crop_pct {data_cfg['crop_pct']} > 1 pads the eval crop"
    return None


def stored_side(data_cfg: dict) -> int:
    """The short side of every stored image: what timm's eval transform resizes to before its centre crop."""
    return math.floor(data_cfg["input_size"][-1] / (data_cfg.get("crop_pct") or timm.data.DEFAULT_CROP_PCT))


def cache_key(base: Dataset, data_cfg: dict) -> str | None:
    """The cache's name for this source and preprocessing; None when the source has no lasting identity."""
    source = fingerprint(base)
    if source is None:
        return None
    return cachedir.cache_key(VERSION, source, stored_side(data_cfg), str(data_cfg["interpolation"]), PIL.__version__)


class DecodedImages(Dataset):
    """A source's images from the cache: `images[i]` is (uint8 HWC tensor, label). Labels, class names,
    names and the fingerprint are the source's. An image that could not be decoded raises its original
    error again (type and message), so loaders.Transformed skips and reports it exactly as for a file."""

    def __init__(self, index: str | Path, base: Dataset):
        meta = json.loads(Path(index).read_text(encoding="utf-8"))
        self.path, self.base = Path(index).with_suffix(".u8"), base
        self.targets, self.class_names = list(base.targets), list(getattr(base, "class_names", []))
        self.encode_target = getattr(base, "encode_target", class_index)  # the task's, as the source read it
        self.origin = getattr(base, "origin", "decoded")
        good = [(i, e) for i, e in enumerate(meta["images"]) if isinstance(e, list)]
        self.layout = np.zeros((len(meta["images"]), 3), dtype=np.int64)  # offset, height, width
        if good:
            self.layout[[i for i, _ in good]] = [e for _, e in good]
        self.bad = {i: (e["error"], e["message"]) for i, e in enumerate(meta["images"]) if isinstance(e, dict)}
        self._pixels: np.memmap | None = None  # opened lazily, once per loader worker

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index in self.bad:
            raise _original_error(*self.bad[index])
        if self._pixels is None:
            # Copy-on-write: tensors may view the map without a copy (a read-only map would make torch warn),
            # and nothing written to them could ever reach the file. The steps only read: crops are copies.
            self._pixels = np.memmap(self.path, dtype=np.uint8, mode="c")
        offset, height, width = (int(v) for v in self.layout[index])
        pixels = self._pixels[offset:offset + height * width * 3].reshape(height, width, 3)
        return torch.from_numpy(pixels), self.targets[index]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}  # each worker maps the file itself

    def name(self, index: int) -> str:
        return self.base.name(index) if hasattr(self.base, "name") else f"{self.origin}[{index}]"

    def fingerprint(self) -> str | None:
        return self.base.fingerprint()


def build_decoded(base: Dataset, data_cfg: dict, cache_dir: str | Path | None, num_workers: int, build: bool = True,
                  wait: Callable[[], None] = lambda: None,
                  log: Callable[[str], None] = print) -> DecodedImages | None:
    """`base` from the decoded-image cache in `cache_dir` (None: cachedir's default folder), decoded with
    `num_workers` loader workers when the cache is missing; None when the source has no lasting identity.

    Every process of a run calls this once. Those with `build` (one per machine) fill a missing cache, then
    call `wait`; the others call `wait` (a barrier the caller supplies) and then read what was built. Two
    builders of one key on one machine (two runs) take turns on a lock file: the second reuses the cache.
    A cache that cannot be written raises CacheUnavailable on every process, after `wait`."""
    reason = why_not_cached(data_cfg)
    if reason is not None:
        raise ValueError(f"the decoded-image cache cannot reproduce this eval transform: {reason}")
    key = cache_key(base, data_cfg)
    if key is None:
        return None
    folder = cache_folder(cache_dir)
    index = folder / f"decoded-{key}.json"
    failure = None
    if build and _complete(index, len(base)):  # read-only from here: no lock is needed to read a whole cache
        log(f"decoded images: {len(base)} from {index.with_suffix('.u8')}")
    elif build:
        try:
            _build_locked(base, data_cfg, index, num_workers, log)
        except OSError as e:
            failure = cache_unavailable("the decoded-image cache", folder, e, estimate_decoded_bytes(base, data_cfg),
                                        "data.cache=decoded")
    wait()  # every process reaches the barrier, whatever the builder met
    if failure is not None:
        raise failure
    if not _complete(index, len(base)):
        note = (f"the decoded-image cache {index} is missing or incomplete after its build: its builder could not "
                "write it (and says why), or data.cache_dir is not on a disk every process on this machine sees")
        raise CacheUnavailable(f"data.cache=decoded: {note}. Put data.cache_dir on such a disk.", note)
    return DecodedImages(index, base)


def estimate_decoded_bytes(base: Dataset, data_cfg: dict, sample: int = 64) -> int:
    """The cache's size, from the headers of `sample` images spread over the source (nothing is decoded
    for files and encoded bytes), each scaled to the stored side as the eval resize scales it."""
    n, side = len(base), stored_side(data_cfg)
    sizes = [s for i in sorted({round(p) for p in np.linspace(0, n - 1, min(sample, n))})
             if (s := _header_size(base, i)) is not None] if n else []
    if not sizes:
        return 0
    # torchvision's rounding; an image over the aspect limit is never stored (images.py)
    per_image = [3 * side * int(side * max(w, h) / min(w, h)) if max(w, h) <= MAX_ASPECT_RATIO * min(w, h) else 0
                 for w, h in sizes]
    return round(sum(per_image) / len(per_image) * n)


def auto_cache_fits(estimated_bytes: int, cache_dir: str | Path | None) -> tuple[bool, str]:
    """Whether a cache of `estimated_bytes` fits `data.cache: auto`'s budget (RAM_SHARE of physical memory
    and DISK_SHARE of the free disk at cache_dir), and one line with the numbers for the set-up printout."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    folder = cache_folder(cache_dir).absolute()
    free = free_space(folder)
    fits = estimated_bytes <= RAM_SHARE * ram and estimated_bytes <= DISK_SHARE * free
    return fits, (f"decoded-image cache about {estimated_bytes / 1e9:.2f} GB: "
                  f"{'fits' if fits else 'does not fit'} the budget of {RAM_SHARE:.0%} of {ram / 1e9:.1f} GB RAM "
                  f"and {DISK_SHARE:.0%} of {free / 1e9:.1f} GB free at {folder}")


class _Decoding(Dataset):
    """What the build's loader workers do for image i: decode, resize, and return (pixels, None), or
    (None, the error) for a file that cannot be decoded."""

    def __init__(self, base: Dataset, resize: Callable):
        self.base, self.resize = base, resize

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, dict | None]:
        try:
            image = self.resize(as_pil(self.base[index][0]))
            return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()), None
        except BAD_IMAGE_ERRORS as e:
            return None, {"error": f"{type(e).__module__}.{type(e).__qualname__}", "message": str(e)}


def _as_is(item: Any) -> Any:  # module level: loader workers pickle their collate function
    return item


def _eval_resize(data_cfg: dict) -> Callable:
    """The eval transform's own first step, so the stored pixels are the ones it produces."""
    first = timm.data.create_transform(**data_cfg, is_training=False).transforms[0]
    if not isinstance(first, transforms.Resize) or first.size not in (stored_side(data_cfg), [stored_side(data_cfg)]):
        raise ValueError(f"timm's eval transform starts with {first}, not a resize of the short side")
    return first


def _build_locked(base: Dataset, data_cfg: dict, index: Path, num_workers: int, log: Callable[[str], None]) -> None:
    """Builds the cache under its key's lock, unless a run that held the lock first built it."""
    index.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(index.with_suffix(".lock")):  # released when the block ends, or when the process dies
        if _complete(index, len(base)):
            log(f"decoded images: {len(base)} from {index.with_suffix('.u8')} (built by another run meanwhile)")
            return
        _build(base, data_cfg, index, num_workers, log)


def _build(base: Dataset, data_cfg: dict, index: Path, num_workers: int, log: Callable[[str], None]) -> None:
    data = index.with_suffix(".u8")
    # Killed builds' temporaries (atomic.replacing's names; we hold the lock: no build is running).
    for leftover in index.parent.glob(f".{data.stem}.tmp*{data.suffix}"):
        leftover.unlink(missing_ok=True)
    log(f"decoded images: decoding {len(base)} images to {stored_side(data_cfg)} px (short side) into {data}")
    start, entries, offset = time.perf_counter(), [], 0
    loader = DataLoader(_Decoding(base, _eval_resize(data_cfg)), batch_size=None, num_workers=num_workers,
                        collate_fn=_as_is)
    with replacing(data) as tmp, open(tmp, "wb") as f:
        for pixels, error in loader:  # in index order: the offsets follow the file
            if pixels is None:
                entries.append(error)
                continue
            f.write(memoryview(pixels.numpy()).cast("B"))
            entries.append([offset, pixels.shape[0], pixels.shape[1]])
            offset += pixels.numel()
        f.flush()
        os.fsync(f.fileno())  # the index must never outlive its data, even across a power cut
    try:
        write_atomic(index, json.dumps({"version": VERSION, "source": getattr(base, "origin", None),
                                        "side": stored_side(data_cfg), "interpolation": data_cfg["interpolation"],
                                        "bytes": offset, "images": entries}))
    except OSError:
        data.unlink(missing_ok=True)  # never read without its index: do not leave its gigabytes behind
        raise
    bad = sum(isinstance(e, dict) for e in entries)
    log(f"decoded images: {len(entries)} in {time.perf_counter() - start:.1f} s, {offset / 1e9:.2f} GB"
        + (f", {bad} unreadable" if bad else ""))


def _complete(index: Path, count: int) -> bool:
    """Whether `index` describes a whole cache of `count` images whose data file has the recorded size."""
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
        return (meta["version"] == VERSION and len(meta["images"]) == count
                and index.with_suffix(".u8").stat().st_size == meta["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _original_error(type_path: str, message: str) -> Exception:
    """The error decoding raised when the cache was built, rebuilt from its recorded type and message so
    that badimages.describe_error gives the same reason. Only types already imported are looked up."""
    module, _, name = type_path.rpartition(".")
    kind = getattr(sys.modules.get(module), name, None)
    if isinstance(kind, type) and issubclass(kind, BAD_IMAGE_ERRORS):
        with contextlib.suppress(Exception):
            return kind(message)
    return OSError(f"{name}: {message}")


def _header_size(base: Dataset, index: int) -> tuple[int, int] | None:
    """(width, height) of image `index` read from its header where there is one, else from the image."""
    try:
        if isinstance(base, FileSamples):
            with open_regular(base.items[index]) as f, Image.open(f) as img:
                return img.size
        raw = base.raw(index) if hasattr(base, "raw") else None
        if raw is not None:
            with Image.open(io.BytesIO(raw)) as img:
                return img.size
        return as_pil(base[index][0]).size
    except BAD_IMAGE_ERRORS:
        return None
