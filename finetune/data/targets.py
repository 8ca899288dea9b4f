"""What the data layer asks of a task (finetune/tasks/): how its targets are read from a source, kept
together when validation is split off, checked, and counted by check-data. `TargetReader` says it;
`OneClassPerImage` is the default, one class per image as sources.py reads it, which every task in
tasks/ starts from and the tasks of label sets and numbers replace.

The data layer never imports tasks/: splits.py and checkdata.py take any object with these methods, and
the samples a task reads carry its `encode_target` (samples.py) into the loaders.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol, Sequence

from ..errors import FinetuneError
from ..recipe.schema import DataConfig
from .samples import ImageSamples, align
from .sources import load_source, wrap_in_memory


class TargetReader(Protocol):
    """How one task's targets are read, checked and counted (implemented by tasks.Task)."""

    min_classes: int  # check-data's error below it: class names train must have readable images of

    def load_source(self, text: str, cfg: DataConfig, class_names: list[str] | None = None) -> ImageSamples: ...

    def wrap_in_memory(self, data: Any, class_names: Sequence[str] | None, cfg: DataConfig,
                       what: str) -> ImageSamples: ...

    def align(self, samples: ImageSamples, class_names: list[str]) -> ImageSamples: ...

    def check_train(self, train: ImageSamples) -> None: ...

    def check_val(self, val: ImageSamples) -> None: ...

    def stratify_keys(self, targets: Sequence, class_names: list[str]) -> list[int]: ...

    def count_targets(self, targets: Sequence, class_names: list[str]) -> Counter: ...

    def target_report(self, targets: Sequence, class_names: list[str]) -> dict: ...

    def format_target_report(self, split: str, report: dict) -> list[str]: ...

    def imbalance_advice(self) -> str: ...


class OneClassPerImage:
    """One class per image: a folder's subfolders, a manifest's label column, a ClassLabel, a torchvision or
    scikit-learn dataset, class names or indices in Python (sources.py). Its targets are class indices."""

    min_classes = 2  # a classifier of one class has nothing to tell apart

    def load_source(self, text: str, cfg: DataConfig, class_names: list[str] | None = None) -> ImageSamples:
        return load_source(text, cfg, class_names)

    def wrap_in_memory(self, data: Any, class_names: Sequence[str] | None, cfg: DataConfig, what: str) -> ImageSamples:
        return wrap_in_memory(data, class_names, cfg, what)

    def align(self, samples: ImageSamples, class_names: list[str]) -> ImageSamples:
        return align(samples, class_names)

    def check_train(self, train: ImageSamples) -> None:
        names = train.class_names
        if len(names) < self.min_classes:
            raise FinetuneError(f"the training data {train.origin} has {len(names)} class ({names}); a classifier "
                                "needs at least two.")

    def check_val(self, val: ImageSamples) -> None:
        """Refuse val data the selection metric cannot be computed on (a class index always can)."""

    def stratify_keys(self, targets: Sequence, class_names: list[str]) -> list[int]:
        """What a stratified split keeps in proportion: here each image's class."""
        return list(targets)

    def count_targets(self, targets: Sequence, class_names: list[str]) -> Counter:
        """Images per class name (check-data's "classes")."""
        return Counter(class_names[t] for t in targets)

    def target_report(self, targets: Sequence, class_names: list[str]) -> dict:
        """What check-data adds to a split's report besides the class counts: nothing here."""
        return {}

    def format_target_report(self, split: str, report: dict) -> list[str]:
        """check-data's terminal lines for `target_report`'s entries."""
        return []

    def imbalance_advice(self) -> str:
        return "train.class_weights=auto or data.sampler=balanced, and watch balanced accuracy."
