"""Run-time settings derived from the recipe and the machine, resolved once per run and printed once:
the device, the precision actually used, loader workers, pinned memory, channels_last and SyncBatchNorm.

A recipe says what to train; these say how this machine runs it. Each `None`/`auto` in the recipe is
decided here and nowhere else, so the training loop, the LR finder and the benchmark run the same way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from ..data.loaders import default_num_workers
from ..errors import FinetuneError
from ..recipe.schema import DataConfig, TrainConfig


@dataclass(frozen=True)
class Runtime:
    device: str  # "cuda" or "cpu"
    precision: str  # what autocast runs: fp32 | bf16 | fp16 (train.precision with auto decided)
    processes: int  # training processes in the whole job
    workers: int  # loader processes per training process
    pin_memory: bool  # page-locked batches, so the copy to the GPU overlaps compute
    channels_last: bool  # NHWC images and conv weights
    sync_bn: bool  # BatchNorm statistics over every process's share of the batch

    def describe(self) -> str:
        return (f"{self.processes} process(es) on {self.device} in {self.precision} | {self.workers} loader workers "
                f"per process | channels_last {'on' if self.channels_last else 'off'} | sync_bn "
                f"{'on' if self.sync_bn else 'off'}")


def resolve_precision(asked: str, cuda: bool) -> str:
    """train.precision with `auto` decided: bf16 on GPUs that have it, else fp32."""
    if asked == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if asked == "fp16" and not cuda:
        raise FinetuneError("train.precision=fp16 needs a CUDA GPU; on CPU use bf16 or fp32 (or auto).")
    return asked


def resolve_runtime(tc: TrainConfig, dc: DataConfig, model: torch.nn.Module, precision: str, processes: int,
                    cuda: bool) -> Runtime:
    """Every derived setting of this run on this machine. `precision` comes from resolve_precision (the
    Accelerator needs it before the model exists)."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun: processes on this machine
    workers = default_num_workers(local_processes) if dc.num_workers is None else dc.num_workers
    sync_bn = tc.sync_bn and processes > 1
    if sync_bn and not cuda:
        raise FinetuneError("train.sync_bn=true needs GPUs: PyTorch synchronises BatchNorm only on CUDA devices. "
                            "With CPU processes set it to false (each process normalises its own micro-batch).")
    channels_last = tc.channels_last
    if channels_last is None:
        # A ViT's only convolution embeds patches; everything else with convolutions is a conv net. NHWC
        # pays on CPUs too (oneDNN): measured on 2 cores, training img/s x1.66 efficientnet_lite0, x1.27
        # resnet50, x1.2 regnety_008, x1.1 resnet18, x1.0 convnext_nano (docs/speed.md).
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        channels_last = convs > 1
    return Runtime("cuda" if cuda else "cpu", precision, processes, workers, cuda, channels_last, sync_bn)


def adapt_model(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """SyncBatchNorm across processes and the NHWC memory layout, as the runtime says."""
    if runtime.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the parameters stay the same objects
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@contextlib.contextmanager
def flush_denormals():
    """Denormal floats flushed to zero while a run trains on CPUs, and the process's setting restored
    after. ImageNet-pretrained efficientnet_lite0 weights made a CPU forward and backward pass 18% slower
    than random ones (286 against 242 ms at 64 px, batch 64): denormal arithmetic. GPUs flush them anyway.
    Scoped, because the switch is process-wide (a notebook's other code, hypothesis's float strategies)."""
    if torch.cuda.is_available() or not torch.set_flush_denormal(True):  # False: this CPU cannot
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
