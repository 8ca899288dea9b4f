"""Where finetune's caches live, what names their files, and what a cache that cannot be written there
becomes.

The folder is `data.cache_dir`, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune: never inside the
user's data. A cache file is named by `cache_key`, a hash of everything that decides what it holds, led by
the source's lasting identity (`fingerprint`): a touched image file, a changed label or setting gives a
new name, never a stale cache, and a source without one (Python objects) gets no disk cache. Every cache
file is written beside its final name and renamed into place (atomic.replacing), so one that exists is
whole, and reading it needs no write access and no lock: a complete cache on a read-only disk is used.
The decoded-image cache (decoded.py) and the feature cache (training/features.py) share these; what
their files hold and how they are read stays theirs (raw pixels mapped by loader workers, built under a
lock; one safetensors file of features).

Writing one can fail for reasons outside the recipe: a read-only folder or disk, a home without a cache
folder, a full disk or quota. `cache_unavailable` turns such an OSError into CacheUnavailable: its `note` is
the one line of a run that goes on without the cache (`data.cache: auto`, the feature cache), its message
the one paragraph of a run that asked for the cache (`data.cache: decoded`). A location that cannot be
right whatever the disk holds is a FinetuneError wherever a cache is looked for: a cache folder that is a
file, or an empty HOME without XDG_CACHE_HOME (Python would read it as "/", and put caches in /.cache).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import FinetuneError

# A full disk, or a full quota: the note then says how much the cache needs and how much is free.
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class CacheUnavailable(FinetuneError):
    """A cache that could not be written: the message for a run that asked for it, `note` (one line) for a
    run that goes on without it."""

    def __init__(self, message: str, note: str):
        super().__init__(message)
        self.note = note


def fingerprint(source: Any) -> str | None:
    """The lasting identity of a source (samples.py: its files and labels), or None for one without
    (images handed over in memory), which no disk cache can key."""
    identity = getattr(source, "fingerprint", None)
    return identity() if callable(identity) else None


def cache_key(*parts: Any) -> str:
    """The name of a cache file's contents: a hash of the JSON values that decide them (a format version,
    the source's fingerprint, the settings that shape what is stored)."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()[:32]


def cache_folder(cache_dir: str | Path | None) -> Path:
    """The folder caches go to (maybe not there yet). FinetuneError for one that can never hold them."""
    if cache_dir:
        folder, origin = Path(cache_dir), "data.cache_dir"
    elif os.environ.get("XDG_CACHE_HOME"):
        folder, origin = Path(os.environ["XDG_CACHE_HOME"]) / "finetune", "the cache folder (from XDG_CACHE_HOME)"
    else:
        if os.environ.get("HOME") == "":
            raise FinetuneError("HOME is empty and XDG_CACHE_HOME is unset, so there is no ~/.cache for finetune's "
                                "caches (Python would read an empty HOME as /). Set data.cache_dir to a folder for "
                                "them (or set XDG_CACHE_HOME or HOME), or run without caches: data.cache=none and "
                                "data.feature_cache=none.")
        try:
            folder, origin = Path.home() / ".cache" / "finetune", "the cache folder (in your home)"
        except RuntimeError:  # no HOME and no user database entry
            raise FinetuneError("no home folder for finetune's caches (HOME is unset and this user has none); set "
                                "data.cache_dir or XDG_CACHE_HOME to a folder, or data.cache=none and "
                                "data.feature_cache=none.") from None
    if folder.exists() and not folder.is_dir():
        raise FinetuneError(f"{origin} {folder} is a file, not a folder; point data.cache_dir at a folder for "
                            "finetune's caches (it is created if missing).")
    return folder


def cache_unavailable(what: str, folder: Path, error: OSError, needed: int, setting: str) -> CacheUnavailable:
    """`error`, met writing `what` ("the decoded-image cache") of about `needed` bytes into `folder`, for a
    user: why, where, and for a full disk how much it needs and how much is free. `setting` is what asked
    for the cache (data.cache=decoded), named first in the message."""
    if error.errno in DISK_FULL:
        note = (f"the disk is full at {folder}: {what} needs about {format_size(needed)}, "
                f"{format_size(free_space(folder))} are free")
        remedy = ("Free that much space there, point data.cache_dir at a disk with room for it, or set "
                  "data.cache=auto (it then goes on without the cache) or none.")
    else:
        note = f"cannot write {what} to {folder}: {error.strerror or error}"
        remedy = ("Point data.cache_dir at a folder this user can write, or set data.cache=auto (it then goes on "
                  "without the cache) or none.")
    return CacheUnavailable(f"{setting}: {note}. {remedy}", note)


def os_error(error: Exception) -> OSError:
    """An OSError with the errno of a writer that reports it only in its text (safetensors: "... (os error 28)"),
    so that a full disk reads as one."""
    code = re.search(r"os error (\d+)", str(error))
    return OSError(int(code[1]), os.strerror(int(code[1]))) if code else OSError(errno.EIO, str(error))


def free_space(folder: Path) -> int:
    """Free bytes on the disk that holds `folder`, or would hold it once created."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def format_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 999.5:  # .3g would print 999.7 as 1e+03
            return f"{size:.3g} {unit}"
        size /= 1000
    return f"{size:.3g} TB"
