"""The feature cache: when the plan says the body never changes (a linear probe), the body runs once per
image and the head trains on its cached outputs.

Features are what timm's `forward_head(forward_features(x), pre_logits=True)` returns in eval mode: the
pooled (and, for ViTs, normed) vector the classifier reads. Each training image gets `data.feature_views`
of them: view 0 through the eval transform (the usual linear probe), views 1.. through the training
augmentation, drawn once with a fixed seed; each epoch then draws one view per image. Validation and test
use the eval view.

The cache lives in `data.cache_dir`, one safetensors file per (data, backbone weights, preprocessing,
views) key (data/cachedir.py's, as the decoded-image cache's), so a second run or a resumed one skips the
body entirely; a changed image file, label or weight gives another key, never a stale cache. Sources
without a lasting identity (Python objects) are cached in memory for the run only. Unreadable images are
recorded as during training and kept in the cache's metadata, so a run that finds the cache reports them
too; their rows carry IGNORE_LABEL, which the loss and the metrics leave out.
The cache only saves time: a file that cannot be written (read-only folder, full disk) or read (damaged)
costs a note, not the run, whose features then stay in memory; a file is written whole or not at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from ..atomic import replacing
from ..data.badimages import SkipLog, read_skip_logs
from ..data.cachedir import cache_folder, cache_key, cache_unavailable, fingerprint, os_error
from ..data.loaders import EpochSeeded, Transformed, build_loader
from ..data.splits import Splits
from ..recipe.schema import DataConfig
from .inputs import Inputs, Loading, Place, model_inputs

VERSION = 2  # part of every key: bump when what a cache file holds changes (2: elongated images unreadable)


class FeatureView(Dataset):
    """Cached features of one split, in the shape of the image view it replaces (data.loaders.Transformed):
    `indices` into the source, `name(position)`, and (features, label) items. With several views per
    image, each access draws one of them from torch's generator, which the loop seeds per epoch."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, view: Transformed):
        self.features, self.labels, self.view = features, labels, view
        self.indices = view.indices

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int):
        views = self.features.shape[1]
        k = int(torch.randint(views, ())) if views > 1 else 0
        return self.features[position, k], int(self.labels[position])

    def name(self, position: int) -> str:
        return self.view.name(position)


class Head(torch.nn.Module):
    """What trains on cached features: the model's classifier, after the dropout its forward_head applies."""

    def __init__(self, classifier: torch.nn.Module, drop_rate: float):
        super().__init__()
        self.classifier, self.drop_rate = classifier, drop_rate

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.nn.functional.dropout(features, self.drop_rate, self.training))


def feature_inputs(network: torch.nn.Module, splits: Splits, dc: DataConfig, how: Loading, images: Inputs,
                   place: Place, full_batch: bool, log: Callable[[str], None]) -> Inputs:
    """The head alone on cached features of every split, drawn through the `images` pipeline once. The
    main process fills a missing disk cache while the others wait, then every process reads it.
    `full_batch` (optim.name=lbfgs): one update per epoch over every cached view (fit_epoch_lbfgs)."""
    network = network.to(place.device).eval()
    source = Extraction(network, weights_digest(network), images, how, place)  # hashing the body: once
    views = {"train": (splits.train, splits.train_indices, dc.feature_views),
             "val": (splits.val, splits.val_indices, 1)}
    if splits.test is not None:
        views["test"] = (splits.test, None, 1)
    cached: dict[str, FeatureView] = {}
    skipped: list[dict] = []  # unreadable files, for the run's data report once its directory exists
    for split, (base, indices, k) in views.items():
        cached[split], bad = split_features(source, images.eval_view(base, indices, split), k, dc, how.seed, log)
        skipped += bad

    def feature_view(base: Dataset, indices: list[int] | None, split: str) -> FeatureView:
        return cached[split]
    runtime = dataclasses.replace(how.runtime, channels_last=False, workers=0)  # in-memory vectors
    batching = how.batching
    if full_batch:
        n = len(cached["train"]) * dc.feature_views
        batching = dataclasses.replace(batching, global_batch=n, per_device=n, accumulation=1, updates_per_epoch=1)
    train_set = EpochSeeded(cached["train"])
    return Inputs("cached features of the frozen body (data.feature_cache=auto)", train_set,
                  build_loader(train_set, how.batching.per_device, True, 0, runtime.pin_memory, how.sampler),
                  build_loader(cached["val"], how.batching.per_device, False, 0, runtime.pin_memory),
                  feature_view, images.train_transform,
                  model=Head(network.get_classifier(), getattr(network, "drop_rate", 0.0)), runtime=runtime,
                  batching=batching, features_cached=True, skipped=tuple(skipped))


@dataclass(frozen=True)
class Extraction:
    """What computing features needs: the body in eval mode and its identity (a cache key), the image
    pipeline that feeds it, how that pipeline loads, and where this process runs."""
    network: torch.nn.Module
    body_id: str
    images: Inputs
    how: Loading
    place: Place


