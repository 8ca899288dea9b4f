"""Helpers the test modules share: generated image folders (coloured classes, awkward files, JPEGs of many
sizes, multi-label shapes, a PNG header that claims a huge image), the tiny recipe, and the launcher
environment of the multi-process tests. Plain functions, so module- and session-scoped fixtures and the
tests themselves call them alike; conftest.py wraps some of them as fixtures. A test imports from here,
never from another test module."""

from __future__ import annotations

import copy
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------
# Image folders and the tiny recipe

# One clearly different mean colour per class, so even two epochs of a tiny model learn something.
_PALETTE = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40), (40, 220, 220), (220, 40, 220),
            (128, 128, 128), (250, 250, 250), (10, 10, 10), (250, 140, 0)]


def write_image_folder(root: Path, classes: int | list[str] = 3, per_class: int = 8, size: int = 32,
                       seed: int = 0) -> Path:
    """root/<class>/<i>.png: small RGB PNGs, noise around a per-class mean colour. Returns root."""
    names = [f"c{i}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    rng = np.random.default_rng(seed)
    for k, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        mean = np.array(_PALETTE[k % len(_PALETTE)], dtype=np.float64)
        for i in range(per_class):
            pixels = np.clip(rng.normal(mean, 25.0, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="RGB").save(folder / f"{i}.png")
    return root


def build_tiny_recipe(train: str | Path, **overrides: Any) -> dict:
    """A recipe dict for test_resnet on `train`; dotted-key overrides: build_tiny_recipe(p, **{"train.epochs": 1})."""
    recipe = {
        "model": {"backbone": "test_resnet", "pretrained": False},
        "data": {"train": str(train), "image_size": 32, "num_workers": 0},
        "train": {"epochs": 2, "batch_size": 8},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        recipe.setdefault(section, {})[key] = value
    return copy.deepcopy(recipe)


def write_bad_image_folder(root: Path, per_class: int = 6, size: int = 24) -> dict[str, Path]:
    """An ImageFolder with classes c1, c2, c10: good PNGs plus every kind of awkward file a user's folder
    holds. Returns {kind: path} for the awkward ones (truncated, empty, cmyk, palette, gray16, rgba, text,
    rotated) and the true mean intensity of the 16-bit image, as "gray16_mean" (0-255 scale)."""
    write_image_folder(root, ["c1", "c2", "c10"], per_class, size)
    rng = np.random.default_rng(1)
    rgb = np.clip(rng.normal(128, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    files: dict[str, Any] = {}

    good_jpeg = root / "c1" / "good.jpg"
    Image.fromarray(rgb).save(good_jpeg, quality=90)
    data = good_jpeg.read_bytes()
    files["truncated"] = root / "c1" / "truncated.jpg"
    files["truncated"].write_bytes(data[: len(data) // 2])  # a copy cut off mid-transfer
    files["empty"] = root / "c2" / "empty.png"
    files["empty"].write_bytes(b"")
    files["cmyk"] = root / "c10" / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(files["cmyk"])
    files["palette"] = root / "c1" / "palette.png"
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(files["palette"], transparency=0)
    gray = (np.linspace(0, 1, size * size).reshape(size, size) * 40000 + 5000).astype(np.uint16)
    files["gray16"] = root / "c2" / "gray16.png"
    Image.fromarray(gray).save(files["gray16"])  # mode I;16
    files["gray16_mean"] = float(gray.mean()) / 65535 * 255
    files["rgba"] = root / "c10" / "rgba.png"
    Image.fromarray(np.dstack([rgb, np.full((size, size), 128, np.uint8)]), mode="RGBA").save(files["rgba"])
    files["text"] = root / "c1" / "notes.txt"
    files["text"].write_text("not an image")
    # 30 wide, 10 high in the file; EXIF orientation 6 says: show it rotated 90 degrees, 10 wide, 30 high.
    files["rotated"] = root / "c2" / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((10, 30, 3), 200, np.uint8)).save(files["rotated"], exif=exif)
    return files


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that says it is width x height (RGB) and holds no pixels: PIL reads the size from the header
    and refuses it there, so a 20,000 x 20,000 'image' costs a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


SIZES = ((500, 375), (375, 500), (97, 211))  # (width, height): landscape, portrait, small and odd


def data_config(size: int = 224, crop_pct: float = 0.875, interpolation: str = "bilinear", **more) -> dict:
    return {"input_size": (3, size, size), "interpolation": interpolation, "mean": timm.data.IMAGENET_DEFAULT_MEAN,
            "std": timm.data.IMAGENET_DEFAULT_STD, "crop_pct": crop_pct, "crop_mode": "center", **more}


def write_jpegs(root: Path, sizes=SIZES, classes: int = 2, seed: int = 0) -> Path:
    """root/c<k>/<i>.jpg for every size in every class: gradients plus noise, so resampling filters differ."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            ramp = np.add.outer(np.linspace(0, 160, h), np.linspace(0, 80, w))[..., None] + [20 * k, 60, 0]
            pixels = np.clip(ramp + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{k}" / f"{i}.jpg", quality=90)
    return root


def add_bad_files(root: Path) -> dict[str, Path]:
    good = (root / "c0" / "0.jpg").read_bytes()
    bad = {"truncated": root / "c0" / "truncated.jpg", "garbage": root / "c1" / "garbage.jpg"}
    bad["truncated"].write_bytes(good[: len(good) // 3])
    bad["garbage"].write_bytes(b"this is not a jpeg")
    return bad


# Five shapes, each in a colour of its own, 1-3 per image: the acceptance data.
SHAPES = {"circle": (220, 40, 40), "square": (40, 200, 40), "triangle": (40, 40, 220), "cross": (230, 200, 30),
          "bar": (200, 40, 200)}


def write_shapes(root: Path, n: int, size: int = 48, seed: int = 0, empty_every: int = 0) -> list[dict]:
    """root/img/<i>.png with 1-3 of the shapes each (none for every `empty_every`-th image); returns the
    manifest rows {"image", "labels": [...]}."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    names, rows, r = list(SHAPES), [], size // 6
    for i in range(n):
        image = Image.new("RGB", (size, size), (235, 235, 235))
        draw = ImageDraw.Draw(image)
        count = 0 if empty_every and i % empty_every == 0 else int(rng.integers(1, 4))
        chosen = sorted(rng.choice(len(names), size=count, replace=False).tolist())
        for k in chosen:
            x, y = rng.integers(r, size - r, size=2).tolist()
            color, name = SHAPES[names[k]], names[k]
            if name == "circle":
                draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
            elif name == "square":
                draw.rectangle([x - r, y - r, x + r, y + r], fill=color)
            elif name == "triangle":
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
            elif name == "cross":
                draw.rectangle([x - r, y - 2, x + r, y + 2], fill=color)
                draw.rectangle([x - 2, y - r, x + 2, y + r], fill=color)
            else:
                draw.rectangle([x - r, y - 2, x + r, y + 2], fill=color)
        image.save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "labels": [names[k] for k in chosen]})
    return rows


# ----------------------------------------------------------------------------------------------------
# Runs


class Interrupted(Exception):
    """Stands for a kill right after a checkpoint was written."""


def launcher_env(home: Path) -> dict:
    """This session's environment minus anything that configures Accelerate or a launch: no ACCELERATE_*
    variables, and a fresh HF_HOME, so no `accelerate config` file can be found either. (HOME stays: a
    user-site install of the packages lives under it.)"""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ACCELERATE_") and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["HF_HOME"] = str(home / "hf")
    return env


def torchrun(*args, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    # --standalone: a free local port, so parallel test sessions on one machine do not collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def resume_after_epoch_one(task: str, manifest: Path, run: Path, train_until_epoch_one):
    """A tiny run of `task` on `manifest` interrupted after its epoch-1 checkpoint, then resumed: the resume
    trains epoch 2 only and keeps epoch 1's record as written. Returns the resumed result."""
    import json

    import finetune

    recipe = {"task": task, "model": {"backbone": "test_resnet", "pretrained": False},
              "data": {"train": str(manifest), "image_size": 32, "num_workers": 0},
              "train": {"epochs": 2, "batch_size": 8, "hard_examples": 0}}
    train_until_epoch_one(recipe, run)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    result = finetune.train(resume=run)
    assert [r["epoch"] for r in result.metrics] == [1, 2] and result.metrics[0] == first
    return result
