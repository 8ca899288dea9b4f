"""Decoding one image file into an 8-bit RGB PIL image, whatever its mode and orientation, and refusing
one too large to decode or too elongated to resize.

Two limits, both read from the header before a pixel is decoded:
- pixels: PIL's decompression-bomb limit, twice `PIL.Image.MAX_IMAGE_PIXELS` (ImageTooLarge).
- shape: the long side at most MAX_ASPECT_RATIO (32) times the short side (ImageTooElongated). The eval
  transform scales the short side *up* to the model's size, so a 157-byte 1 x 20,000 PNG would become a
  256 x 5,120,000 image (3.9 GB) at 224 px. Within the limit, the resized image holds at most 32 x side²
  pixels: 6.3 MB at 224 px, 100 MB at 1024 px. Photos are 1:1 to 16:9, phone panoramas about 1:4 to 1:10,
  web banners up to about 1:16; all of them pass.
Images already in memory (arrays, tensors, PIL images of a Python dataset) are held to the same shape limit
by samples.as_pil before any transform sees them.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..recipe.userfiles import open_regular

MAX_ASPECT_RATIO = 32  # long side / short side; see the module docstring
# Extensions PIL decodes; anything else inside a class folder (notes, .DS_Store) is ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageTooLarge(ValueError):
    """More pixels than PIL decodes: over twice `PIL.Image.MAX_IMAGE_PIXELS` (about 179 million by default;
    PIL warns above once), a decompression bomb or a scan far beyond any training size. A ValueError, so
    training skips it as a bad image (badimages.py) and its message is the reason recorded."""


class ImageTooElongated(ImageTooLarge):
    """Long side over MAX_ASPECT_RATIO times the short side: resized for the model (the short side scaled to
    its input size) it would hold far more pixels than any photo. Skipped in training like any bad image."""


def refuse_elongated(width: int, height: int) -> None:
    """Raises ImageTooElongated for a width x height image over MAX_ASPECT_RATIO, reason included."""
    long, short = max(width, height), min(width, height)
    if long > MAX_ASPECT_RATIO * short:
        ratio = long / short if short else float("inf")
        shown = f"{ratio:,.0f}" if ratio >= 100 else f"{ratio:.1f}"
        raise ImageTooElongated(f"image too elongated ({width}x{height} pixels: aspect ratio {shown}:1 > "
                                f"{MAX_ASPECT_RATIO}:1)")


def image_too_large(error: Image.DecompressionBombError) -> ImageTooLarge:
    """PIL's refusal, as the reason a user reads: "image too large (N pixels > LIMIT)"."""
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(error))
    return ImageTooLarge(f"image too large ({found[1]} pixels > {found[2]})" if found else f"image too large ({error})")


def open_image(path: str | Path | BinaryIO) -> Image.Image:
    """An image file (a regular file only: recipe/userfiles.py) or an open binary stream, as 8-bit RGB."""
    try:
        with (open_regular(path) if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path)) as f, \
                Image.open(f) as img:  # PIL checks the size in the header, before decoding a pixel
            refuse_elongated(*img.size)  # so do we: nothing is decoded yet
            img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF, not in the pixels
            return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise image_too_large(e) from None
    except UnidentifiedImageError:
        if not isinstance(path, (str, os.PathLike)):
            raise
        # Worded as PIL words it for a path it opens itself (it was handed the open file).
        raise UnidentifiedImageError(f"cannot identify image file {os.fspath(path)!r}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. Transparency is composited on white; 16-bit and float images are rescaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        if img.mode == "F" and array.max() <= 1.0:
            top = 1.0
        return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
