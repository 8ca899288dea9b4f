"""Hugging Face hub datasets (`hf:ORG/NAME`): whether `datasets` holds a copy it can load offline, whether
the hub can be reached at all, and what to say when neither.

Asked when a source is opened (sources.py), before anything is downloaded: `datasets` alone retries a dead
network for about half a minute before it fails, and then says nothing about a copy it could have used.
The copy `load_dataset` falls back on offline is the prepared one in `datasets`' own cache
(HF_DATASETS_CACHE), not the files in huggingface_hub's download cache (HF_HUB_CACHE), so huggingface_hub's
cache API (`scan_cache_dir`, `try_to_load_from_cache`) cannot answer this; the look below is the one
`datasets.load.CachedDatasetModuleFactory` makes, with `datasets`' own name conversion.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
from pathlib import Path

DNS_SECONDS = 3.0  # how long the hub's host may take to resolve before the hub counts as unreachable


def hf_hub_cached(name: str) -> bool:
    """Whether `datasets` holds a prepared copy of hub dataset `name` (what load_dataset reads offline)."""
    import datasets  # here: checking a folder source should not pay for importing datasets
    from datasets.naming import camelcase_to_snakecase

    namespace, _, dataset = name.rpartition("/")
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(
        p for p in (namespace, camelcase_to_snakecase(dataset)) if p)
    return any(p.is_dir() for p in folder.glob("*/*/*"))  # CONFIG/VERSION/HASH, as datasets lays it out


def hf_hub_offline() -> bool:
    """True when the hub is off limits: offline mode is set, or its host does not resolve within
    DNS_SECONDS."""
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
    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout=DNS_SECONDS)
    return answer != [True]


def hf_offline_message(name: str) -> str:
    import datasets

    return (f"hf:{name} is a Hugging Face hub dataset, but the hub cannot be reached (no network, or "
            f"HF_HUB_OFFLINE is set) and no copy is cached in {datasets.config.HF_DATASETS_CACHE}. Run once with "
            f"internet (python -c \"import datasets; datasets.load_dataset('{name}')\") to cache it, or on a "
            f"machine that has it run dataset.save_to_disk(DIR), copy DIR here and give hf:DIR. If {name!r} "
            "was meant to be a local folder: it does not exist.")
