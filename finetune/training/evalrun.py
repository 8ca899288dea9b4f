"""`finetune eval`'s model run: a finished run's export scored over a labelled dataset on every process of
a launch (or on one), each image counted exactly once.

The accelerator comes from start.py's `build_accelerator`, with the run's own precision (bf16 autocast on
GPUs that have it) and memory layout (channels_last for conv nets), as its validation ran, so the numbers
match the run's validation. Each process scores
its shard of the data; evaluate.py's `predict_batches` gathers the per-sample results, dropping the
duplicates that pad the last batch. Only the main process gets them back; writing the report is the
caller's job (reporting/evaluation.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from ..data.loaders import build_loader
from ..errors import FinetuneError
from ..recipe.locate import check_source
from ..recipe.schema import DataConfig, RecipeConfig, TrainConfig
from ..recipe.userfiles import read_yaml_file
from ..rundir.folder import RECIPE_NAME
from ..tasks import Task
from .evaluate import predict_batches
from .inputs import model_inputs
from .runtime import adapt_model, resolve_runtime
from .start import build_accelerator


def predict_dataset(config: RecipeConfig, model: torch.nn.Module, dataset: Dataset, batch_size: int,
                    task: Task) -> dict | None:
    """The task's per-sample results of `model` over `dataset` (a data.Transformed view yielding (image
    tensor, label)) in its order, on the main process; None on the others. `config.train` gives the
    precision and channels_last, `config.data` the loader workers; `batch_size` is per process."""
    # One pass in eval mode: nothing to compile, and BatchNorm uses its running statistics (no sync).
    train = dataclasses.replace(config.train, compile=False, sync_bn=False)
    accelerator, precision = build_accelerator(dataclasses.replace(config, train=train))
    try:
        runtime = resolve_runtime(train, config.data, model, precision, accelerator.num_processes,
                                  accelerator.device.type == "cuda")
        model = adapt_model(model, runtime).to(accelerator.device).eval()
        loader = accelerator.prepare(build_loader(dataset, batch_size, False, runtime.workers, runtime.pin_memory))
        with accelerator.autocast():  # the run's mixed precision, as accelerator.prepare(model) applies it
            results = predict_batches(model, accelerator,
                                      (model_inputs(batch, None, runtime.channels_last) for batch in loader), task)
        return results if accelerator.is_main_process else None
    finally:
        accelerator.end_training()


def eval_config(run: Path, data_text: str) -> RecipeConfig:
    """The settings eval takes from the run's recipe.yaml (when it has one): column names, the torchvision
    root, and the precision and memory layout its validation ran in. Read as plain YAML: the training data
    may be long gone."""
    saved = read_yaml_file(run / RECIPE_NAME, "run recipe") if (run / RECIPE_NAME).is_file() else {}
    data, train = (saved or {}).get("data") or {}, (saved or {}).get("train") or {}
    keys = ("image_column", "label_column", "root")
    return RecipeConfig(data=DataConfig(train=data_text, **{k: data[k] for k in keys if data.get(k) is not None}),
                        train=TrainConfig(precision=train.get("precision", "auto"),
                                          channels_last=train.get("channels_last")))


def open_eval_data(data: Any, config: RecipeConfig, label_names: list[str], class_names: Sequence[str] | None,
                   task: Task):
    """`finetune eval`'s data as labelled samples, read as the run's task reads targets: a source string as
    the recipe grammar reads it, or a Python dataset whose integer labels name classes through class_names,
    its own names, or the run's."""
    if isinstance(data, (str, Path)):
        problems = check_source("data", str(data), config.data.root, False)
        if problems:
            raise FinetuneError(" ".join(problems))
        return task.load_source(str(data), config.data)
    names = class_names or getattr(data, "class_names", None) or getattr(data, "classes", None)
    if names is None and not isinstance(_first_label(data), str):
        names = label_names  # integer labels with no names of their own: the run's class indices
    return task.wrap_in_memory(data, names, config.data, "data")


def _first_label(data: Any) -> Any:
    import datasets

    if isinstance(data, datasets.Dataset) or len(data) == 0:
        return ""  # wrap_in_memory reads its ClassLabel names (or reports it empty)
    targets = getattr(data, "targets", None)
    return targets[0] if targets is not None else data[0][1]
