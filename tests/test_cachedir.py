"""finetune/data/cachedir.py: where the caches live, and what a run does when that place cannot take them
(read-only, not a folder, no home, a full disk): a complete cache is still read, `auto` goes on without a
cache and says why, an explicit `data.cache: decoded` is one paragraph naming the folder, and nothing half
written is left for a later run to trust.

Root ignores file modes, so read-only places are simulated honestly in three ways: a path under a regular
file (mkdir fails with NotADirectoryError, as it would for any user), every Python-level write under a folder
refused with EROFS (`read_only` below), and, where the system allows it, a real read-only bind mount in a
user namespace (the slow end-to-end test).
"""

from __future__ import annotations

import builtins
import errno
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors import SafetensorError

import finetune
from finetune import FinetuneError
from finetune.data import decoded
from finetune.data.cachedir import format_size
from finetune.data.decoded import auto_cache_fits, build_decoded
from finetune.data.sources import load_source
from finetune.training import features

DECODED = {"train.epochs": 1, "train.hard_examples": 0}
PROBE = {"train.epochs": 1, "freeze.backbone": True, "freeze.bn": "frozen", "train.hard_examples": 0}


def read_only(monkeypatch, folder: Path) -> None:
    """Every way Python writes under `folder` (open for writing, os.open with a write flag, mkdir, rename,
    unlink) fails with EROFS from now on, as on a read-only mount; reading still works."""
    folder = os.path.realpath(folder)

    def inside(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(folder)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def open_(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & writes:
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path):
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def two_paths(real):
        def call(src, dst, *args, **kwargs):
            if inside(src) or inside(dst):
                refuse(dst)
            return real(src, dst, *args, **kwargs)
        return call

    def one_path(real):
        def call(path, *args, **kwargs):
            if inside(path):
                refuse(path)
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "replace", two_paths(os.replace))
    monkeypatch.setattr(os, "rename", two_paths(os.rename))
    monkeypatch.setattr(os, "unlink", one_path(os.unlink))
    monkeypatch.setattr(os, "remove", one_path(os.remove))


class FullDisk:
    """A file opened for writing on a disk with `room` bytes left: the write that passes it raises ENOSPC."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def fill_disk_after(monkeypatch, room: int) -> None:
    """The decoded-image cache's data file is written to a disk that fills after `room` bytes."""
    monkeypatch.setattr(decoded, "open", lambda *a, **k: FullDisk(builtins.open(*a, **k), room), raising=False)


def input_line(capsys) -> str:
    out = capsys.readouterr().out
    return next(line.strip() for line in out.splitlines() if line.strip().startswith("input:"))


def data_config() -> dict:
    from test_decoded import data_config

    return data_config(size=32)


def test_a_complete_decoded_cache_in_a_read_only_folder_is_read_without_writing(tmp_path, image_folder,
                                                                                 monkeypatch):
    source = load_source(str(image_folder()))
    built = build_decoded(source, data_config(), tmp_path / "cache", 0, log=lambda _: None)
    before = sorted(p.name for p in (tmp_path / "cache").iterdir())
    read_only(monkeypatch, tmp_path / "cache")
    lines = []
    again = build_decoded(load_source(str(tmp_path / "data")), data_config(), tmp_path / "cache", 0, log=lines.append)
    assert lines == [f"decoded images: 24 from {again.path}"]
    assert all(np.array_equal(again[i][0].numpy(), built[i][0].numpy()) for i in range(len(source)))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == before


def test_an_explicit_decoded_cache_that_cannot_be_written_is_one_paragraph(tmp_path, image_folder, tiny_recipe):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "readonly").mkdir()
    data = image_folder()
    for folder, reason in ((tmp_path / "file" / "cache", "Not a directory"),
                           (tmp_path / "readonly", "Read-only file system")):
        recipe = tiny_recipe(data, **DECODED, **{"data.cache": "decoded", "data.cache_dir": str(folder)})
        with pytest.MonkeyPatch.context() as patch:
            read_only(patch, tmp_path / "readonly")
            with pytest.raises(FinetuneError) as info:
                finetune.train(recipe, output=tmp_path / "run")
        message = str(info.value)
        assert message.startswith(f"data.cache=decoded: cannot write the decoded-image cache to {folder}: {reason}. ")
        assert "\n" not in message and "data.cache_dir" in message and "data.cache=auto" in message
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["cache_dir", "home"])
def test_auto_goes_on_without_the_cache_and_says_why(tmp_path, image_folder, tiny_recipe, monkeypatch, capsys, where):
    (tmp_path / "file").write_text("not a folder")
    settings = {**DECODED}
    if where == "cache_dir":
        settings["data.cache_dir"] = str(tmp_path / "file" / "cache")
    else:  # a home without a writable ~/.cache, and no XDG_CACHE_HOME
        monkeypatch.setenv("HOME", str(tmp_path / "file"))
        monkeypatch.delenv("XDG_CACHE_HOME")
    result = finetune.train(tiny_recipe(image_folder(), **settings), output=tmp_path / "run")
    assert result.metrics
    line = input_line(capsys)
    folder = tmp_path / "file" / (".cache/finetune" if where == "home" else "cache")
    assert line == ("input: PIL decoding in loader workers (data.cache=auto: cannot write the decoded-image cache to "
                    f"{folder}: Not a directory)")


