"""finetune/atomic.py: a file is either its old or its new self, never half written; a lock has one holder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from finetune.atomic import LockHeld, lock_holder, release_lock, replacing, take_lock, write_atomic


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    write_atomic(path, "new")
    write_atomic(tmp_path / "blob.bin", b"\x00\x01")
    assert path.read_text() == "new" and (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "curves.png"
    path.write_bytes(b"old picture")
    with pytest.raises(RuntimeError):
        with replacing(path) as tmp:
            assert tmp.parent == path.parent and tmp.suffix == ".png" and tmp != path  # savefig picks PNG by suffix
            tmp.write_bytes(b"half a pic")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old picture"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_a_lock_is_exclusive_names_its_holder_and_goes_with_its_release(tmp_path):
    path = tmp_path / ".lock"
    fd, previous = take_lock(path)
    assert previous == {}
    assert lock_holder(path)["pid"] == os.getpid()
    with pytest.raises(LockHeld) as held:
        take_lock(path)  # another open file, even in this process
    assert held.value.holder["pid"] == os.getpid() and held.value.holder["host"] == socket.gethostname()
    release_lock(path, fd)
    assert not path.exists() and lock_holder(path) is None


def test_a_lock_file_left_by_a_dead_process_locks_nothing_but_says_who_left_it(tmp_path):
    path = tmp_path / ".lock"
    code = f"from finetune.atomic import take_lock; take_lock({str(path)!r}); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)  # exits holding the lock, as a kill would leave it
    assert path.exists() and lock_holder(path) is None
    fd, previous = take_lock(path)
    assert previous["pid"] != os.getpid() and previous["host"] == socket.gethostname()
    release_lock(path, fd)


def test_a_fifo_in_the_locks_place_does_not_hang_the_look(tmp_path):
    import os

    from finetune.atomic import lock_holder

    fifo = tmp_path / ".finetune.lock"
    os.mkfifo(fifo)
    assert lock_holder(fifo) is None  # returns at once: opened without blocking, and not a regular file
