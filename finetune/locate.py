"""Where a named dataset's files live, and whether they are there: cheap looks, no loading.

The recipe check (config.py) asks before anything loads, so that a missing dataset is reported with the
other recipe problems; the source readers (sources.py) ask again when they open it. Both get the same
answers and the same messages from here.
"""

from __future__ import annotations

import re
import socket
import threading
import urllib.parse
from pathlib import Path

# ----------------------------------------------------------------------------------------------------
# hf: a folder written by save_to_disk, a folder of parquet files, or a hub dataset id


def hf_local_kind(path: Path) -> str | None:
    """"dict"/"dataset" for save_to_disk output, "parquet" for parquet files, None when it is neither."""
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    if (path.is_file() and path.suffix == ".parquet") or (path.is_dir() and next(path.rglob("*.parquet"), None)):
        return "parquet"
    return None


def hf_hub_cached(name: str) -> bool:
    """Whether `datasets` holds a prepared copy of hub dataset `name` (what load_dataset reads offline)."""
    import datasets  # here: checking a folder recipe should not pay for importing datasets

    namespace, _, dataset = name.rpartition("/")
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", dataset).lower()  # datasets' camelcase_to_snakecase
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(p for p in (namespace, snake) if p)
    return any(p.is_dir() for p in folder.glob("*/*/*"))


def hf_hub_offline() -> bool:
    """True when the hub is off limits: offline mode is set, or its host does not resolve within 3 s.
    Without this look, `datasets` retries a dead network for about half a minute before failing."""
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        return True
    host = urllib.parse.urlparse(datasets.config.HF_ENDPOINT).hostname or "huggingface.co"
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.getaddrinfo(host, 443)
            answer.append(True)
        except OSError:
            answer.append(False)
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout=3.0)
    return answer != [True]


def hf_offline_message(name: str) -> str:
    import datasets

    return (f"hf:{name} is a Hugging Face hub dataset, but the hub cannot be reached (no network, or "
            f"HF_HUB_OFFLINE is set) and no copy is cached in {datasets.config.HF_DATASETS_CACHE}. Run once with "
            f"internet (python -c \"import datasets; datasets.load_dataset('{name}')\") to cache it, or on a "
            f"machine that has it run dataset.save_to_disk(DIR), copy DIR here and give hf:DIR. If {name!r} "
            "was meant to be a local folder: it does not exist.")


# ----------------------------------------------------------------------------------------------------
# torchvision:NAME under data.root


def torchvision_expected_files(name: str, root: str | Path) -> tuple[Path, list[str], str]:
    """(folder, file names, where to get them) that torchvision's NAME(root, download=False) reads,
    taken from the dataset class itself so that it follows torchvision."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, name)
    if hasattr(cls, "resources"):  # the MNIST family: idx files, gunzipped, in ROOT/NAME/raw
        files = [Path(url).name.removesuffix(".gz") for url, _ in cls.resources]
        return Path(root) / name / "raw", files, f"{cls.mirrors[0]}<file>.gz, then gunzip"
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]  # the CIFAR family
    return Path(root) / cls.base_folder, files, f"{cls.url}, unpacked into data.root"


def torchvision_missing_message(name: str, folder: Path, missing: list[str], origin: str) -> str:
    return (f"torchvision:{name} is not in data.root: {folder.resolve()} lacks {', '.join(missing)}. Set "
            f"data.download=true (needs internet; the files land in data.root), or copy those files into "
            f"{folder.resolve()} (from {origin}), or point data.root at the folder that holds them.")
