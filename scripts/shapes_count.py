"""A "how many shapes" regression set: small images holding 0 to 6 circles and squares, and a CSV of the count.

    python scripts/shapes_count.py OUT [--train 600] [--val 150] [--test 150] [--size 64] [--seed 0]

Writes OUT/<split>/<i>.png and OUT/<split>.csv (columns path,count; paths relative to the CSV) for
train, val and test, the data of `task: regression` (docs/tasks.md):

    finetune train quickstart task=regression data.train=OUT/train.csv data.val=OUT/val.csv

Each image has a plain background of a random colour and 0-6 shapes (uniform count), each a circle or a
square of a random colour far enough from the background to see, of random size and place, never
overlapping another, so the count is what anyone would count.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MAX_SHAPES = 6
MIN_CONTRAST = 120  # the least summed |RGB difference| between a shape and the background
PLACEMENT_TRIES = 200


def _colour(rng: np.random.Generator, away_from: tuple[int, ...] | None = None) -> tuple[int, int, int]:
    while True:
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if away_from is None or sum(abs(a - b) for a, b in zip(colour, away_from)) >= MIN_CONTRAST:
            return colour


def draw_shapes(rng: np.random.Generator, count: int, size: int) -> Image.Image:
    """One image of `count` non-overlapping circles and squares on a plain background."""
    background = _colour(rng)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float]] = []  # centre x, centre y, radius
    low, high = max(2, size // 16), max(3, size // 9)
    while len(placed) < count:
        for _ in range(PLACEMENT_TRIES):
            r = float(rng.integers(low, high + 1))
            x, y = (float(v) for v in rng.uniform(r + 1, size - r - 1, 2))
            # Squares reach sqrt(2) r from their centre: keep that much room between any two shapes.
            if all((x - px) ** 2 + (y - py) ** 2 > (1.5 * (r + pr) + 2) ** 2 for px, py, pr in placed):
                break
        else:  # crowded: start the image over
            return draw_shapes(rng, count, size)
        placed.append((x, y, r))
        box = [x - r, y - r, x + r, y + r]
        fill = _colour(rng, background)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return image


def write_split(root: Path, split: str, n: int, size: int, rng: np.random.Generator) -> Path:
    """root/<split>/<i>.png and root/<split>.csv (path,count)."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        count = int(rng.integers(0, MAX_SHAPES + 1))
        draw_shapes(rng, count, size).save(folder / f"{i}.png")
        rows.append([f"{split}/{i}.png", count])
    manifest = root / f"{split}.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "count"])
        writer.writerows(rows)
    return manifest


def write_shapes_count(root: Path, train: int = 600, val: int = 150, test: int = 150, size: int = 64,
                       seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    return {split: write_split(root, split, n, size, rng) for split, n in (("train", train), ("val", val),
                                                                          ("test", test)) if n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--val", type=int, default=150)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--size", type=int, default=64, help="pixels per side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, path in write_shapes_count(args.out, args.train, args.val, args.test, args.size, args.seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
