"""`finetune eval`'s model run: a finished run's export scored over a labelled dataset on every process of
a launch (or on one), each image counted exactly once.

The accelerator comes from the loop's `build_accelerator`, with the run's own precision (bf16 autocast on
GPUs that have it, as its validation ran), so the numbers match the run's validation. Each process scores
its shard of the data; evaluate.py's `predict_batches` gathers the per-sample results, dropping the
duplicates that pad the last batch. Only the main process gets them back; writing the report is the
caller's job (reporting/evaluation.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import Dataset

from ..data.loaders import build_loader, default_num_workers
from ..recipe.schema import RecipeConfig
from .evaluate import predict_batches
from .loop import build_accelerator


def predict_dataset(config: RecipeConfig, model: torch.nn.Module, dataset: Dataset, batch_size: int,
                    workers: int | None = None) -> dict | None:
    """Per-sample results (evaluate.RESULT_KEYS) of `model` over `dataset` (a data.Transformed view yielding
    (image tensor, label)) in its order, on the main process; None on the others. `config.train` gives the
    precision; `batch_size` is per process."""
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, compile=False))  # one pass only
    accelerator, _ = build_accelerator(config)
    try:
        cuda = accelerator.device.type == "cuda"
        workers = default_num_workers(accelerator.num_processes) if workers is None else workers
        loader = accelerator.prepare(build_loader(dataset, batch_size, False, workers, cuda))
        model.to(accelerator.device).eval()
        with accelerator.autocast():  # the run's mixed precision, as accelerator.prepare(model) applies it
            results = predict_batches(model, accelerator, loader)
        return results if accelerator.is_main_process else None
    finally:
        accelerator.end_training()
