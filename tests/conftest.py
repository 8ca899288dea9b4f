"""Shared fixtures: tiny generated image folders, tiny recipes, and an offline, single-threaded session.

Everything here runs offline on a small CPU: timm's registered `test_*` models with pretrained=False,
and images generated into pytest's tmp_path. The plain functions behind the fixtures live in helpers.py,
where test modules import them from; the Hypothesis profiles (fast by default, full for the whole suite)
are registered here.
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

from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import Interrupted, build_tiny_recipe, write_bad_image_folder, write_image_folder  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Hypothesis: a few examples per property in the fast tier, the full count where the whole suite runs
# (`--hypothesis-profile=full`, the README's test command). A test that needs fewer examples than the others
# (each one builds a model) asks for a share of the profile's count instead of a fixed number.
settings.register_profile("fast", max_examples=50)
settings.register_profile("full", max_examples=500)
settings.load_profile("fast")


def pytest_configure(config: pytest.Config) -> None:
    # Hypothesis's plugin loads --hypothesis-profile before this file is imported only when pytest finds
    # this conftest at start-up; loading it again here makes the option win in every case.
    profile = config.getoption("--hypothesis-profile", None)
    if profile:
        settings.load_profile(profile)


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


@pytest.fixture(scope="session")
def make_bad_image_folder() -> Callable[..., dict]:
    return write_bad_image_folder


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


@pytest.fixture
def within() -> Callable[..., Any]:
    """within(seconds, fn, *fifos) -> fn()'s result, failing the test when fn has not returned after `seconds`
    (blocked opening one of the FIFOs: a writer's open and close then lets it go, so no thread is left)."""
    import threading

    def run(seconds: float, fn: Callable[[], Any], *fifos: Path) -> Any:
        result: list = []
        thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
        thread.start()
        thread.join(seconds)
        if thread.is_alive():
            for fifo in fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:  # nobody is waiting on this one
                    pass
            thread.join(seconds)
            pytest.fail(f"still running after {seconds} s (waiting on a FIFO?)")
        assert result, "it raised (see the thread's traceback above)"
        return result[0]
    return run
