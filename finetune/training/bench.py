"""`finetune bench RECIPE`: the input pipeline's throughput (PIL workers next to the decoded-image cache with
device augmentation, on the recipe's own training images), and the train-step throughput of the toolkit's
loop next to a minimal PyTorch loop.

The pipeline part times loader to model-ready tensors on the device and nothing else. For the step:

Both loops train the same architecture, at the same batch (split into the same micro-batches), image
size, precision and memory layout (channels_last), with the same frozen parameters, pinned memory and
cuDNN autotuning (a process-wide switch the toolkit turns on for both), on the same in-memory random
tensors (so image decoding is measured by neither). The toolkit side is the training loop's own
session and `train_epoch`, with its loader swapped for the ready tensors.
They alternate in rounds inside one process; the best round of each is compared, so a noisy neighbour
or a cold cache penalises neither side. The ratio toolkit/plain is the number to watch: 1.0 means the
toolkit adds nothing to the step. Timing is a clock read after waiting for the GPU, not
`torch.utils.benchmark.Timer`: its `timeit` runs two untimed warm-up passes before every measurement (two
extra epochs here) and pins torch to one thread unless told otherwise, which would time another setup.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset

from ..data.loaders import EpochSeeded, available_cores, build_loader
from ..data.splits import Splits, build_splits
from ..errors import FinetuneError
from ..model.backbone import build_model
from ..model.groups import build_plan
from ..recipe.schema import DataConfig, RecipeConfig, TrainConfig
from ..tasks import build_task
from .batching import AUTO_LARGEST, Batching, derive_batching
from .inputs import model_inputs
from .session import Session
from .start import build_accelerator, start_session
from .step import train_epoch


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
    # The step on images is what is timed, also for a recipe whose head would train on cached features;
    # batch_size auto would follow the stand-in data's size, so it is the largest auto choice here.
    batch = AUTO_LARGEST if config.train.batch_size == "auto" else config.train.batch_size
    # The stand-in data has one class per image: a recipe of another task is timed with its loss as softmax
    # cross-entropy, which costs the same as its own (binary cross-entropy, a squared error) next to the model.
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, feature_cache="none"),
                                 train=dataclasses.replace(config.train, batch_size=batch), task="single_label")
    tc = config.train
    accelerator, precision = build_accelerator(config)
    session = start_session(config, _stand_in_splits(tc.batch_size, num_classes), accelerator, precision, None,
                            lambda _: None)
    image_size = session.data_cfg["input_size"]
    # Separate warmup and timed sets: each call runs whole epochs, as training does.
    warmup_set = RandomImages(tc.batch_size * warmup, image_size, num_classes, tc.seed)
    timed_set = RandomImages(tc.batch_size * steps, image_size, num_classes, tc.seed + 1)
    toolkit_warmup, toolkit = (_toolkit_epoch(session, accelerator, tc, d) for d in (warmup_set, timed_set))
    device, batching, channels_last = accelerator.device, session.batching, session.runtime.channels_last
    plain_model = build_model(dataclasses.replace(config.model, pretrained=False), num_classes, lambda _: None,
                              config.data.image_size)
    # The same starting weights: the speed of CPU kernels depends on the values (denormals).
    plain_model.load_state_dict(session.network.state_dict())
    plain_warmup, plain = _plain_loop(config, plain_model, [warmup_set, timed_set], device, precision, batching,
                                      channels_last, session.ema_decay)
    warmup_s = {"toolkit_warmup_s": round(toolkit_warmup(), 2), "plain_warmup_s": round(plain_warmup(), 2)}
    rounds = []
    for _ in range(repeats):
        rounds.append({"toolkit_s": toolkit(), "plain_s": plain()})
    images = steps * tc.batch_size
    best_toolkit = images / min(r["toolkit_s"] for r in rounds)
    best_plain = images / min(r["plain_s"] for r in rounds)
    return {
        "backbone": config.model.backbone, "device": str(device), "device_name": _device_name(device),
        "precision": precision, "batch_size": tc.batch_size, "per_device": batching.per_device,
        "accumulation": batching.accumulation, "channels_last": channels_last, "image_size": list(image_size),
        "frozen_backbone": config.freeze.backbone, "steps": steps, "repeats": repeats,
        "toolkit_images_per_second": round(best_toolkit, 1), "plain_images_per_second": round(best_plain, 1),
        "ratio": round(best_toolkit / best_plain, 4), "rounds": rounds, "compiled": tc.compile,
        **warmup_s,  # with train.compile: the compilation, timed apart from the throughput
    }


def run_pipeline_bench(config: RecipeConfig, batches: int = 20) -> dict:
    """The input pipeline alone, on the recipe's training data: images per second from the loader to
    model-ready tensors on the device, PIL workers (data.cache=none) next to the decoded-image cache with
    batched device augmentation (data.cache=decoded), with the same loader workers, batch and crop size.
    The cache's one-off build is timed apart (`decoded_setup_seconds`, including the session set-up)."""
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, feature_cache="none"))
    splits = build_splits(config.data, config.train.seed, task=build_task(config))
    result: dict = {"batches": batches}
    for name, cache in (("pil", "none"), ("decoded", "decoded")):
        c = dataclasses.replace(config, data=dataclasses.replace(config.data, cache=cache))
        accelerator, precision = build_accelerator(c)
        started = time.perf_counter()
        try:
            s = start_session(c, splits, accelerator, precision, None, lambda _: None)
        except FinetuneError as e:
            return {**result, "skipped": str(e)}
        result[f"{name}_setup_seconds"] = round(time.perf_counter() - started, 2)
        result[f"{name}_images_per_second"] = round(_pipeline_rate(s, accelerator.device, batches), 1)
        result.update(batch=s.batching.per_device, workers=s.runtime.workers, crop=s.train_side)
    result["ratio"] = round(result["decoded_images_per_second"] / result["pil_images_per_second"], 3)
    return result


