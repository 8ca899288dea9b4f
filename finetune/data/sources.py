"""Sources: a `data.*` string, or an in-memory dataset, -> labelled samples (samples.py) decoded lazily.

One reader per kind of source: an image folder, a CSV/JSONL manifest (its rows read by manifests.py),
scikit-learn's digits, a torchvision dataset, a Hugging Face dataset (hub id, `save_to_disk` folder or
parquet files), and the Python objects the API takes. Class lists: a folder or manifest sorts its class
names naturally (c1, c2, c10); a Hugging Face ClassLabel or a torchvision dataset keeps its own order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import FinetuneError
from ..recipe.locate import (
    SourceSpec,
    hf_local_kind,
    parse_source,
    torchvision_expected_files,
    torchvision_missing_message,
)
from ..recipe.schema import DataConfig
from .hub import hf_hub_cached, hf_hub_offline, hf_offline_message
from .images import IMAGE_EXTENSIONS
from .manifests import (
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    manifest_columns,
    manifest_label,
    manifest_paths,
    pick_column,
)
from .samples import (
    ArraySamples,
    FileSamples,
    HFSamples,
    ImageSamples,
    IndexedSamples,
    align,
    natural_key,
)

def load_source(text: str, cfg: DataConfig | None = None, class_names: list[str] | None = None) -> ImageSamples:
    """Open a source string. With `class_names` (the training classes) its labels are mapped onto them."""
    cfg = cfg or DataConfig(train=text)
    spec = parse_source(text)
    if spec.scheme == "python":
        raise FinetuneError(f"{text} names an in-memory dataset: pass it to finetune.train(train_data=..., "
                            "val_data=..., test_data=...) from Python, or give a source in the recipe.")
    readers = {"folder": _image_folder, "manifest": _manifest, "hf": read_hf, "torchvision": _torchvision,
               "sklearn": _sklearn_digits}
    samples = readers[spec.scheme](spec, cfg)
    return samples if class_names is None else align(samples, class_names)


def _image_folder(spec: SourceSpec, cfg: DataConfig) -> FileSamples:
    """ImageFolder layout: root/<class>/<image>. Classes in natural order; non-image files ignored."""
    root = Path(spec.name).expanduser()
    classes = sorted((e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")), key=natural_key)
    if not classes:
        raise FinetuneError(f"{root} has no class subfolders; lay images out as {root}/<class name>/<image>.")
    paths, targets = [], []
    for label, name in enumerate(classes):
        # scandir + suffix test only: no file is opened, so 10,000 images list in milliseconds.
        files = sorted((e.path for e in os.scandir(root / name)
                        if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")
                        and e.is_file()), key=natural_key)
        paths += files
        targets += [label] * len(files)
    if not paths:
        raise FinetuneError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders.")
    return FileSamples(paths, targets, classes, str(root))


def _manifest(spec: SourceSpec, cfg: DataConfig) -> FileSamples:
    """A .csv (header row) or .jsonl (one object per line) manifest (manifests.py): an image path and a
    label (a class name, or an integer class id) per row."""
    path = Path(spec.name).expanduser()
    rows, lines, image_col, label_col = manifest_columns(path, cfg, "a label")
    paths = manifest_paths(path, rows, lines, image_col)
    if any(isinstance(row.get(label_col), list) for row in rows):
        raise FinetuneError(f"{path}: column {label_col!r} holds lists of labels; set task: multi_label to train "
                            "on them.")
    labels = []
    for row, line in zip(rows, lines):
        label = manifest_label(row.get(label_col), f"{path}, line {line}", label_col)
        if label is None:
            raise FinetuneError(f"{path}, line {line} has no {label_col!r}; every image needs a label.")
        labels.append(label)
    if not any(os.path.isfile(p) for p in paths):
        raise FinetuneError(f"{path}: none of its {len(paths)} image paths exist (first: {paths[0]}); paths are "
                            f"read relative to the manifest's folder {path.parent.resolve()}, or absolute.")
    classes = sorted(set(labels), key=natural_key)
    index = {name: i for i, name in enumerate(classes)}
    return FileSamples(paths, [index[label] for label in labels], classes, str(path))


def _sklearn_digits(spec: SourceSpec, cfg: DataConfig) -> ArraySamples:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 16 grey levels) as RGB images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    return ArraySamples(list(pixels), digits.target.tolist(), [str(i) for i in range(10)], "sklearn:digits")


# ----------------------------------------------------------------------------------------------------
# torchvision:NAME[@train|test] under data.root


def _torchvision(spec: SourceSpec, cfg: DataConfig) -> IndexedSamples:
    import torchvision.datasets

    split = spec.split or "train"
    folder, files, origin = torchvision_expected_files(spec.name, cfg.root)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and not cfg.download:
        raise FinetuneError(torchvision_missing_message(spec.name, folder, missing, origin))
    try:
        dataset = getattr(torchvision.datasets, spec.name)(cfg.root, train=split == "train", download=cfg.download)
    except (RuntimeError, OSError) as e:  # a failed download, or files that fail torchvision's checksum
        raise FinetuneError(f"torchvision:{spec.name}: {e}. Without internet, copy the files into {folder.resolve()} "
                            f"(from {origin}); with data.download=true they are fetched there.") from None
    targets = [int(t) for t in dataset.targets]
    return IndexedSamples(dataset, targets, list(dataset.classes), f"torchvision:{spec.name}@{split}")


# ----------------------------------------------------------------------------------------------------
# hf:NAME_OR_DIR[@split]


def read_hf(spec: SourceSpec, cfg: DataConfig, wrap: Callable = None) -> HFSamples:
    """hf:NAME_OR_DIR[@split] opened, and made samples by `wrap` (default: wrap_hf_dataset, one class each)."""
    import datasets

    path = Path(spec.name).expanduser()
    kind = hf_local_kind(path) if path.exists() else None
    split = spec.split or "train"
    try:
        if kind in ("dict", "dataset"):
            loaded = datasets.load_from_disk(str(path))  # memory-mapped Arrow: nothing is copied or decoded
            if kind == "dataset" and spec.split is not None:
                raise FinetuneError(f"hf:{spec.name} holds a single Dataset, not splits; drop '@{spec.split}'.")
        elif kind == "parquet":  # split names come from file names (train-*.parquet, test/…), as on the hub
            loaded = datasets.load_dataset(str(path) if path.is_dir() else "parquet",
                                           **({} if path.is_dir() else {"data_files": str(path)}))
        else:
            offline = hf_hub_offline()
            if offline and not hf_hub_cached(spec.name):
                raise FinetuneError(hf_offline_message(spec.name))
            with _hub_offline(offline):
                loaded = datasets.load_dataset(spec.name)
    except FinetuneError:
        raise
    except Exception as e:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError...)
        raise FinetuneError(f"hf:{spec.name} could not be loaded: {type(e).__name__}: {str(e)[:300]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise FinetuneError(f"hf:{spec.name} has no split {split!r}; it has {list(loaded)}: write "
                                f"hf:{spec.name}@{next(iter(loaded))}.")
        loaded = loaded[split]
    return (wrap or wrap_hf_dataset)(loaded, cfg, f"hf:{spec.name}@{split}" if kind != "dataset" else f"hf:{spec.name}")


class _hub_offline:
    """Run `datasets` in offline mode when the hub is unreachable, so a cached copy loads at once instead
    of after half a minute of retries."""

    def __init__(self, offline: bool):
        self.offline = offline

    def __enter__(self):
        import datasets

        self.before = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = self.before or self.offline

    def __exit__(self, *exc):
        import datasets

        datasets.config.HF_HUB_OFFLINE = self.before


def wrap_hf_dataset(dataset: Any, cfg: DataConfig, origin: str) -> HFSamples:
    """A `datasets.Dataset` -> HFSamples. Columns: data.image_column/label_column, else an Image feature and
    a ClassLabel, else conventional names. ClassLabel names keep their order; other labels sort naturally."""
    import datasets

    dataset = dataset.with_format(None)  # python objects, whatever format the caller had set
    features = dataset.features
    columns = list(features)
    image_col = cfg.image_column or next((c for c in columns if isinstance(features[c], datasets.Image)), None)
    image_col = pick_column(image_col, IMAGE_COLUMNS, columns, "image_column", origin)
    label_col = cfg.label_column or next((c for c in columns if isinstance(features[c], datasets.ClassLabel)), None)
    label_col = pick_column(label_col, LABEL_COLUMNS, columns, "label_column", origin)
    if len(dataset) == 0:
        raise FinetuneError(f"{origin} is empty.")
    values = list(dataset[label_col])
    if isinstance(features[label_col], datasets.ClassLabel):
        class_names, targets = list(features[label_col].names), [int(v) for v in values]
    else:
        class_names = sorted({str(v) for v in values}, key=natural_key)
        index = {name: i for i, name in enumerate(class_names)}
        targets = [index[str(v)] for v in values]
    return HFSamples(dataset, image_col, targets, class_names, origin)


# ----------------------------------------------------------------------------------------------------
# The Python API: in-memory datasets


def wrap_in_memory(data: Any, class_names: Sequence[str] | None, cfg: DataConfig, what: str) -> ImageSamples:
    """A dataset handed to finetune.train() -> ImageSamples. Accepts a Hugging Face Dataset, a list of
    (path, label) pairs, or any map-style dataset of (image, label); labels are class indices or names."""
    import datasets

    if isinstance(data, ImageSamples):
        return data
    if isinstance(data, datasets.DatasetDict):
        raise FinetuneError(f"{what} is a DatasetDict; pass one split, e.g. {what}=ds['train'].")
    if isinstance(data, datasets.Dataset):
        return wrap_hf_dataset(data, cfg, f"python:{what}")
    if len(data) == 0:
        raise FinetuneError(f"{what} is empty.")
    names = class_names or getattr(data, "class_names", None) or getattr(data, "classes", None)
    pairs = isinstance(data, (list, tuple))
    # Labels without decoding: a `.targets` attribute (torchvision), a list's second items, or else one
    # pass over the dataset (which decodes every image once).
    labels = list(getattr(data, "targets", None) if getattr(data, "targets", None) is not None
                  else [item[1] for item in data] if pairs else [data[i][1] for i in range(len(data))])
    labels = [label.item() if hasattr(label, "item") else label for label in labels]
    if all(isinstance(label, str) for label in labels):
        names = list(names) if names else sorted(set(labels), key=natural_key)
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise FinetuneError(f"{what} has labels missing from class_names: {unknown[:10]}.")
        targets = [index[label] for label in labels]
    else:
        if not names:
            raise FinetuneError(f"{what} has integer labels but no class names: pass class_names=[...] (or give "
                                "the dataset a .classes list, or use class-name strings as labels).")
        targets = [int(label) for label in labels]
        bad = [t for t in targets if not 0 <= t < len(names)]
        if bad:
            raise FinetuneError(f"{what} has label {bad[0]}, outside 0..{len(names) - 1} for {len(names)} class names.")
    if pairs and all(isinstance(item[0], (str, os.PathLike)) for item in data):
        return FileSamples([item[0] for item in data], targets, list(names), f"python:{what}")
    return IndexedSamples(data, targets, list(names), f"python:{what}")
