"""Label sets, the targets of `task: multi_label` (multi_label.py): sources whose images hold any number of
labels, none included.

A sample's target is a sorted tuple of class indices (`()`: no label applies); the samples read here carry
`multi_hot` as their `encode_target`, so the loaders (data/loaders.py) batch each as the float [C] vector
the loss reads and stack those into [B, C].
Readers: a CSV manifest whose label cell lists labels joined by `|` (`cat|dog`), a JSONL manifest whose
label is a list, a Hugging Face `Sequence(ClassLabel)` (or list) column, and Python datasets whose labels
are lists of names or indices. A source of one class per image (a folder, torchvision, sklearn, a single
label in Python) gives each image that one label. The class list is every label seen in train, in natural order (a
ClassLabel keeps its own); val and test labels must be among them. Validation is split off train per
each image's rarest label, so a rare label still reaches val.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..data.samples import IGNORE_LABEL, FileSamples, HFSamples, ImageSamples, IndexedSamples, align, natural_key
from ..data.manifests import (
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    as_json,
    manifest_columns,
    manifest_label,
    manifest_paths,
    pick_column,
)
from ..data.sources import load_source, read_hf, wrap_hf_dataset
from ..errors import FinetuneError
from ..recipe.locate import parse_source
from ..recipe.schema import DataConfig

LABEL_SEPARATOR = "|"  # between the labels of one CSV cell: `cat|dog`
LISTED = 10  # unknown labels named in an error


def is_label_sets(samples: Any) -> bool:
    """Whether a dataset's targets are label tuples (read by this module) rather than class indices."""
    targets = getattr(samples, "targets", None)
    return bool(targets) and isinstance(targets[0], tuple)


def multi_hot(target: Sequence[int], num_classes: int, ignored: bool = False) -> torch.Tensor:
    """A label tuple as a float [C] vector of 0 and 1; `ignored` (an unreadable eval image whose slot another
    image filled): every entry IGNORE_LABEL, which the loss and the metrics leave out."""
    if ignored:
        return torch.full((num_classes,), float(IGNORE_LABEL))
    vector = torch.zeros(num_classes)
    vector[list(target)] = 1.0
    return vector