def split_features(source: Extraction, image_view: Transformed, k: int, dc: DataConfig, seed: int,
                   log: Callable[[str], None]) -> tuple[FeatureView, list]:
    """One split's features (k views), from the disk cache when there is one for this key (the main process
    fills it while the others wait), else computed; and its unreadable files."""
    place = source.place
    key = _key(image_view.base, source.body_id, source.how.data_cfg, dc, image_view.split, k, seed, image_view.indices)
    folder = None if key is None else cache_folder(dc.cache_dir)
    path = None if folder is None else folder / f"features-{key}.safetensors"

    def extract():
        return _extract(source, image_view, k, seed, log)
    computed = None
    if path is not None and place.is_main and not path.is_file():
        computed = extract()
        try:
            _save(path, *computed)
        except OSError as e:
            needed = sum(t.numel() * t.element_size() for t in computed[:2])
            note = cache_unavailable("the feature cache", folder, e, needed, "data.feature_cache=auto").note
            log(f"features: not cached: {note}; kept in memory for this run, computed again by the next one")
    place.wait()
    found = _load(path, log) if path is not None and path.is_file() else None
    features, labels, bad = found or computed or extract()
    log(f"features: {image_view.split} {tuple(features.shape)} {'from ' + str(path) if found else 'in memory'}")
    return FeatureView(features, labels, image_view), bad


@torch.no_grad()
def _extract(source: Extraction, view: Transformed, k: int, seed: int, log: Callable[[str], None]
             ) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(features [N, k, D], labels [N] with IGNORE_LABEL for unreadable images, the unreadable files), through
    the run's image pipeline (PIL transforms, or decoded crops and the device augmentation)."""
    images, runtime, device = source.images, source.how.runtime, source.place.device
    folder = tempfile.mkdtemp(prefix="finetune-features-")  # loader workers append unreadable files here
    skip_log = SkipLog.for_process(Path(folder), 0)
    per_view = []
    for v in range(k):
        # View 0: the eval transform; views 1..: the training augmentation with a seed per view.
        torch.manual_seed(seed * 1000 + v)
        image_view = Transformed(view.base, view.indices, images.train_transform if v else view.transform, view.split,
                                 "skip", skip_log if v == 0 else None, substitute=False, raw=view.raw)
        loader = build_loader(image_view, source.how.batching.per_device, False, runtime.workers, runtime.pin_memory,
                              collate_fn=images.collate)
        feats, labels = [], []
        for batch in loader:
            batch = [t.to(device, non_blocking=True) for t in batch]
            inputs, targets = model_inputs(batch, images.train_augment if v else images.eval_augment, False)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=runtime.precision == "bf16"):
                feats.append(source.network.forward_head(source.network.forward_features(inputs), pre_logits=True)
                             .float().cpu())
            labels.append(targets.cpu())
        per_view.append(torch.cat(feats))
        log(f"features: {view.split} view {v + 1}/{k} of {len(view)} images computed")
    bad = read_skip_logs(Path(folder))
    shutil.rmtree(folder, ignore_errors=True)
    return torch.stack(per_view, dim=1).contiguous(), torch.cat(labels), bad


def _key(base, body_id: str, data_cfg: dict, dc: DataConfig, split: str, k: int, seed: int,
         indices: list[int]) -> str | None:
    source = fingerprint(base)
    if source is None:
        return None
    augmentation = {"scale": dc.scale, "hflip": dc.hflip, "color_jitter": dc.color_jitter,
                    "auto_augment": dc.auto_augment, "seed": seed} if k > 1 else None
    return cache_key(VERSION, source, body_id, {k: str(v) for k, v in data_cfg.items()}, split, k, augmentation,
                     hashlib.sha256(repr(indices).encode()).hexdigest())


def weights_digest(network: torch.nn.Module) -> str:
    """The body's identity: its architecture and every tensor but the classifier's."""
    head = {t.data_ptr() for t in network.get_classifier().state_dict().values()}
    digest = hashlib.sha256(type(network).__name__.encode())
    for name, tensor in network.state_dict().items():
        if tensor.data_ptr() not in head:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save(path: Path, features: torch.Tensor, labels: torch.Tensor, bad: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:  # two runs filling one cache each rename a whole file into place
        try:
            save_file({"features": features, "labels": labels}, str(tmp), metadata={"bad": json.dumps(bad)})
        except SafetensorError as e:  # an I/O error of its Rust writer
            raise os_error(e) from e


def _load(path: Path, log: Callable[[str], None]) -> tuple[torch.Tensor, torch.Tensor, list] | None:
    """The cached features, labels and unreadable files; None (and a note) for a file that cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            bad = json.loads((f.metadata() or {}).get("bad", "[]"))
        tensors = load_file(str(path))
        return tensors["features"], tensors["labels"], bad
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        log(f"features: cannot read {path} ({type(e).__name__}: {str(e)[:200]}); computing them in memory "
            "instead. Delete the file to cache them again.")
        return None
