"""Files that several programs may touch at once: written so that a reader never sees half of one (write
beside the final name, then rename), and locked so that one process at a time owns something.

A run directory is read while it is written (a person opens curves.png mid-run, `--resume` reads what a
killed run left), and a rename within one folder is atomic on POSIX. Every file finetune writes into a
run directory goes through here. The lock is an exclusive lock on an open lock file, taken with filelock's
`lock_descriptor` (flock on POSIX, LockFileEx on Windows, the same lock filelock.FileLock takes): the OS
releases it when the process ends, however it ends, so a lock file a kill left behind locks nothing; the
holder's host, pid and start time are written inside for the message of whoever finds it taken.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from filelock import lock_descriptor


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` for a library to write (savefig, save_file); renames it to
    `path` when the block succeeds, removes it when the block raises. The temporary name keeps the
    suffix, so libraries that pick a format by suffix still do."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write text or bytes to `path` atomically."""
    with replacing(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


class LockHeld(Exception):
    """Another open file holds the lock; `holder` is what it wrote inside (host, pid, started), maybe {}."""

    def __init__(self, holder: dict):
        super().__init__(f"locked by {holder}")
        self.holder = holder


def take_lock(path: str | Path) -> tuple[int, dict]:
    """Lock `path` (created if missing) for as long as the returned file descriptor stays open, and write
    this process into it. Returns the descriptor and what the file said before ({}: nothing, the last
    holder released it); that record names a holder that died without releasing. Raises LockHeld."""
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not lock_descriptor(fd, blocking=False):
            holder = _read_record(fd)
            os.close(fd)
            raise LockHeld(holder)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # the holder released and removed the file between our open and our lock: take the new one
    previous = _read_record(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(this_process()).encode(), 0)
    return fd, previous


def release_lock(path: str | Path, fd: int) -> None:
    """Remove the lock file while still holding it (so nobody takes a file about to vanish), then close."""
    try:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
    finally:
        os.close(fd)


def lock_holder(path: str | Path) -> dict | None:
    """Who holds the lock on `path` now (their record, maybe {}), or None when nobody does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return None if lock_descriptor(fd, blocking=False) else _read_record(fd)
    finally:
        os.close(fd)  # also releases the lock this check took


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _read_record(fd: int) -> dict:
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return record if isinstance(record, dict) else {}
    return {}
