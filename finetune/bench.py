"""`finetune bench RECIPE`: train-step throughput of the toolkit's loop next to a minimal PyTorch loop.

Both loops train the same architecture, at the same batch (split into the same micro-batches), image
size, precision and memory layout (channels_last), with the same frozen parameters, pinned memory and
cuDNN autotuning (a process-wide switch the toolkit turns on for both), on the same in-memory random
tensors (so image decoding is measured by neither).
They alternate in rounds inside one process; the best round of each is compared, so a noisy neighbour
or a cold cache penalises neither side. The ratio toolkit/plain is the number to watch: 1.0 means the
toolkit adds nothing to the step.
"""

from __future__ import annotations

import time

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .config import RecipeConfig
from .groups import build_plan
from .loop import prepare_benchmark


class RandomImages(Dataset):
    """`n` ready-made normalised image tensors with random labels."""

    def __init__(self, n: int, image_size: tuple[int, int, int], num_classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, *image_size, generator=g)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def run_bench(config: RecipeConfig, steps: int = 20, warmup: int = 3, repeats: int = 3,
              num_classes: int = 10) -> dict:
    model = _model(config, num_classes)
    image_size = timm.data.resolve_model_data_config(model)["input_size"]
    if config.data.image_size:
        image_size = (image_size[0], config.data.image_size, config.data.image_size)
    # Separate warmup and timed sets: each call runs whole epochs, as training does.
    warmup_set = RandomImages(config.train.batch_size * warmup, image_size, num_classes, config.train.seed)
    timed_set = RandomImages(config.train.batch_size * steps, image_size, num_classes, config.train.seed + 1)

    (toolkit_warmup, toolkit), device, batching, channels_last = prepare_benchmark(config, model, [warmup_set, timed_set])
    precision = _effective_precision(config, device)
    plain_warmup, plain = _plain_loop(config, _model(config, num_classes), [warmup_set, timed_set], device, precision,
                                      batching.per_device, batching.accumulation, channels_last)
    toolkit_warmup(), plain_warmup()
    rounds = []
    for _ in range(repeats):
        rounds.append({"toolkit_s": toolkit(), "plain_s": plain()})
    images = steps * config.train.batch_size
    best_toolkit = images / min(r["toolkit_s"] for r in rounds)
    best_plain = images / min(r["plain_s"] for r in rounds)
    return {
        "backbone": config.model.backbone, "device": str(device), "device_name": _device_name(device),
        "precision": precision, "batch_size": config.train.batch_size, "per_device": batching.per_device,
        "accumulation": batching.accumulation, "channels_last": channels_last, "image_size": list(image_size),
        "frozen_backbone": config.freeze.backbone, "steps": steps, "repeats": repeats,
        "toolkit_images_per_second": round(best_toolkit, 1), "plain_images_per_second": round(best_plain, 1),
        "ratio": round(best_toolkit / best_plain, 4), "rounds": rounds,
    }


def format_report(r: dict) -> str:
    layout = ", channels_last" if r["channels_last"] else ""
    split = f" ({r['per_device']} x {r['accumulation']} accumulation)" if r["accumulation"] > 1 else ""
    return (f"{r['backbone']} on {r['device_name']} ({r['precision']}{layout}), batch {r['batch_size']}{split}, "
            f"{r['image_size'][1]}x{r['image_size'][2]}, {r['steps']} steps x {r['repeats']} rounds\n"
            f"  toolkit loop  {r['toolkit_images_per_second']:>10.1f} img/s\n"
            f"  plain PyTorch {r['plain_images_per_second']:>10.1f} img/s\n"
            f"  ratio toolkit/plain = {r['ratio']:.3f}")


def _model(config: RecipeConfig, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(config.train.seed)
    kwargs = {"img_size": config.data.image_size} if config.data.image_size and _fixed(config) else {}
    return timm.create_model(config.model.backbone, pretrained=False, num_classes=num_classes, **kwargs)


def _fixed(config: RecipeConfig) -> bool:
    cfg = timm.get_pretrained_cfg(config.model.backbone, allow_unregistered=True)
    return bool(cfg and cfg.fixed_input_size)


def _effective_precision(config: RecipeConfig, device: torch.device) -> str:
    if config.train.precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return config.train.precision


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _plain_loop(config: RecipeConfig, model: torch.nn.Module, datasets: list[Dataset], device: torch.device,
                precision: str, per_device: int, accumulation: int, channels_last: bool) -> list:
    """What a careful user writes by hand, set up like the toolkit's step: same frozen parameters, batch
    split, memory layout and precision, AdamW (fused on CUDA), pinned memory and non-blocking copies.
    Returns one `run()` per dataset: an epoch over it, timed to the last kernel, in seconds."""
    build_plan(model, config.optim, config.freeze).apply_freezing(model)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    smoothing = config.train.label_smoothing

    def timed(dataset: Dataset):
        loader = DataLoader(dataset, batch_size=per_device, shuffle=True, drop_last=True,
                            pin_memory=device.type == "cuda")

        def run() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            for i, (images, labels) in enumerate(loader):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = F.cross_entropy(model(images), labels, label_smoothing=smoothing) / accumulation
                scaler.scale(loss).backward()
                if (i + 1) % accumulation == 0:
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
            loss.item()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - started
        return run

    return [timed(d) for d in datasets]
