"""check-data: what is wrong with a recipe's data, found without training.

Every image of every split is decoded once (as training would decode it), which finds the files a run
would skip, and hashed by its pixels, which finds exact duplicates within a split and across splits
(leakage: a validation image the model also trains on makes validation look better than it is). Per
split it counts classes and the imbalance between them, and lists images whose mode or size stands out.

Findings are errors (the data cannot train: no readable images, fewer than two classes, val or test
classes the training data lacks) or warnings (it can, but look). The splits are the run's own: without
data.val, validation is split off train with the run's seed, exactly as `finetune train` would.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from statistics import median
from typing import Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import FinetuneError
from ..recipe.schema import DataConfig
from .badimages import BAD_IMAGE_ERRORS, describe_error
from .images import refuse_elongated, to_rgb
from .loaders import default_num_workers
from .samples import ImageSamples, natural_key
from .splits import Splits, stratified_split
from .targets import OneClassPerImage, TargetReader

IMBALANCE_WARNING = 10.0  # largest class / smallest class above this: say so (class_weights, sampler)
SIZE_FACTOR = 4.0  # a side more than 4x smaller or larger than the split's median side is an outlier
LISTED = 20  # files listed per finding in the table and in JSON; counts are always complete


def inspect_image(samples: ImageSamples, index: int) -> dict:
    """Decode sample `index` fully, as training would. {"mode", "size", "digest"} or {"error"}."""
    try:
        raw = samples.raw(index)
        if raw is not None and not raw:
            return {"error": "empty file (0 bytes)"}
        if raw is not None:
            with Image.open(io.BytesIO(raw)) as img:
                refuse_elongated(*img.size)  # as training refuses it, before decoding
                mode = img.mode
                rgb = to_rgb(ImageOps.exif_transpose(img))  # loads every pixel: a truncated file fails here
        else:
            rgb = samples.image(index)
            refuse_elongated(*rgb.size)  # in memory already; training refuses it before resizing
            mode = rgb.mode
    except UnidentifiedImageError:  # its message would name our in-memory buffer, not the file
        return {"error": "UnidentifiedImageError: not an image, or a format PIL cannot read"}
    except BAD_IMAGE_ERRORS as e:
        return {"error": describe_error(e)}
    digest = hashlib.blake2b(f"{rgb.size}".encode() + rgb.tobytes(), digest_size=16).hexdigest()
    return {"mode": mode, "size": rgb.size, "digest": digest}


def inspect_all(samples: ImageSamples, indices: Sequence[int]) -> list[dict]:
    """inspect_image over `indices` in threads (PIL decodes with the GIL released)."""
    with ThreadPoolExecutor(max(1, default_num_workers())) as pool:
        return list(pool.map(lambda i: inspect_image(samples, i), indices))


def find_unreadable(samples: ImageSamples, indices: Sequence[int] | None = None) -> list[dict]:
    """[{"file", "reason"}] for every sample that fails to decode."""
    indices = range(len(samples)) if indices is None else indices
    return [{"file": samples.name(i), "reason": r["error"]}
            for i, r in zip(indices, inspect_all(samples, indices)) if "error" in r]


def check_data(cfg: DataConfig, seed: int, task: TargetReader = OneClassPerImage()) -> dict:
    """The report `finetune check-data` prints: {"trainable", "errors", "warnings", "splits", "leakage"}.
    Sources that cannot be opened at all raise FinetuneError, as they would in training. `task` reads and
    counts the targets (targets.py): "classes" counts images per class (per label for label sets), and a
    split's report holds whatever else the task adds (label co-occurrence, the range of numbers)."""
    train = task.load_source(cfg.train, cfg)
    views: dict[str, tuple[ImageSamples, list[int], str]] = {}
    if cfg.val is None:
        train_idx, val_idx = stratified_split(task.stratify_keys(train.targets, train.class_names), cfg.val_fraction,
                                              seed)
        views["train"] = (train, train_idx, f"{cfg.train} (without the validation split)")
        views["val"] = (train, val_idx, f"{cfg.train} (split off train: {cfg.val_fraction:.0%} per class, seed {seed})")
    else:
        views["train"] = (train, list(range(len(train))), cfg.train)
        val = task.load_source(cfg.val, cfg)
        views["val"] = (val, list(range(len(val))), cfg.val)
    if cfg.test is not None:
        test = task.load_source(cfg.test, cfg)
        views["test"] = (test, list(range(len(test))), cfg.test)

    errors: list[str] = []
    warnings: list[str] = []
    splits, digests = {}, {}
    for split, (samples, indices, origin) in views.items():
        results = inspect_all(samples, indices)
        splits[split], digests[split] = _split_report(split, samples, indices, results, origin, errors, warnings,
                                                      task)

    present = {split: {name for name, n in report["classes"].items() if n} for split, report in splits.items()}
    for split in ("val", "test"):
        unknown = sorted(present.get(split, set()) - present["train"], key=natural_key)
        if unknown:
            errors.append(f"{split} has classes with no readable training image: {', '.join(unknown[:LISTED])}; every "
                          f"{split} class must be trained on. Add training images of them, or remove them from {split}.")
    for split in ("val", "test"):
        unscored = sorted(present["train"] - present.get(split, present["train"]), key=natural_key)
        if unscored and splits[split]["readable"]:
            warnings.append(f"classes in train but not in {split} (never scored there): {', '.join(unscored[:LISTED])}.")
    leakage = _leakage(digests)
    for pair, groups in leakage.items():
        warnings.append(f"{len(groups)} image(s) appear in both {pair.replace('/', ' and ')} (leakage: the model "
                        f"is scored on images it trains on). First: {' = '.join(groups[0][:3])}.")
    return {"trainable": not errors, "errors": errors, "warnings": warnings, "splits": splits,
            "leakage": {pair: groups[:LISTED] for pair, groups in leakage.items()}}


