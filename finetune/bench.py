"""`finetune bench RECIPE`: train-step throughput of the toolkit's loop next to a minimal PyTorch loop.

Both loops train the same architecture, at the same batch, image size and precision, with the same
frozen parameters, on the same in-memory random tensors (so image decoding is measured by neither).
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
    dataset = RandomImages(config.train.batch_size * (steps + warmup), image_size, num_classes, config.train.seed)

    toolkit, device = prepare_benchmark(config, model, dataset)
    precision = _effective_precision(config, device)
    plain = _plain_loop(config, _model(config, num_classes), dataset, device, precision)
    toolkit(warmup), plain(warmup)
    rounds = []
    for _ in range(repeats):
        rounds.append({"toolkit_s": toolkit(steps), "plain_s": plain(steps)})
    images = steps * config.train.batch_size
    best_toolkit = images / min(r["toolkit_s"] for r in rounds)
    best_plain = images / min(r["plain_s"] for r in rounds)
    return {
        "backbone": config.model.backbone, "device": str(device), "device_name": _device_name(device),
        "precision": precision, "batch_size": config.train.batch_size, "image_size": list(image_size),
        "frozen_backbone": config.freeze.backbone, "steps": steps, "repeats": repeats,
        "toolkit_images_per_second": round(best_toolkit, 1), "plain_images_per_second": round(best_plain, 1),
        "ratio": round(best_toolkit / best_plain, 4), "rounds": rounds,
    }


def format_report(r: dict) -> str:
    return (f"{r['backbone']} on {r['device_name']} ({r['precision']}), batch {r['batch_size']}, "
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


def _plain_loop(config: RecipeConfig, model: torch.nn.Module, dataset: Dataset, device: torch.device, precision: str):
    """What a careful user writes by hand: same frozen parameters, AdamW (fused on CUDA), autocast."""
    build_plan(model, config.optim, config.freeze).apply_freezing(model)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    loader = DataLoader(dataset, batch_size=config.train.batch_size, shuffle=True, drop_last=True,
                        pin_memory=device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")

    def run(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for i, (images, labels) in enumerate(loader):
            if i == n:
                break
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = F.cross_entropy(model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    return run
