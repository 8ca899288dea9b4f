"""Shared fixtures: tiny generated image folders, tiny recipes, and an offline, single-threaded session.

Everything here runs offline on a small CPU: timm's registered `test_*` models with pretrained=False,
and images generated into pytest's tmp_path.
"""

from __future__ import annotations

import os

# Set before torch, timm or huggingface_hub are imported (they read these once, at import), and inherited
# by every `python -m finetune` subprocess the tests start.
os.environ["TQDM_DISABLE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Tiny models on a shared 2-core machine: intra-op threads only add spin-wait overhead (up to 100x slower
# when another process holds the other core).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Caches (features of frozen backbones) go to a folder of this session, never the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = __import__("tempfile").mkdtemp(prefix="finetune-test-cache-")

import copy  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="session")
def make_image_folder() -> Callable[..., Path]:
    """The folder writer itself, for module- or session-scoped fixtures that have their own tmp dirs."""
    return write_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: image_folder(classes=3, per_class=8, size=32, name="data") -> an ImageFolder in tmp_path."""
    def make(classes: int | list[str] = 3, per_class: int = 8, size: int = 32, name: str = "data",
             seed: int = 0) -> Path:
        return write_image_folder(tmp_path / name, classes, per_class, size, seed)
    return make


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


@pytest.fixture(scope="session")
def make_recipe() -> Callable[..., dict]:
    """The recipe builder itself, for module-scoped fixtures."""
    return build_tiny_recipe


@pytest.fixture
def tiny_recipe(image_folder) -> Callable[..., dict]:
    """Factory: tiny_recipe(train=None, **{"train.epochs": 1}) -> a recipe dict (a fresh folder if no train)."""
    def make(train: str | Path | None = None, **overrides: Any) -> dict:
        return build_tiny_recipe(train if train is not None else image_folder(), **overrides)
    return make


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


@pytest.fixture(scope="session")
def make_bad_image_folder() -> Callable[..., dict]:
    return write_bad_image_folder


class Interrupted(Exception):
    """Stands for a kill right after a checkpoint was written."""


@pytest.fixture
def train_until_epoch_one() -> Callable[..., None]:
    """Trains `recipe` into `output` as finetune.train does, interrupted right after the epoch-1 checkpoint
    through the loop's `after_checkpoint` seam."""
    from finetune import api
    from finetune.data.splits import build_splits
    from finetune.tasks import build_task
    from finetune.training import loop

    def run(recipe: dict, output: Path) -> None:
        def stop_after_epoch_one(epoch: int) -> None:
            if epoch == 1:
                raise Interrupted

        config, run_dir = api.resolve_run(recipe, output=output)
        with pytest.raises(Interrupted):
            loop.train(config, run_dir, build_splits(config.data, config.train.seed, task=build_task(config)),
                       after_checkpoint=stop_after_epoch_one)

    return run