def _split_report(split: str, samples: ImageSamples, indices: list[int], results: list[dict], origin: str,
                  errors: list[str], warnings: list[str], task: TargetReader) -> tuple[dict, dict[str, list[int]]]:
    """One split's counts and findings; appends its errors and warnings. Also returns digest -> indices."""
    ok = [(i, r) for i, r in zip(indices, results) if "error" not in r]
    counts = task.count_targets([samples.targets[i] for i, _ in ok], samples.class_names)
    classes = {name: counts.get(name, 0) for name in samples.class_names}
    nonzero = [n for n in classes.values() if n]
    ratio = round(max(nonzero) / min(nonzero), 2) if nonzero else None
    unreadable = [{"file": samples.name(i), "reason": r["error"]} for i, r in zip(indices, results) if "error" in r]

    modes = Counter(r["mode"] for _, r in ok)
    usual_mode = modes.most_common(1)[0][0] if modes else None
    mode_outliers = [{"file": samples.name(i), "mode": r["mode"]} for i, r in ok if r["mode"] != usual_mode]
    size_outliers = []
    if ok:
        mid_w, mid_h = median(r["size"][0] for _, r in ok), median(r["size"][1] for _, r in ok)
        size_outliers = [{"file": samples.name(i), "size": list(r["size"])} for i, r in ok
                         if not (mid_w / SIZE_FACTOR <= r["size"][0] <= mid_w * SIZE_FACTOR
                                 and mid_h / SIZE_FACTOR <= r["size"][1] <= mid_h * SIZE_FACTOR)]
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, r in ok:
        by_digest[r["digest"]].append(i)
    duplicates = [[samples.name(i) for i in group] for group in by_digest.values() if len(group) > 1]

    if not ok:
        errors.append(f"{split} has no readable images ({len(indices)} listed in {origin}).")
    elif split == "train" and len(nonzero) < task.min_classes:
        errors.append(f"train has {len(nonzero)} class with readable images ({', '.join(c for c, n in classes.items() if n)}); "
                      "a classifier needs at least two.")
    if unreadable:
        warnings.append(f"{len(unreadable)} unreadable file(s) in {split}, skipped in training (data.on_bad_image=skip). "
                        f"First: {unreadable[0]['file']} ({unreadable[0]['reason']}).")
    if split == "train" and ratio is not None and ratio > IMBALANCE_WARNING:
        warnings.append(f"train is imbalanced: its largest class has {ratio:g}x the images of its smallest; consider "
                        + task.imbalance_advice())
    empty = [c for c, n in classes.items() if not n]
    if split == "train" and empty and len(nonzero) >= 2:
        warnings.append(f"train has classes without readable images: {', '.join(empty[:LISTED])}; the model gets an "
                        "output for them that it never learns.")
    if duplicates:
        warnings.append(f"{sum(len(g) - 1 for g in duplicates)} duplicate image(s) within {split}. First: "
                        f"{' = '.join(duplicates[0][:3])}.")
    if mode_outliers:
        warnings.append(f"{len(mode_outliers)} image(s) in {split} are not {usual_mode} (converted to RGB when "
                        f"loaded). First: {mode_outliers[0]['file']} ({mode_outliers[0]['mode']}).")
    if size_outliers:
        warnings.append(f"{len(size_outliers)} image(s) in {split} are over {SIZE_FACTOR:g}x smaller or larger than "
                        f"the median {mid_w:g}x{mid_h:g}. First: {size_outliers[0]['file']} {size_outliers[0]['size']}.")
    report = {"source": origin, "images": len(indices), "readable": len(ok), "classes": classes,
              "imbalance_ratio": ratio, "modes": dict(modes.most_common()), "unreadable": unreadable,
              "mode_outliers": mode_outliers[:LISTED], "size_outliers": size_outliers[:LISTED],
              "duplicates": duplicates[:LISTED]}
    report.update(task.target_report([samples.targets[i] for i, _ in ok], samples.class_names))
    return report, {d: [samples.name(i) for i in g] for d, g in by_digest.items()}


