"""`finetune eval`'s model run: a finished run's export scored over a labelled dataset on every process of
a launch (or on one), each image counted exactly once.

The accelerator comes from the loop's `build_accelerator`, with the run's own precision (bf16 autocast on
GPUs that have it) and memory layout (channels_last for conv nets), as its validation ran, so the numbers
match the run's validation. Each process scores
its shard of the data; evaluate.py's `predict_batches` gathers the per-sample results, dropping the
duplicates that pad the last batch. Only the main process gets them back; writing the report is the
caller's job (reporting/evaluation.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import Dataset

from ..data.loaders import build_loader
from ..recipe.schema import RecipeConfig
from .evaluate import predict_batches
from .inputs import model_inputs
from .loop import build_accelerator
from .runtime import adapt_model, resolve_runtime


def predict_dataset(config: RecipeConfig, model: torch.nn.Module, dataset: Dataset, batch_size: int) -> dict | None:
    """Per-sample results (evaluate.RESULT_KEYS) of `model` over `dataset` (a data.Transformed view yielding
    (image tensor, label)) in its order, on the main process; None on the others. `config.train` gives the
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
                                      (model_inputs(batch, None, runtime.channels_last) for batch in loader))
        return results if accelerator.is_main_process else None
    finally:
        accelerator.end_training()
