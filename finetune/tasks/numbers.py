"""Numbers, the targets of `task: regression` (regression.py): one number per image, read from a CSV or
JSONL manifest's column, a Hugging Face column of numbers (a `Value` feature), or Python (image, number)
pairs; sources of classes (a folder, torchvision, scikit-learn) are refused.

A sample's target is a float; the samples read here carry `number` as their `encode_target`, so loaders
batch a float32 [B] vector, NaN for an unreadable eval image whose slot another image took. The "class
list" is the one column's name (the head has one output). A missing, non-numeric or non-finite value is
an error naming the file (or dataset) and its row. Validation is split off train by rank: the targets in
up to `BINS` bins of equal count, so val spans the whole range.
"""

from __future__ import annotations

import copy
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.manifests import IMAGE_COLUMNS, pick_column, read_manifest_rows
from ..data.samples import FileSamples, HFSamples, ImageSamples, IndexedSamples
from ..data.sources import read_hf
from ..errors import FinetuneError
from ..recipe.locate import parse_source
from ..recipe.schema import DataConfig

# Columns tried for the number when data.label_column is not given and a manifest has more than one
# column besides the image's.
NUMBER_COLUMNS = ("target", "value", "label", "y", "count", "score")
BINS = 10  # rank bins a stratified split keeps in proportion
# Images per bin at least: the split gives every bin of two or more images a val image, which would push a
# small set's val share far above data.val_fraction.
PER_BIN = 10
WHERE_NUMBERS = ("task regression reads a number per image from a CSV/JSONL manifest column (data.label_column), "
                 "a Hugging Face column of numbers, or (image, number) pairs in Python")


def number(target: Any, num_classes: int, ignored: bool = False) -> torch.Tensor:
    """A target as loaders batch it: a float32 scalar; NaN for an ignored image (the loss and metrics skip it)."""
    return torch.tensor(math.nan if ignored else float(target), dtype=torch.float32)


