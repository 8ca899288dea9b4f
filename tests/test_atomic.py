"""finetune/atomic.py: a file is either its old or its new self, never half written."""

from __future__ import annotations

import pytest

from finetune.atomic import replacing, write_atomic


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
