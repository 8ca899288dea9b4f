"""A class-folder dataset of synthetic photo-like JPEGs, for input-pipeline benchmarks anywhere (no download).

    python scripts/jpeg_folder.py OUT [--classes 10] [--per-class 50] [--size 500x375] [--quality 90]

Each image is a smooth random colour field (bilinear upsampling of a coarse grid) plus fine noise, saved at
JPEG quality 90: it decodes at about the cost of a real photo of the same size (a pure-noise JPEG would
decode much slower, a flat one much faster). Landscape and portrait alternate, as in a photo collection.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_jpeg_folder(root: Path, classes: int = 10, per_class: int = 50, size: tuple[int, int] = (500, 375),
                      quality: int = 90, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size if i % 2 == 0 else size[::-1]
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
            pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=quality)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the landscape images")
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    write_jpeg_folder(args.out, args.classes, args.per_class, (w, h), args.quality)
    print(f"{args.classes * args.per_class} JPEGs in {args.out}")


if __name__ == "__main__":
    main()
