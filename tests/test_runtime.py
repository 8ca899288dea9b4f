"""finetune/training/runtime.py: settings derived once from the recipe and the machine (precision,
sync_bn, channels_last, loader workers) and the model adapted to them."""

from __future__ import annotations

import pytest
import timm
import torch

from finetune import FinetuneError
from finetune.recipe.schema import DataConfig, TrainConfig
from finetune.training.runtime import adapt_model, resolve_precision, resolve_runtime


def adapted(model: torch.nn.Module, tc: TrainConfig, processes: int, device: str) -> tuple[torch.nn.Module, bool]:
    runtime = resolve_runtime(tc, DataConfig(num_workers=0), model, "fp32", processes, device == "cuda")
    return adapt_model(model, runtime), runtime.channels_last


def batch_norms(model: torch.nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


def test_sync_bn_converts_batch_norm_on_several_gpus():
    model, _ = adapted(timm.create_model("test_resnet"), TrainConfig(sync_bn=True), 2, "cuda")
    assert batch_norms(model) == {torch.nn.SyncBatchNorm}


def test_sync_bn_is_a_no_op_on_one_process():
    model, _ = adapted(timm.create_model("test_resnet"), TrainConfig(sync_bn=True), 1, "cuda")
    assert torch.nn.SyncBatchNorm not in batch_norms(model)


def test_sync_bn_on_cpu_processes_is_refused_with_advice():
    with pytest.raises(FinetuneError, match="sync_bn=true needs GPUs.*set it to false"):
        adapted(timm.create_model("test_resnet"), TrainConfig(sync_bn=True), 2, "cpu")


@pytest.mark.parametrize("backbone, device, expected", [
    ("test_resnet", "cuda", True),  # a conv net on a GPU
    ("test_vit", "cuda", False),  # one patch-embedding convolution does not make a conv net
    ("test_resnet", "cpu", True),  # oneDNN's NHWC kernels pay on CPUs too
    ("test_vit", "cpu", False),
])
def test_channels_last_defaults_to_conv_nets(backbone, device, expected):
    model, channels_last = adapted(timm.create_model(backbone), TrainConfig(), 1, device)
    assert channels_last is expected
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is expected  # the stem, k > 1


def test_channels_last_setting_wins_over_the_default():
    _, channels_last = adapted(timm.create_model("test_resnet"), TrainConfig(channels_last=False), 1, "cuda")
    assert channels_last is False




def test_precision_auto_is_fp32_without_a_gpu_and_fp16_needs_one():
    assert resolve_precision("auto", cuda=False) == "fp32"
    assert resolve_precision("bf16", cuda=False) == "bf16"
    with pytest.raises(FinetuneError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cuda=False)


def test_loader_workers_default_shares_the_cores_and_an_explicit_value_wins(monkeypatch):
    import finetune.data.loaders

    monkeypatch.setattr(finetune.data.loaders, "available_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    model = timm.create_model("test_resnet")
    assert resolve_runtime(TrainConfig(), DataConfig(), model, "fp32", 2, False).workers == 3
    assert resolve_runtime(TrainConfig(), DataConfig(num_workers=5), model, "fp32", 2, False).workers == 5


def test_denormals_are_flushed_while_training_and_restored_after():
    from finetune.training.runtime import flush_denormals
    tiny = torch.tensor([1e-39])  # a denormal float32
    with flush_denormals():
        inside = (tiny * 1.0).item()
    assert inside == 0.0 and (tiny * 1.0).item() > 0  # the process's setting is back: other code sees denormals
