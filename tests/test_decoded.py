"""finetune/data/decoded.py: images decoded once into a keyed, memory-mapped cache that is never stale."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from helpers import add_bad_files, data_config, write_jpegs
from PIL import Image

from finetune.data import cachedir, decoded, samples
from finetune.data.badimages import BAD_IMAGE_ERRORS, describe_error
from finetune.data.decoded import (
    DecodedImages,
    auto_cache_fits,
    build_decoded,
    cache_key,
    estimate_decoded_bytes,
    stored_side,
    why_not_cached,
)
from finetune.data.images import open_image
from finetune.data.samples import IndexedSamples
from finetune.data.sources import load_source
from finetune.errors import FinetuneError


def count_decodes(monkeypatch) -> list:
    calls = []

    def counting(path):
        calls.append(path)
        return open_image(path)
    monkeypatch.setattr(samples, "open_image", counting)
    return calls


def expected_pixels(path: Path, cfg: dict) -> np.ndarray:
    """What timm's eval transform holds after its first step, straight from the file."""
    return np.asarray(timm.data.create_transform(**cfg, is_training=False).transforms[0](open_image(path)))


@pytest.mark.parametrize("crop_pct,interpolation", [(0.875, "bilinear"), (1.0, "bicubic")])
def test_stored_images_are_the_eval_transforms_resize(tmp_path, crop_pct, interpolation):
    source = load_source(str(write_jpegs(tmp_path / "data", classes=1)))
    cfg = data_config(crop_pct=crop_pct, interpolation=interpolation)
    images = build_decoded(source, cfg, tmp_path / "cache", num_workers=2, log=lambda _: None)
    assert isinstance(images, DecodedImages) and len(images) == len(source) and images.targets == source.targets
    for i in range(len(images)):
        pixels, label = images[i]
        assert pixels.dtype == torch.uint8 and min(pixels.shape[:2]) == stored_side(cfg) == int(224 / crop_pct)
        assert np.array_equal(pixels.numpy(), expected_pixels(Path(source.name(i)), cfg)) and label == 0


def test_an_unchanged_source_is_read_back_without_decoding(tmp_path, monkeypatch):
    source = load_source(str(write_jpegs(tmp_path / "data")))
    first = build_decoded(source, data_config(), tmp_path / "cache", 0, log=lambda _: None)
    calls = count_decodes(monkeypatch)
    again = build_decoded(load_source(str(tmp_path / "data")), data_config(), tmp_path / "cache", 0,
                          log=lambda _: None)
    assert calls == [] and again.path == first.path
    assert all(torch.equal(again[i][0], first[i][0]) for i in range(len(first)))


def test_a_touched_file_gets_a_new_key_and_is_decoded_again(tmp_path, monkeypatch):
    root = write_jpegs(tmp_path / "data")
    build_decoded(load_source(str(root)), data_config(), tmp_path / "cache", 0, log=lambda _: None)
    before = cache_key(load_source(str(root)), data_config())
    replaced = root / "c1" / "2.jpg"
    Image.fromarray(np.full((60, 80, 3), 7, np.uint8)).save(replaced, quality=90)  # another image, same name
    stat = replaced.stat()
    os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # even within the clock's resolution
    after = load_source(str(root))
    assert cache_key(after, data_config()) != before
    calls = count_decodes(monkeypatch)
    images = build_decoded(after, data_config(), tmp_path / "cache", 0, log=lambda _: None)
    assert len(calls) == len(after)
    new = images[after.items.index(str(replaced))][0]
    assert new.shape[:2] == (256, 341) and np.array_equal(new.numpy(), expected_pixels(replaced, data_config()))
    assert len(list((tmp_path / "cache").glob("decoded-*.json"))) == 2


def test_a_killed_builds_temporary_is_removed_by_the_next_build(tmp_path):
    source = load_source(str(write_jpegs(tmp_path / "data")))
    left = tmp_path / "cache" / f".decoded-{cache_key(source, data_config())}.tmp999999.u8"  # atomic.replacing's
    left.parent.mkdir()
    left.write_bytes(b"half a cache")
    build_decoded(source, data_config(), tmp_path / "cache", 0, log=lambda _: None)
    assert not left.exists() and sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".lock", ".u8"]