def as_number(value: Any) -> float | None:
    """A cell as a finite float, or None when it is none (empty, text, NaN, infinite, a bool)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()  # a NumPy or torch scalar
    if isinstance(value, bool) or value is None:
        return None
    try:
        result = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def parse_numbers(values: Sequence[Any], where: str, row: Any = lambda i: f"row {i}") -> list[float]:
    """`values` as floats; the first one that is not a number is an error naming `where` and its row."""
    numbers = [as_number(v) for v in values]
    bad = next((i for i, n in enumerate(numbers) if n is None), None)
    if bad is not None:
        value = values[bad]
        what = "no value" if value is None or (isinstance(value, str) and not value.strip()) else f"{value!r}"
        raise FinetuneError(f"{where}: {row(bad)} has {what} where a number belongs; every image needs a finite "
                            f"number ({WHERE_NUMBERS}). Fix or remove that row.")
    return numbers


def load_numbers(text: str, cfg: DataConfig, class_names: list[str] | None = None) -> ImageSamples:
    """A source string read as numbers (a manifest or hf:), named as `class_names` says when given."""
    spec = parse_source(text)
    if spec.scheme == "manifest":
        samples = _manifest(Path(spec.name).expanduser(), cfg)
    elif spec.scheme == "hf":
        samples = read_hf(spec, cfg, wrap_hf_numbers)
    else:
        raise FinetuneError(f"{text} gives each image a class ({spec.scheme}), not a number; {WHERE_NUMBERS}.")
    return numbered(samples if class_names is None else align_numbers(samples, class_names))


def _manifest(path: Path, cfg: DataConfig) -> FileSamples:
    rows, lines = read_manifest_rows(path)
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise FinetuneError(f"{path} lists no images; give one row per image with an image path and its number.")
    columns = list(rows[0])
    image_col = pick_column(cfg.image_column, IMAGE_COLUMNS, columns, "image_column", path)
    others = [c for c in columns if c != image_col]
    label_col = (cfg.label_column if cfg.label_column is not None or len(others) != 1 else others[0])
    label_col = pick_column(label_col, NUMBER_COLUMNS, columns, "label_column", path)
    targets = parse_numbers([row.get(label_col) for row in rows], f"{path} (column {label_col!r})",
                            lambda i: f"line {lines[i]}")
    paths = [str(path.parent / str(row[image_col]).strip()) if row.get(image_col) is not None else "" for row in rows]
    if not any(os.path.isfile(p) for p in paths):
        raise FinetuneError(f"{path}: none of its {len(paths)} image paths exist (first: {paths[0]}); paths are "
                            f"read relative to the manifest's folder {path.parent.resolve()}, or absolute.")
    return FileSamples(paths, targets, [label_col], str(path))


def wrap_hf_numbers(dataset: Any, cfg: DataConfig, origin: str) -> HFSamples:
    """A `datasets.Dataset` with an image column and a column of numbers: data.label_column, else the first
    numeric `Value` feature, else a conventional name."""
    import datasets

    dataset = dataset.with_format(None)
    features = dataset.features
    columns = list(features)
    image_col = cfg.image_column or next((c for c in columns if isinstance(features[c], datasets.Image)), None)
    image_col = pick_column(image_col, IMAGE_COLUMNS, columns, "image_column", origin)
    numeric = next((c for c in columns if c != image_col and isinstance(features[c], datasets.Value)
                    and features[c].dtype.startswith(("int", "uint", "float"))), None)
    label_col = pick_column(cfg.label_column or numeric, NUMBER_COLUMNS, columns, "label_column", origin)
    if isinstance(features[label_col], datasets.ClassLabel):
        raise FinetuneError(f"{origin}: column {label_col!r} holds classes (a ClassLabel), not numbers; {WHERE_NUMBERS}. "
                            "Name another column with data.label_column, or train it with task: single_label.")
    if len(dataset) == 0:
        raise FinetuneError(f"{origin} is empty.")
    targets = parse_numbers(list(dataset[label_col]), f"{origin} (column {label_col!r})", lambda i: f"row {i}")
    return HFSamples(dataset, image_col, targets, [label_col], origin)


def wrap_numbers_in_memory(data: Any, class_names: Sequence[str] | None, cfg: DataConfig, what: str) -> ImageSamples:
    """A Python dataset for finetune.train(): a Hugging Face Dataset, (path, number) pairs, or a map-style
    dataset of (image, number)."""
    import datasets

    if isinstance(data, ImageSamples):
        samples = copy.copy(data)
        samples.targets = parse_numbers(data.targets, data.origin)
        return numbered(samples)
    if isinstance(data, datasets.DatasetDict):
        raise FinetuneError(f"{what} is a DatasetDict; pass one split, e.g. {what}=ds['train'].")
    if isinstance(data, datasets.Dataset):
        return numbered(wrap_hf_numbers(data, cfg, f"python:{what}"))
    if len(data) == 0:
        raise FinetuneError(f"{what} is empty.")
    pairs = isinstance(data, (list, tuple))
    values = list(getattr(data, "targets", None) if getattr(data, "targets", None) is not None
                  else [item[1] for item in data] if pairs else [data[i][1] for i in range(len(data))])
    targets = parse_numbers(values, what, lambda i: f"item {i}")
    names = [class_names[0] if class_names else "value"]
    if pairs and all(isinstance(item[0], (str, os.PathLike)) for item in data):
        return numbered(FileSamples([str(item[0]) for item in data], targets, names, f"python:{what}"))
    return numbered(IndexedSamples(data, targets, names, f"python:{what}"))


def align_numbers(samples: ImageSamples, class_names: list[str]) -> ImageSamples:
    """`samples` under the run's name for its number (a val manifest may call its column otherwise)."""
    aligned = copy.copy(samples)
    aligned.class_names = list(class_names)
    return numbered(aligned)


def numbered(samples: ImageSamples) -> ImageSamples:
    """`samples` whose loaders batch each target as a float."""
    samples.encode_target = number
    return samples


def rank_bins(targets: Sequence[float], bins: int = BINS) -> list[int]:
    """Each target's bin of equal count (at least PER_BIN images each), by rank (ties in input order): what
    a stratified split of numbers keeps in proportion."""
    ranks = np.argsort(np.argsort(np.asarray(targets, dtype=np.float64), kind="stable"), kind="stable")
    bins = max(1, min(bins, len(targets) // PER_BIN))
    return (ranks * bins // max(1, len(targets))).tolist()


def summarise(targets: Sequence[float]) -> dict:
    """check-data's view of a split's numbers: how many, their range, mean and standard deviation."""
    values = np.asarray(targets, dtype=np.float64)
    if not len(values):
        return {"images": 0, "min": None, "max": None, "mean": None, "std": None}
    return {"images": len(values), "min": float(values.min()), "max": float(values.max()),
            "mean": round(float(values.mean()), 6), "std": round(float(values.std()), 6)}


def count_numbers(targets: Sequence[float], class_names: list[str]) -> Counter:
    """check-data's "classes": the one column, with every image that has its number."""
    return Counter({class_names[0]: len(targets)}) if class_names else Counter()