def _pipeline_rate(s: Session, device: torch.device, batches: int) -> float:
    """Images per second over `batches` training batches made ready on `device` (after one untimed batch:
    the loader workers start), passing epochs as the loop does."""
    def ready_batches():
        for epoch in range(10**6):
            s.train_set.set_epoch_seed(epoch)
            s.train_loader.set_epoch(epoch)
            for batch in s.train_loader:
                yield model_inputs(batch, s.train_augment, s.runtime.channels_last)[0]
    stream = ready_batches()
    next(stream)
    images, threads = 0, torch.get_num_threads()
    # The main process keeps the cores the loader workers leave (oversubscribed threads spin-wait).
    torch.set_num_threads(max(1, available_cores() - s.runtime.workers))

    def run() -> None:
        nonlocal images
        for _ in range(batches):
            images += len(next(stream))
    seconds = _seconds(run, device)
    stream.close()
    torch.set_num_threads(threads)
    return images / seconds


def _stand_in_splits(batch_size: int, num_classes: int) -> Splits:
    """Tiny blank images, enough for a session to be built; its loaders are replaced by ready tensors."""
    blank = Image.new("RGB", (8, 8))
    pairs = [(blank, i % num_classes) for i in range(batch_size + 2 * num_classes)]
    return build_splits(DataConfig(train="python:bench"), 0, pairs, class_names=[str(i) for i in range(num_classes)])


def _toolkit_epoch(session: Session, accelerator: Accelerator, tc: TrainConfig, dataset: Dataset) -> Callable[[], float]:
    """The toolkit's own training step over `dataset` for one epoch: its session with the loader (and the
    batch count) swapped for the ready tensors. Returns `run()`, timed to the last kernel, in seconds."""
    batching = derive_batching(tc.batch_size, tc.micro_batch_size, session.batching.processes, len(dataset))
    data = EpochSeeded(dataset)
    loader = accelerator.prepare(build_loader(data, batching.per_device, True, 0, session.runtime.pin_memory))
    s = dataclasses.replace(session, inputs=dataclasses.replace(session.inputs, train_set=data), train_loader=loader,
                            batching=batching, schedule=lambda _: 1.0)
    state = {"epoch": 0, "update": 0}

    def epoch() -> None:
        for state["update"], _ in train_epoch(s, accelerator, state["epoch"], state["update"]):
            pass
        state["epoch"] += 1
    return lambda: _seconds(epoch, accelerator.device)


def format_pipeline(r: dict) -> str:
    if "skipped" in r:
        return f"input pipeline: not measured ({r['skipped']})"
    return (f"input pipeline, {r['batches']} batches of {r['batch']} at {r['crop']} px, "
            f"{r['workers']} loader worker(s)\n"
            f"  PIL workers              {r['pil_images_per_second']:>10.1f} img/s\n"
            f"  decoded cache + device   {r['decoded_images_per_second']:>10.1f} img/s "
            f"(set-up with the cache build {r['decoded_setup_seconds']:.1f} s)\n"
            f"  ratio decoded/PIL = {r['ratio']:.2f}")


def format_report(r: dict) -> str:
    layout = ", channels_last" if r["channels_last"] else ""
    split = f" ({r['per_device']} x {r['accumulation']} accumulation)" if r["accumulation"] > 1 else ""
    return (f"{r['backbone']} on {r['device_name']} ({r['precision']}{layout}), batch {r['batch_size']}{split}, "
            f"{r['image_size'][1]}x{r['image_size'][2]}, {r['steps']} steps x {r['repeats']} rounds\n"
            f"  toolkit loop  {r['toolkit_images_per_second']:>10.1f} img/s\n"
            f"  plain PyTorch {r['plain_images_per_second']:>10.1f} img/s\n"
            f"  ratio toolkit/plain = {r['ratio']:.3f}"
            + (f"\n  compiling (first warm-up epoch): toolkit {r['toolkit_warmup_s']:.1f} s, plain {r['plain_warmup_s']:.1f} s"
               if r["compiled"] else ""))


def _seconds(run: Callable[[], None], device: torch.device) -> float:
    """Wall time of `run()` up to its last kernel."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _plain_loop(config: RecipeConfig, model: torch.nn.Module, datasets: list[Dataset], device: torch.device,
                precision: str, batching: Batching, channels_last: bool, ema_decay: float | None) -> list:
    """What a careful user writes by hand, set up like the toolkit's step: same frozen parameters, batch
    split, memory layout and precision, fused AdamW, the same moving average of the weights (timm's, when
    the recipe keeps one), pinned memory and non-blocking copies.
    Returns one `run()` per dataset: an epoch over it, timed to the last kernel, in seconds."""
    build_plan(model, config.optim, config.freeze, config.model.head).apply_freezing(model)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = ModelEmaV3(model, decay=ema_decay) if ema_decay else None
    if config.train.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    smoothing = config.train.label_smoothing

    def timed(dataset: Dataset):
        loader = DataLoader(dataset, batch_size=batching.per_device, shuffle=True, drop_last=True,
                            pin_memory=device.type == "cuda")

        def run() -> None:
            for i, (images, labels) in enumerate(loader):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = F.cross_entropy(model(images), labels, label_smoothing=smoothing) / batching.accumulation
                scaler.scale(loss).backward()
                if (i + 1) % batching.accumulation == 0:
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(model)
            loss.item()
        return lambda: _seconds(run, device)

    return [timed(d) for d in datasets]
