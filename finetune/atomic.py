"""Files that several programs may touch at once: written so that a reader never sees half of one (write
beside the final name, then rename), and locked so that one process at a time owns something.

A run directory is read while it is written (a person opens curves.png mid-run, `--resume` reads what a
killed run left), and a rename within one folder is atomic on POSIX. Every file finetune writes into a
run directory goes through here. The lock is an exclusive `flock` on an open lock file: the OS releases
it when the process ends, however it ends, so a lock file a kill left behind locks nothing; the holder's
host, pid and start time are written inside for the message of whoever finds it taken.

Looking whether a run holds a lock (`finetune runs`, the checks before a claim) cannot be done with flock
without locking: a look takes a *shared* lock for the microseconds of one non-blocking attempt. Looks
therefore never see each other as a holder, and a claim that meets one waits it out (CLAIM_WAIT_SECONDS)
instead of being refused: only a process that keeps the lock, a run, makes a claim fail.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Iterator

# A look at a lock holds it for microseconds; a claim retries for this long before it believes a run holds it.
CLAIM_WAIT_SECONDS = 1.0


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


def take_lock(path: str | Path, wait: float = CLAIM_WAIT_SECONDS) -> tuple[int, dict]:
    """Lock `path` (created if missing) for as long as the returned file descriptor stays open, and write
    this process into it. Returns the descriptor and what the file said before ({}: nothing, the last
    holder released it); that record names a holder that died without releasing. Raises LockHeld when the
    lock stays taken for `wait` seconds (a look at it by `lock_holder` lets go long before)."""
    import fcntl  # POSIX only; imported here so that importing finetune does not need it

    path = Path(path)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() < deadline:
                os.close(fd)
                time.sleep(0.01)
                continue
            holder = _read_record(fd)
            os.close(fd)
            raise LockHeld(holder) from None
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
    """Who holds the lock on `path` now (their record, maybe {}), or None when nobody does. The look takes
    a shared lock for an instant (flock has no test that does not lock): other looks share it, and a claim
    that meets it waits (take_lock), so looking changes nothing for anyone. A shared lock needs only a
    read-only file, which also keeps flock working where it is emulated with POSIX locks (NFS)."""
    import fcntl  # POSIX only, as in take_lock

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO in the lock's place must not hang the look
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # no run's lock: runs lock regular files
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _read_record(fd)
    finally:
        os.close(fd)  # also releases the shared lock of this look


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _read_record(fd: int) -> dict:
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return record if isinstance(record, dict) else {}
    return {}
