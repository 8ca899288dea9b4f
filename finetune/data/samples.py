"""Labelled images decoded lazily: `samples[i]` is (PIL RGB image, class index), decoded only when asked.

`.targets` and `.class_names` are known without decoding anything; `.name(i)` says where sample i comes
from (a path, or `hf:beans@train[12]`) and `.raw(i)` gives its encoded bytes where there are any, so
check-data can hash files without re-encoding them. `align` maps val and test onto the training classes
by name, once per run. Reading a source string into samples is sources.py's job.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import re
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import FinetuneError
from ..recipe.userfiles import open_regular
from .images import open_image, refuse_elongated, to_rgb

# The target of a sample that counts for nothing: the loss and every metric leave it out. An evaluation
# image that could not be decoded keeps its slot in the batch under this label (loaders.py; a whole row of
# it for multi-hot targets); torch's cross-entropy takes it as ignore_index.
IGNORE_LABEL = -100


def natural_key(text: str) -> list:
    """Sort key putting c2 before c10 (numbers compared as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def class_index(target: Any, num_classes: int, ignored: bool = False) -> int:
    """A class index as loaders batch it; IGNORE_LABEL for an unreadable eval image whose slot another took."""
    return IGNORE_LABEL if ignored else int(target)


class ImageSamples(Dataset):
    """Labelled images, decoded on access. Subclasses say how to decode sample i and where it comes from."""

    # What loaders batch of a target (loaders.Transformed): a class index by default. A task whose targets
    # are something else (label sets, numbers) sets its own on the samples it reads (tasks/).
    encode_target: Callable[[Any, int, bool], Any] = staticmethod(class_index)

    def __init__(self, targets: Sequence[int], class_names: list[str], origin: str):
        self.targets, self.class_names, self.origin = list(targets), list(class_names), origin

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.image(index), self.targets[index]

    def image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def name(self, index: int) -> str:
        return f"{self.origin}[{index}]"

    def raw(self, index: int) -> bytes | None:
        """The encoded image (file bytes) where the source has them; None for pixel arrays."""
        return None

    def fingerprint(self) -> str | None:
        """A digest that changes whenever an image or a label changes, so caches keyed by it are never
        stale; None when the source has no identity that outlives the process (caches stay in memory)."""
        return None

    def _digest(self, *parts: Any) -> str:
        digest = hashlib.sha256(repr((type(self).__name__, self.class_names, self.targets)).encode())
        for part in parts:
            digest.update(part if isinstance(part, bytes) else repr(part).encode())
        return digest.hexdigest()


class FileSamples(ImageSamples):
    """Image files on disk: folders, manifests, and Python lists of (path, label)."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int], class_names: list[str], origin: str):
        super().__init__(targets, class_names, origin)
        self.items = [str(p) for p in paths]

    def image(self, index: int) -> Image.Image:
        return open_image(self.items[index])

    def name(self, index: int) -> str:
        return self.items[index]

    def raw(self, index: int) -> bytes:
        with open_regular(self.items[index]) as f:  # /dev/zero would stream without end, a FIFO hang
            return f.read()

    def fingerprint(self) -> str:
        """Paths, sizes and modification times: a file touched or replaced changes it."""
        stats = []
        for path in self.items:
            try:
                st = os.stat(path)
                stats.append((path, st.st_size, st.st_mtime_ns))
            except OSError:  # unreadable now: it will be a bad image, and its absence is part of the identity
                stats.append((path, None, None))
        return self._digest(stats)


class ArraySamples(ImageSamples):
    """Pixel arrays in memory (HxW grey or HxWxC), e.g. scikit-learn's digits."""

    def __init__(self, arrays: Sequence[np.ndarray], targets: Sequence[int], class_names: list[str], origin: str):
        super().__init__(targets, class_names, origin)
        self.arrays = arrays

    def image(self, index: int) -> Image.Image:
        return to_rgb(Image.fromarray(np.asarray(self.arrays[index])))

    def fingerprint(self) -> str:
        return self._digest(*(np.ascontiguousarray(a).tobytes() for a in self.arrays))


class IndexedSamples(ImageSamples):
    """Any map-style dataset whose item [0] is an image (PIL, CHW tensor or array): torchvision datasets
    and the Python API's own datasets. Labels come from `targets`, already mapped to class indices."""

    def __init__(self, dataset: Any, targets: Sequence[int], class_names: list[str], origin: str):
        super().__init__(targets, class_names, origin)
        self.dataset = dataset

    def image(self, index: int) -> Image.Image:
        return as_pil(self.dataset[index][0])


class HFSamples(ImageSamples):
    """A Hugging Face Dataset. Images stay encoded in Arrow; `with_transform` decodes one row on access
    with our decoder (EXIF orientation, every mode to RGB) instead of datasets' own."""

    def __init__(self, dataset: Any, image_column: str, targets: Sequence[int], class_names: list[str], origin: str):
        import datasets

        super().__init__(targets, class_names, origin)
        self.column = image_column
        # decode=False keeps {"bytes", "path"}: bad files surface here, one sample at a time, not at load.
        self.encoded = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        self.decoded = self.encoded.with_transform(partial(_decode_column, image_column))

    def image(self, index: int) -> Image.Image:
        return self.decoded[index][self.column]

    def raw(self, index: int) -> bytes:
        cell = self.encoded[index][self.column]
        if cell.get("bytes"):
            return cell["bytes"]
        with open_regular(cell["path"]) as f:
            return f.read()

    def fingerprint(self) -> str | None:
        """datasets' own fingerprint of the table (it changes with every transform of the data)."""
        fingerprint = getattr(self.encoded, "_fingerprint", None)
        return self._digest(fingerprint) if fingerprint else None

    def name(self, index: int) -> str:
        path = self.encoded[index][self.column].get("path")
        return f"{self.origin}[{index}]" + (f" ({path})" if path else "")


def _decode_column(column: str, batch: dict) -> dict:  # module level: loader workers pickle it
    return {column: [open_image(io.BytesIO(c["bytes"]) if c.get("bytes") else c["path"]) for c in batch[column]]}


def as_pil(image: Any) -> Image.Image:
    """An image from a user's dataset (PIL, CHW tensor, HxW(xC) array, path) as 8-bit RGB; one too elongated
    to resize (images.MAX_ASPECT_RATIO) raises ImageTooElongated before anything is converted."""
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    if isinstance(image, Image.Image):
        refuse_elongated(*image.size)
        return to_rgb(image)
    if hasattr(image, "dim"):  # a torch tensor, CHW, uint8 or float in [0, 1]
        from torchvision.transforms.functional import to_pil_image

        refuse_elongated(image.shape[-1], image.shape[-2])
        return to_rgb(to_pil_image(image))
    if isinstance(image, np.ndarray):
        refuse_elongated(image.shape[1], image.shape[0])
        return to_rgb(Image.fromarray(image))
    raise FinetuneError(f"cannot use a {type(image).__name__} as an image; give PIL images, CHW tensors, arrays "
                        "or paths.")


def align(samples: ImageSamples, class_names: list[str]) -> ImageSamples:
    """`samples` with labels re-indexed onto the run's class list; classes the list lacks are an error naming
    them. A target is a class index, or a tuple of label indices (a task of label sets, tasks/label_sets.py)."""
    if samples.class_names == list(class_names):
        return samples
    sets = any(isinstance(t, tuple) for t in samples.targets)
    what = "label" if sets else "class"
    index = {name: i for i, name in enumerate(class_names)}
    present = sorted({samples.class_names[t] for target in samples.targets
                      for t in (target if isinstance(target, tuple) else (target,))}, key=natural_key)
    unknown = [name for name in present if name not in index]
    if unknown:
        plural = "labels" if sets else "classes"
        raise FinetuneError(f"{samples.origin} has {plural} the training data lacks: {unknown[:10]}"
                            f"{' ...' if len(unknown) > 10 else ''}; every {what} in validation and test must also "
                            f"appear in training ({len(index)} training {plural}: {list(class_names)[:10]}).")
    aligned = copy.copy(samples)
    aligned.targets = [tuple(sorted(index[samples.class_names[t]] for t in target)) if isinstance(target, tuple)
                       else index[samples.class_names[target]] for target in samples.targets]
    aligned.class_names = list(class_names)
    return aligned