def test_both_caches_are_named_by_one_key_function_and_old_names_stay(tmp_path):
    """The decoded-image cache and the feature cache name their files by one key function: a cache made by
    an earlier finetune keeps its name (the parts hashed as JSON, dict keys sorted)."""
    import hashlib
    import json

    import PIL

    source = load_source(str(write_jpegs(tmp_path / "data")))
    cfg = data_config()
    parts = [decoded.VERSION, source.fingerprint(), stored_side(cfg), str(cfg["interpolation"]), PIL.__version__]
    assert cache_key(source, cfg) == hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]
    assert cachedir.cache_key(1, {"b": 2, "a": 1}) == cachedir.cache_key(1, {"a": 1, "b": 2})
    assert cachedir.fingerprint(source) == source.fingerprint() and cachedir.fingerprint([1, 2]) is None


def test_labels_and_preprocessing_are_part_of_the_key(tmp_path):
    source = load_source(str(write_jpegs(tmp_path / "data")))
    keys = {cache_key(source, data_config()), cache_key(source, data_config(interpolation="bicubic")),
            cache_key(source, data_config(crop_pct=1.0))}
    relabelled = load_source(str(tmp_path / "data"))
    relabelled.targets = relabelled.targets[::-1]
    keys.add(cache_key(relabelled, data_config()))
    assert len(keys) == 4
    assert cache_key(source, data_config(mean=(0.5, 0.5, 0.5))) == cache_key(source, data_config())


def test_a_cache_whose_data_file_is_cut_short_is_rebuilt(tmp_path, monkeypatch):
    source = load_source(str(write_jpegs(tmp_path / "data")))
    images = build_decoded(source, data_config(), tmp_path / "cache", 0, log=lambda _: None)
    with open(images.path, "r+b") as f:
        f.truncate(images.path.stat().st_size - 10)
    calls = count_decodes(monkeypatch)
    images = build_decoded(source, data_config(), tmp_path / "cache", 0, log=lambda _: None)
    assert len(calls) == len(source)
    assert np.array_equal(images[len(source) - 1][0].numpy(), expected_pixels(Path(source.items[-1]), data_config()))


def _build_in_child(root: str, cache: str, log_file: str, start) -> None:
    def slow_open(path):  # keeps both builds running at the same time
        import time
        time.sleep(0.05)
        return open_image(path)
    samples.open_image = slow_open
    start.wait()
    with open(log_file, "w") as log:
        images = build_decoded(load_source(root), data_config(), cache, 0, log=lambda line: print(line, file=log))
        assert len(images) == 12 and images[11][0].shape[2] == 3


def test_two_processes_building_one_key_both_succeed(tmp_path):
    root = write_jpegs(tmp_path / "data", classes=4)
    context = multiprocessing.get_context("fork")
    start = context.Event()
    logs = [tmp_path / f"log{k}" for k in range(2)]
    children = [context.Process(target=_build_in_child, args=(str(root), str(tmp_path / "cache"), str(log), start))
                for log in logs]
    for child in children:
        child.start()
    start.set()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0]
    builds = sum("decoding" in log.read_text() for log in logs)
    assert builds == 1  # the second waited for the lock, then read the first one's cache
    source = load_source(str(root))
    images = build_decoded(source, data_config(), tmp_path / "cache", 0, build=False)
    for i in range(len(source)):
        assert np.array_equal(images[i][0].numpy(), expected_pixels(Path(source.items[i]), data_config()))
    left = sorted(p.suffix for p in (tmp_path / "cache").iterdir())  # and no temporaries
    assert left == [".json", ".lock", ".u8"]