def _leakage(digests: dict[str, dict[str, list[str]]]) -> dict[str, list[list[str]]]:
    """{"train/val": [[file in train, file in val, ...], ...]} for identical pixels in two splits."""
    found = {}
    names = list(digests)
    for a_pos, a in enumerate(names):
        for b in names[a_pos + 1:]:
            shared = [digests[a][d] + digests[b][d] for d in digests[a].keys() & digests[b].keys()]
            if shared:
                found[f"{a}/{b}"] = sorted(shared)
    return found


def format_report(report: dict, task: TargetReader = OneClassPerImage()) -> str:
    """The terminal table: one row per split, class counts per split, what the task adds (label pairs, the
    range of numbers), then errors and warnings."""
    splits = report["splits"]
    lines = [f"{'split':<6} {'images':>7} {'readable':>8} {'classes':>7} {'imbalance':>9} {'dupes':>5}  source"]
    for split, r in splits.items():
        present = sum(1 for n in r["classes"].values() if n)
        ratio = f"{r['imbalance_ratio']:g}x" if r["imbalance_ratio"] else "-"
        dupes = sum(len(g) - 1 for g in r["duplicates"])
        lines.append(f"{split:<6} {r['images']:>7} {r['readable']:>8} {present:>7} {ratio:>9} {dupes:>5}  {r['source']}")
    names = list(splits["train"]["classes"])  # the run's class order, then classes train lacks
    names += sorted({c for r in splits.values() for c in r["classes"]} - set(names), key=natural_key)
    width = max([5] + [len(c) for c in names[:50]])
    lines += ["", f"{'class':<{width}} " + " ".join(f"{s:>6}" for s in splits)]
    for name in names[:50]:
        lines.append(f"{name:<{width}} " + " ".join(f"{splits[s]['classes'].get(name, 0):>6}" for s in splits))
    if len(names) > 50:
        lines.append(f"... and {len(names) - 50} more classes (--json lists all)")
    for split, r in splits.items():
        lines += task.format_target_report(split, r)
    for split, r in splits.items():
        for bad in r["unreadable"][:LISTED]:
            lines.append(f"unreadable ({split}): {bad['file']}: {bad['reason']}")
    lines.append("")
    lines += [f"error: {e}" for e in report["errors"]] + [f"warning: {w}" for w in report["warnings"]]
    verdict = ("the data can train" + (" (see the warnings)" if report["warnings"] else "") if report["trainable"]
               else "the data cannot train: fix the errors above")
    return "\n".join(lines + [verdict])


def require_readable(splits: Splits) -> None:
    """data.on_bad_image=error (finetune.train): decode every image once before anything is written, and list
    every bad file at once rather than stopping at the first one hours into a run."""
    bad = find_unreadable(splits.train, splits.train_indices) + find_unreadable(splits.val, splits.val_indices)
    if splits.test is not None:
        bad += find_unreadable(splits.test)
    if bad:
        listed = "; ".join(f"{b['file']} ({b['reason']})" for b in bad[:20])
        raise FinetuneError(f"{len(bad)} unreadable image file(s) and data.on_bad_image=error: {listed}"
                            f"{' ...' if len(bad) > 20 else ''}. Fix or remove them, or set data.on_bad_image=skip "
                            "to train without them (they are then listed in data_report.json).")