def test_a_cache_dir_that_is_a_file_or_an_empty_home_is_an_error(tmp_path, image_folder, tiny_recipe, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    recipe = tiny_recipe(image_folder(), **DECODED, **{"data.cache_dir": str(tmp_path / "file")})
    with pytest.raises(FinetuneError, match=r"data.cache_dir .*file is a file, not a folder") as info:
        finetune.train(recipe, output=tmp_path / "run")
    assert "\n" not in str(info.value)
    monkeypatch.setenv("HOME", "")
    monkeypatch.delenv("XDG_CACHE_HOME")
    with pytest.raises(FinetuneError, match="HOME is empty") as info:
        auto_cache_fits(1, None)  # as `data.cache: auto` asks where the cache would go
    assert "XDG_CACHE_HOME" in str(info.value) and "data.cache_dir" in str(info.value)


@pytest.mark.parametrize("cache", ["decoded", "auto"])
def test_a_full_disk_while_building_leaves_nothing_half_written(tmp_path, image_folder, tiny_recipe, monkeypatch,
                                                                capsys, cache):
    recipe = tiny_recipe(image_folder(), **DECODED, **{"data.cache": cache, "data.cache_dir": str(tmp_path / "cache")})
    fill_disk_after(monkeypatch, 10_000)  # a few of the 24 images
    if cache == "decoded":
        with pytest.raises(FinetuneError) as info:
            finetune.train(recipe, output=tmp_path / "run")
        said = str(info.value)
        assert "\n" not in said and said.endswith("or set data.cache=auto (it then goes on without the cache) or none.")
    else:
        finetune.train(recipe, output=tmp_path / "run")
        said = input_line(capsys)
    assert not [p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"]  # no data, index or temporary
    monkeypatch.undo()
    finetune.train(recipe, output=tmp_path / "again", overwrite=True)
    assert "input: decoded-image cache" in input_line(capsys)
    [data] = (tmp_path / "cache").glob("*.u8")
    start = "data.cache=decoded: " if cache == "decoded" else "input: PIL decoding in loader workers (data.cache=auto: "
    assert re.match(f"{re.escape(start)}the disk is full at {re.escape(str(tmp_path / 'cache'))}: the decoded-image "
                    f"cache needs about {format_size(data.stat().st_size)}, " + r"[\d.]+ [kMGT]?B are free", said), said


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device "
                                                   "(os error 28)")])
def test_features_that_cannot_be_saved_are_kept_in_memory(tmp_path, image_folder, tiny_recipe, monkeypatch, capsys,
                                                          error):
    def full(*args, **kwargs):
        raise error
    monkeypatch.setattr(features, "save_file", full)
    recipe = tiny_recipe(image_folder(), **PROBE, **{"data.cache_dir": str(tmp_path / "cache")})
    result = finetune.train(recipe, output=tmp_path / "run")
    assert [r["features_cached"] for r in result.metrics] == [True]
    out = capsys.readouterr().out
    assert f"features: not cached: the disk is full at {tmp_path / 'cache'}: the feature cache needs about" in out
    assert "kept in memory for this run, computed again by the next one" in out
    assert not list((tmp_path / "cache").glob("features-*"))


def test_features_in_a_place_that_cannot_be_written_are_kept_in_memory(tmp_path, image_folder, tiny_recipe, capsys):
    (tmp_path / "file").write_text("not a folder")
    recipe = tiny_recipe(image_folder(), **PROBE, **{"data.cache_dir": str(tmp_path / "file" / "cache")})
    result = finetune.train(recipe, output=tmp_path / "run")
    assert [r["features_cached"] for r in result.metrics] == [True]
    assert (f"features: not cached: cannot write the feature cache to {tmp_path / 'file' / 'cache'}: Not a directory;"
            in capsys.readouterr().out)