def test_bad_files_are_recorded_and_raise_their_original_error(tmp_path):
    root = write_jpegs(tmp_path / "data")
    bad = add_bad_files(root)
    source = load_source(str(root))
    images = build_decoded(source, data_config(), tmp_path / "cache", 0, log=lambda _: None)
    assert {source.items[i] for i in images.bad} == {str(p) for p in bad.values()}
    for path in bad.values():
        with pytest.raises(BAD_IMAGE_ERRORS) as cached:
            images[source.items.index(str(path))]
        with pytest.raises(BAD_IMAGE_ERRORS) as direct:
            open_image(path)
        assert describe_error(cached.value) == describe_error(direct.value)
        assert images.name(source.items.index(str(path))) == str(path)
    # A worker process gets its own map of the file and the same answers.
    images[0]
    copy = pickle.loads(pickle.dumps(images))
    assert copy._pixels is None and torch.equal(copy[0][0], images[0][0]) and copy.bad == images.bad


def test_an_error_type_that_cannot_be_rebuilt_still_reads_as_a_bad_image():
    error = decoded._original_error("no.such.module.WeirdError", "broken")
    assert isinstance(error, BAD_IMAGE_ERRORS) and describe_error(error) == "OSError: WeirdError: broken"
    assert type(decoded._original_error("builtins.KeyboardInterrupt", "x")) is OSError  # never re-raises others


def test_a_non_builder_waits_then_reads_and_a_missing_cache_is_an_error(tmp_path):
    source = load_source(str(write_jpegs(tmp_path / "data")))
    events = []
    with pytest.raises(FinetuneError, match="data.cache_dir"):
        build_decoded(source, data_config(), tmp_path / "cache", 0, build=False, wait=lambda: events.append("wait"))
    assert events == ["wait"]
    build_decoded(source, data_config(), tmp_path / "cache", 0, wait=lambda: events.append("built"),
                  log=lambda line: events.append("log"))
    assert events[-1] == "built" and "log" in events
    assert len(build_decoded(source, data_config(), tmp_path / "cache", 0, build=False)) == len(source)


def test_sources_without_an_identity_or_transforms_it_cannot_reproduce_get_no_cache(tmp_path):
    pil = [Image.new("RGB", (40, 30))] * 2
    in_memory = IndexedSamples([(im, 0) for im in pil], [0, 0], ["a"], "python")
    assert build_decoded(in_memory, data_config(), tmp_path / "cache", 0) is None
    assert why_not_cached(data_config()) is None
    files = load_source(str(write_jpegs(tmp_path / "data")))
    for cfg in (data_config(crop_mode="squash"), data_config(crop_pct=1.15), data_config(crop_border_pixels=2),
                {**data_config(), "input_size": (3, 224, 160)}):
        assert why_not_cached(cfg)
        with pytest.raises(ValueError):
            build_decoded(files, cfg, tmp_path / "cache", 0)


def test_the_estimate_reads_headers_and_matches_the_built_size(tmp_path, monkeypatch):
    source = load_source(str(write_jpegs(tmp_path / "data", classes=3)))
    calls = count_decodes(monkeypatch)
    estimate = estimate_decoded_bytes(source, data_config())
    assert calls == []  # headers only
    built = build_decoded(source, data_config(), tmp_path / "cache", 0, log=lambda _: None)
    assert estimate == built.path.stat().st_size  # every image sampled: exact
    one_kind = estimate_decoded_bytes(source, data_config(), sample=1)  # the first image, a 500x375
    assert one_kind == 3 * 256 * 341 * len(source)


def test_the_auto_budget_is_a_share_of_ram_and_of_free_disk(tmp_path, monkeypatch):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits, line = auto_cache_fits(0, tmp_path / "not" / "yet")
    assert fits and "GB" in line and str(tmp_path) in line
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(cachedir.shutil, "disk_usage", lambda _: Usage(10**12, 0, 1000))
    assert auto_cache_fits(500, tmp_path)[0] and not auto_cache_fits(501, tmp_path)[0]
    monkeypatch.setattr(cachedir.shutil, "disk_usage", lambda _: Usage(10**15, 0, 10**15))
    assert auto_cache_fits(int(0.25 * ram), tmp_path)[0] and not auto_cache_fits(int(0.25 * ram) + 1, tmp_path)[0]
