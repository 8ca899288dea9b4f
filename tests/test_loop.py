"""finetune/loop.py, unit by unit: the model adapted to the processes and device (sync_bn, channels_last),
and the stop on a fault. The loop end to end is in test_end_to_end.py and test_distributed.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import timm
import torch

from finetune import FinetuneError
from finetune.config import TrainConfig
from finetune.loop import _adapt_model, _stop_on_fault


def fake_accelerator(processes: int, device: str) -> SimpleNamespace:
    return SimpleNamespace(num_processes=processes, device=torch.device(device))


def batch_norms(model: torch.nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


def test_sync_bn_converts_batch_norm_on_several_gpus():
    model, _ = _adapt_model(timm.create_model("test_resnet"), TrainConfig(sync_bn=True), fake_accelerator(2, "cuda"))
    assert batch_norms(model) == {torch.nn.SyncBatchNorm}


def test_sync_bn_is_a_no_op_on_one_process():
    model, _ = _adapt_model(timm.create_model("test_resnet"), TrainConfig(sync_bn=True), fake_accelerator(1, "cuda"))
    assert torch.nn.SyncBatchNorm not in batch_norms(model)


def test_sync_bn_on_cpu_processes_is_refused_with_advice():
    with pytest.raises(FinetuneError, match="sync_bn=true needs GPUs.*set it to false"):
        _adapt_model(timm.create_model("test_resnet"), TrainConfig(sync_bn=True), fake_accelerator(2, "cpu"))


@pytest.mark.parametrize("backbone, device, expected", [
    ("test_resnet", "cuda", True),  # a conv net on a GPU
    ("test_vit", "cuda", False),  # one patch-embedding convolution does not make a conv net
    ("test_resnet", "cpu", False),
])
def test_channels_last_defaults_to_conv_nets_on_gpus(backbone, device, expected):
    model, channels_last = _adapt_model(timm.create_model(backbone), TrainConfig(), fake_accelerator(1, device))
    assert channels_last is expected
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is expected  # the stem, k > 1


def test_channels_last_setting_wins_over_the_default():
    _, channels_last = _adapt_model(timm.create_model("test_resnet"), TrainConfig(channels_last=False),
                                    fake_accelerator(1, "cuda"))
    assert channels_last is False


def test_exception_on_one_process_names_it_and_the_update():
    with pytest.raises(FinetuneError, match=r"stopped at update 4: process 1 \(of 2\) raised") as info:
        _stop_on_fault([0.5, 0.0], [1], 3, None, "hint")
    assert info.value.raised_on_every_process


def test_non_finite_loss_names_the_process_and_the_update():
    with pytest.raises(FinetuneError, match=r"update 8: the loss is inf on process 0 \(of 2\)"):
        _stop_on_fault([math.inf, 0.5], [], 7, None, "hint")


def test_finite_losses_pass():
    _stop_on_fault([0.5, 0.7], [], 7, None, "hint")
