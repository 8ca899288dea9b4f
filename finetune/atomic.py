"""Writing a file so that a reader never sees half of it: write beside the final name, then rename.

A run directory is read while it is written (a person opens curves.png mid-run, `--resume` reads what a
killed run left), and a rename within one folder is atomic on POSIX. Every file finetune writes into a
run directory goes through here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


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
