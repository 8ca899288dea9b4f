"""The decoded-image cache: every image of a source decoded once, resized as the eval transform's first step
resizes it, and kept as raw 8-bit pixels that loader workers read through a memory map instead of decoding
JPEGs every epoch.

What is stored is exactly what timm's eval transform (crop_mode center) holds after its first step: the
short side resized to floor(image_size / crop_pct) with the backbone's interpolation, from the RGB image
images.open_image decodes. An eval centre crop cut from it is therefore bit for bit today's eval input,
and training crops (random-resized, at a training side no larger than image_size) come from the same
pixels. Layout: one flat uint8 file (`decoded-<key>.u8`, images one after another, HWC) and a JSON index
(`decoded-<key>.json`: per image its byte offset, height and width, or why it could not be decoded). The
key hashes the source's fingerprint, the stored side, the interpolation and PIL's version, so a touched
file or a changed label gives a new key and never a stale cache; a source without a lasting identity
gets no disk cache. The data file is renamed into place before the index, so an index means a complete
cache; it also records the data file's size, which the reader checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import timm.data
import torch
from PIL import Image
from timm.data import DEFAULT_CROP_PCT
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from ..atomic import write_atomic
from ..errors import FinetuneError
from .badimages import BAD_IMAGE_ERRORS
from .samples import FileSamples, as_pil, class_index

VERSION = 1  # part of every key: bump when what the files hold changes
# `data.cache: auto` keeps the cache only when it stays in the page cache (a share of RAM: epochs then read
# memory, not disk) and leaves most of the disk free for checkpoints and other caches.
RAM_SHARE, DISK_SHARE = 0.25, 0.5


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/finetune, else ~/.cache/finetune: caches never go inside the user's data folders."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune"


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
    return math.floor(data_cfg["input_size"][-1] / (data_cfg.get("crop_pct") or DEFAULT_CROP_PCT))


def cache_key(base: Dataset, data_cfg: dict) -> str | None:
    """The cache's name for this source and preprocessing; None when the source has no lasting identity."""
    source = base.fingerprint() if hasattr(base, "fingerprint") else None
    if source is None:
        return None
    text = json.dumps([VERSION, source, stored_side(data_cfg), str(data_cfg["interpolation"]), PIL.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


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
    """`base` from the decoded-image cache in `cache_dir` (None: default_cache_dir()), decoded with
    `num_workers` loader workers when the cache is missing; None when the source has no lasting identity.

    Every process of a run calls this once. Those with `build` (one per machine) fill a missing cache, then
    call `wait`; the others call `wait` (a barrier the caller supplies) and then read what was built. Two
    builders of one key on one machine (two runs) take turns on a lock file: the second reuses the cache."""
    reason = why_not_cached(data_cfg)
    if reason is not None:
        raise ValueError(f"the decoded-image cache cannot reproduce this eval transform: {reason}")
    key = cache_key(base, data_cfg)
    if key is None:
        return None
    index = Path(cache_dir or default_cache_dir()) / f"decoded-{key}.json"
    if build:
        with _exclusive(index) as locked:
            if _complete(index, len(base)):
                log(f"decoded images: {len(base)} from {index.with_suffix('.u8')}")
            else:
                _build(base, data_cfg, index, num_workers, locked, log)
    wait()
    if not _complete(index, len(base)):
        raise FinetuneError(f"the decoded-image cache {index} is missing or incomplete after it was built; put "
                            "data.cache_dir on a disk that every process on this machine sees.")
    return DecodedImages(index, base)


def estimate_decoded_bytes(base: Dataset, data_cfg: dict, sample: int = 64) -> int:
    """The cache's size, from the headers of `sample` images spread over the source (nothing is decoded
    for files and encoded bytes), each scaled to the stored side as the eval resize scales it."""
    n, side = len(base), stored_side(data_cfg)
    sizes = [s for i in sorted({round(p) for p in np.linspace(0, n - 1, min(sample, n))})
             if (s := _header_size(base, i)) is not None] if n else []
    if not sizes:
        return 0
    per_image = [3 * side * int(side * max(w, h) / min(w, h)) for w, h in sizes]  # torchvision's rounding
    return round(sum(per_image) / len(per_image) * n)


def auto_cache_fits(estimated_bytes: int, cache_dir: str | Path | None) -> tuple[bool, str]:
    """Whether a cache of `estimated_bytes` fits `data.cache: auto`'s budget (RAM_SHARE of physical memory
    and DISK_SHARE of the free disk at cache_dir), and one line with the numbers for the set-up printout."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    folder = Path(cache_dir or default_cache_dir()).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
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


def _build(base: Dataset, data_cfg: dict, index: Path, num_workers: int, locked: bool,
           log: Callable[[str], None]) -> None:
    data = index.with_suffix(".u8")
    for leftover in index.parent.glob(f"{data.name}.tmp*") if locked else ():  # killed builds' (ours is locked)
        leftover.unlink(missing_ok=True)
    tmp = data.with_name(f"{data.name}.tmp{os.getpid()}")
    log(f"decoded images: decoding {len(base)} images to {stored_side(data_cfg)} px (short side) into {data}")
    start, entries, offset = time.perf_counter(), [], 0
    loader = DataLoader(_Decoding(base, _eval_resize(data_cfg)), batch_size=None, num_workers=num_workers,
                        collate_fn=_as_is)
    try:
        with open(tmp, "wb") as f:
            for pixels, error in loader:  # in index order: the offsets follow the file
                if pixels is None:
                    entries.append(error)
                    continue
                f.write(memoryview(pixels.numpy()).cast("B"))
                entries.append([offset, pixels.shape[0], pixels.shape[1]])
                offset += pixels.numel()
            f.flush()
            os.fsync(f.fileno())  # the index must never outlive its data, even across a power cut
        os.replace(tmp, data)
        write_atomic(index, json.dumps({"version": VERSION, "source": getattr(base, "origin", None),
                                        "side": stored_side(data_cfg), "interpolation": data_cfg["interpolation"],
                                        "bytes": offset, "images": entries}))
    finally:
        tmp.unlink(missing_ok=True)
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


@contextlib.contextmanager
def _exclusive(index: Path) -> Iterator[bool]:
    """Holds the key's lock file while building, so a second builder waits and then reuses the cache.
    Yields whether it holds one."""
    index.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: both build; each renames whole files into place, so either result is whole
        yield False
        return
    with open(index.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        yield True


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
            with Image.open(base.items[index]) as img:
                return img.size
        raw = base.raw(index) if hasattr(base, "raw") else None
        if raw is not None:
            with Image.open(io.BytesIO(raw)) as img:
                return img.size
        return as_pil(base[index][0]).size
    except BAD_IMAGE_ERRORS:
        return None