def test_a_damaged_feature_cache_is_computed_again_with_a_note(tmp_path, image_folder, tiny_recipe, capsys):
    recipe = tiny_recipe(image_folder(), **PROBE, **{"data.cache_dir": str(tmp_path / "cache")})
    finetune.train(recipe, output=tmp_path / "first")
    files = sorted((tmp_path / "cache").glob("features-*.safetensors"))
    for file in files:
        file.write_bytes(file.read_bytes()[:100])  # a copy cut short
    capsys.readouterr()
    result = finetune.train(recipe, output=tmp_path / "second")
    assert [r["features_cached"] for r in result.metrics] == [True]
    out = capsys.readouterr().out
    assert out.count("; computing them in memory instead. Delete the file to cache them again.") == len(files) == 2


def test_the_lock_code_imports_without_fcntl():
    """`import fcntl` at the top of a module fails on Windows; filelock picks the platform's lock."""
    atomic = Path(finetune.__file__).parent / "atomic.py"
    code = ("import importlib.util, sys; sys.modules['fcntl'] = None\n"
            f"spec = importlib.util.spec_from_file_location('atomic', {str(atomic)!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert importlib.util.find_spec("filelock") is not None


@pytest.mark.slow
def test_two_processes_fall_back_together_or_stop_together(tmp_path, image_folder, tiny_recipe):
    """`--processes 2`: the builder and the waiting process reach the same decision, and neither hangs."""
    (tmp_path / "file").write_text("not a folder")
    results = {}
    for cache in ("auto", "decoded"):
        recipe = tiny_recipe(image_folder(), **DECODED, **{"data.cache": cache, "data.num_workers": 1,
                                                           "data.cache_dir": str(tmp_path / "file" / "cache")})
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        results[cache] = subprocess.run([sys.executable, "-m", "finetune", "train", str(tmp_path / "r.yaml"),
                                         "--output", str(tmp_path / f"run-{cache}"), "--processes", "2"],
                                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert results["auto"].returncode == 0, results["auto"].stderr[-3000:]
    assert "(data.cache=auto: cannot write the decoded-image cache to" in results["auto"].stdout
    # Both processes stop with the one paragraph (torchrun then adds its own ChildFailedError report).
    failed = results["decoded"]
    assert failed.returncode != 0 and "NotADirectoryError" not in failed.stderr
    assert "finetune: error: data.cache=decoded: cannot write the decoded-image cache to" in failed.stderr  # builder
    assert "is missing or incomplete after its build: its builder could not write it (and says why)" in failed.stderr


def _can_mount_read_only(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    (tmp_path / "probe").mkdir()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {tmp_path / 'probe'} "
                           f"{tmp_path / 'probe'} && ! touch {tmp_path / 'probe' / 'x'} 2>/dev/null"],
                          capture_output=True, timeout=30)
    return proc.returncode == 0


@pytest.mark.slow
def test_a_real_read_only_mount(tmp_path, image_folder, tiny_recipe):
    """`finetune train` in a user namespace where the cache folder is a read-only bind mount: a complete
    cache trains, an empty one with data.cache=decoded is one line on stderr, with auto a note."""
    if not _can_mount_read_only(tmp_path):
        pytest.skip("no user namespaces with bind mounts here")
    cache = tmp_path / "cache"
    recipe = tiny_recipe(image_folder(), **DECODED, **{"data.cache": "decoded", "data.cache_dir": str(cache)})
    finetune.train(recipe, output=tmp_path / "first")  # fills the cache
    (tmp_path / "empty").mkdir()

    def train_read_only(folder: Path, **changes) -> subprocess.CompletedProcess:
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "data": {**recipe["data"], **changes}}))
        run = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        command = (f"mount --bind -o ro {folder} {folder} && exec {sys.executable} -m finetune train "
                   f"{tmp_path / 'recipe.yaml'} --output {run}")
        return subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path)

    complete = train_read_only(cache)
    assert complete.returncode == 0, complete.stderr[-3000:]
    assert "decoded images: 24 from" in complete.stdout
    empty = train_read_only(tmp_path / "empty", cache_dir=str(tmp_path / "empty"))
    assert empty.returncode == 2 and "Traceback" not in empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1 and "Read-only file system" in empty.stderr
    auto = train_read_only(tmp_path / "empty", cache_dir=str(tmp_path / "empty"), cache="auto")
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "data.cache=auto: cannot write the decoded-image cache to" in auto.stdout