def split_labels(value: Any) -> list[str]:
    """One manifest cell as label names: a JSON list as it is, text split at `|`; empty: no label."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [part.strip() for part in str(value).split(LABEL_SEPARATOR) if part.strip()]


def label_matrix(targets: Sequence[tuple], num_classes: int) -> np.ndarray:
    """Targets as a bool [N, C] matrix (one row per image)."""
    matrix = np.zeros((len(targets), num_classes), dtype=bool)
    for row, target in enumerate(targets):
        matrix[row, list(target)] = True
    return matrix


def positive_weights(targets: Sequence[tuple], num_classes: int) -> torch.Tensor:
    """BCE pos_weight per label: its negatives / positives in train, so each label's positives weigh as much
    in the loss as its negatives (train.class_weights auto); 1 for a label with no positive or no negative
    image, which has nothing to balance (0 would silence an always-present label)."""
    positives = label_matrix(targets, num_classes).sum(axis=0).astype(np.float64)
    negatives = len(targets) - positives
    balance = np.where((positives > 0) & (negatives > 0), negatives / np.maximum(positives, 1), 1.0)
    return torch.tensor(balance, dtype=torch.float32)


def stratify_keys(targets: Sequence[tuple], num_classes: int) -> list[int]:
    """Per image, its rarest label in the whole set (-1: no label): the class a stratified split keeps
    together, so each label, rare ones first, gets its share of val images."""
    counts = label_matrix(targets, num_classes).sum(axis=0)
    return [min(target, key=lambda c: (counts[c], c)) if target else -1 for target in targets]


def cooccurrence(targets: Iterable[tuple], class_names: list[str]) -> dict:
    """check-data's view of the labels: images per count of labels, the most frequent label pairs, and labels
    with no positive image."""
    targets = list(targets)
    matrix = label_matrix(targets, len(class_names)).astype(np.int64)
    pairs = matrix.T @ matrix
    top = sorted(((int(pairs[i, j]), class_names[i], class_names[j]) for i in range(len(class_names))
                  for j in range(i + 1, len(class_names)) if pairs[i, j]), key=lambda p: (-p[0], p[1], p[2]))
    per_image = np.bincount(matrix.sum(axis=1), minlength=1) if len(targets) else np.zeros(1, dtype=np.int64)
    return {"labels_per_image": {str(k): int(n) for k, n in enumerate(per_image) if n},
            "top_pairs": [{"labels": [a, b], "images": n} for n, a, b in top[:LISTED]],
            "no_positives": [name for name, n in zip(class_names, np.diag(pairs)) if not n]}


def load_label_sets(text: str, cfg: DataConfig, class_names: list[str] | None = None) -> ImageSamples:
    """A source string read as multi-label (a manifest or hf:), mapped onto `class_names` when given."""
    spec = parse_source(text)
    if spec.scheme == "manifest":
        samples = _manifest(Path(spec.name).expanduser(), cfg)
    elif spec.scheme == "hf":
        samples = read_hf(spec, cfg, wrap_hf_label_sets)
    else:  # a folder, torchvision or sklearn: one class per image, which is its one label
        samples = as_label_sets(load_source(text, cfg))
    return labelled(samples if class_names is None else align_label_sets(samples, class_names))


def _manifest(path: Path, cfg: DataConfig) -> FileSamples:
    rows, lines, image_col, label_col = manifest_columns(path, cfg, "its labels")
    paths = manifest_paths(path, rows, lines, image_col)
    labels = [_row_labels(row.get(label_col), f"{path}, line {line}", label_col) for row, line in zip(rows, lines)]
    return FileSamples(paths, *_named(labels, None, str(path)), str(path))


def _row_labels(value: Any, where: str, column: str) -> list[str]:
    """One manifest row's labels: a JSON list's items, or a cell split at `|`, each a label name or an integer
    id as manifests.py reads one. Null or blank, like an empty list, is no label; null among a list's items,
    or an item that names no label (true, 2.5, a list), is an error beginning with `where`."""
    if not isinstance(value, (list, tuple)):
        return split_labels(manifest_label(value, where, column))
    if any(item is None or isinstance(item, (list, dict)) for item in value):
        bad = next(item for item in value if item is None or isinstance(item, (list, dict)))
        raise FinetuneError(f"{where} has {as_json(bad)} among its labels in {column!r}, which names no label: "
                            "list label names (text) or integer ids, such as [\"cat\", \"dog\"].")
    return [name for name in (manifest_label(item, where, column) for item in value) if name]


def wrap_hf_label_sets(dataset: Any, cfg: DataConfig, origin: str) -> HFSamples:
    """A `datasets.Dataset` whose label column is a Sequence/List of ClassLabel (names in its order), of
    names or of integers."""
    import datasets

    dataset = dataset.with_format(None)
    features = dataset.features
    columns = list(features)

    def inner(feature: Any) -> Any:  # Sequence(ClassLabel) in older datasets, List(ClassLabel) in newer
        return getattr(feature, "feature", None)
    image_col = cfg.image_column or next((c for c in columns if isinstance(features[c], datasets.Image)), None)
    image_col = pick_column(image_col, IMAGE_COLUMNS, columns, "image_column", origin)
    label_col = cfg.label_column or next((c for c in columns if isinstance(inner(features[c]), datasets.ClassLabel)),
                                         None)
    label_col = pick_column(label_col, LABEL_COLUMNS, columns, "label_column", origin)
    if len(dataset) == 0:
        raise FinetuneError(f"{origin} is empty.")
    values = list(dataset[label_col])
    if not all(isinstance(v, (list, tuple)) or v is None for v in values):  # one class per image: its one label
        return as_label_sets(wrap_hf_dataset(dataset, cfg, origin))
    feature = inner(features[label_col])
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return HFSamples(dataset, image_col, *_named([list(v or []) for v in values], names, origin), origin)


def wrap_label_sets_in_memory(data: Any, class_names: Sequence[str] | None, cfg: DataConfig,
                               what: str) -> ImageSamples:
    """A Python dataset for finetune.train() whose labels are lists (names, or indices into class_names):
    a Hugging Face Dataset, (path, labels) pairs or a map-style dataset of (image, labels)."""
    import datasets

    if isinstance(data, ImageSamples):
        return labelled(as_label_sets(data))
    if isinstance(data, datasets.Dataset):
        return labelled(wrap_hf_label_sets(data, cfg, f"python:{what}"))
    if len(data) == 0:
        raise FinetuneError(f"{what} is empty.")
    pairs = isinstance(data, (list, tuple))
    labels = [item[1] for item in data] if pairs else [data[i][1] for i in range(len(data))]
    labels = [label.tolist() if hasattr(label, "tolist") else label for label in labels]
    labels = [list(label) if isinstance(label, (list, tuple)) else [label] for label in labels]  # one: its set
    names = class_names or getattr(data, "class_names", None) or getattr(data, "classes", None)
    targets, class_names = _named(labels, names, f"python:{what}")
    if pairs and all(isinstance(item[0], (str, Path)) for item in data):
        return labelled(FileSamples([str(item[0]) for item in data], targets, class_names, f"python:{what}"))
    return labelled(IndexedSamples(data, targets, class_names, f"python:{what}"))


def _named(labels: list[list], names: Sequence[str] | None, origin: str) -> tuple[list[tuple], list[str]]:
    """(targets, class names) from per-image label lists: names (the class list is theirs, sorted naturally,
    unless `names` gives it) or integer indices into `names`."""
    flat = [label for row in labels for label in row]
    if any(not isinstance(label, str) for label in flat):
        if not names:
            raise FinetuneError(f"{origin} has integer labels but no label names: pass class_names=[...] (or use a "
                                "ClassLabel feature, or label-name strings).")
        bad = next((label for label in flat if not 0 <= int(label) < len(names)), None)
        if bad is not None:
            raise FinetuneError(f"{origin} has label {bad}, outside 0..{len(names) - 1} for {len(names)} label names.")
        labels = [[names[int(label)] for label in row] for row in labels]
    class_names = list(names) if names else sorted({label for row in labels for label in row}, key=natural_key)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({label for row in labels for label in row} - set(index), key=natural_key)
    if unknown:
        raise FinetuneError(f"{origin} has labels missing from the label names: {unknown[:LISTED]}.")
    return [tuple(sorted({index[label] for label in row})) for row in labels], class_names


def as_label_sets(samples: ImageSamples) -> ImageSamples:
    """Samples of one class per image as multi-label samples whose images each hold that one label."""
    if is_label_sets(samples) or not samples.targets:
        return samples
    sets = copy.copy(samples)
    sets.targets = [(int(t),) for t in samples.targets]
    return sets


def align_label_sets(samples: ImageSamples, class_names: list[str]) -> ImageSamples:
    """`samples` with label tuples re-indexed onto the run's labels; a label train lacks is an error naming it."""
    return labelled(align(as_label_sets(samples), class_names))


def labelled(samples: ImageSamples) -> ImageSamples:
    """`samples` whose loaders batch each target as its multi-hot vector."""
    samples.encode_target = multi_hot
    return samples
