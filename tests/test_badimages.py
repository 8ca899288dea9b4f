"""Awkward and broken image files: every PIL mode becomes correct 8-bit RGB, EXIF rotation is applied,
non-images are ignored, and unreadable files are skipped (and reported) or refused, never a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import write_png_header
from PIL import Image

from finetune import cli
from finetune.data.badimages import SkipLog, describe_error, read_skip_logs
from finetune.data.images import open_image
from finetune.data.loaders import Transformed
from finetune.data.samples import IGNORE_LABEL, FileSamples
from finetune.data.sources import load_source
from finetune.recipe.schema import DataConfig


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory, make_bad_image_folder) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("bad") / "data"
    return root, make_bad_image_folder(root)


@pytest.fixture(scope="module")
def bad_run(bad_folder, make_recipe) -> tuple[Path, subprocess.CompletedProcess]:
    """`finetune train` (a real subprocess) on the folder, one epoch, hard examples on: every train and
    val image is decoded at least once."""
    root, _ = bad_folder
    recipe = make_recipe(root, **{"train.epochs": 1, "train.hard_examples": 4})
    recipe_file = root.parent / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    run = root.parent / "run"
    proc = subprocess.run([sys.executable, "-m", "finetune", "train", str(recipe_file), "--output", str(run)],
                          cwd=root.parent, capture_output=True, text=True, timeout=300)
    return run, proc


@pytest.mark.slow
def test_training_on_a_folder_with_bad_files_completes_and_reports_them(bad_folder, bad_run):
    _, files = bad_folder
    run, proc = bad_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "data_report.json").read_text())
    skipped = {Path(entry["file"]).name: entry["reason"] for entry in report["skipped"]}
    assert set(skipped) == {"truncated.jpg", "empty.png"}
    assert "truncated" in skipped["truncated.jpg"].lower()
    assert report["skipped_count"] == 2 and report["on_bad_image"] == "skip"
    assert "2 unreadable image(s) skipped" in proc.stdout + proc.stderr  # the end-of-run summary
    assert not list(run.glob(".skipped-*"))  # the per-process logs were folded into the report


@pytest.mark.slow
def test_label_names_follow_natural_folder_order(bad_run):
    run, _ = bad_run
    assert json.loads((run / "config.json").read_text())["label_names"] == ["c1", "c2", "c10"]


def test_non_image_files_are_not_listed(bad_folder):
    root, _ = bad_folder
    samples = load_source(str(root), DataConfig(train=str(root)))
    assert samples.class_names == ["c1", "c2", "c10"]
    names = {Path(p).name for p in samples.items}
    assert "notes.txt" not in names and {"truncated.jpg", "empty.png", "gray16.png"} <= names


def test_sixteen_bit_grayscale_is_scaled_not_clipped(bad_folder):
    _, files = bad_folder
    assert Image.open(files["gray16"]).mode.startswith("I;16")
    assert np.asarray(Image.open(files["gray16"]).convert("RGB")).mean() > 250  # PIL's own convert: white
    image = open_image(files["gray16"])
    assert image.mode == "RGB"
    assert np.asarray(image).mean() == pytest.approx(files["gray16_mean"], rel=0.02)


def test_transparency_is_composited_on_white_and_cmyk_converted(bad_folder):
    _, files = bad_folder
    rgba = np.asarray(Image.open(files["rgba"]).convert("RGBA")).astype(float)
    expected = rgba[..., :3] * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.abs(np.asarray(open_image(files["rgba"])).astype(float) - expected).max() <= 2
    palette = Image.open(files["palette"])
    transparent = np.asarray(palette) == 0
    assert transparent.any()
    assert (np.asarray(open_image(files["palette"]))[transparent] == 255).all()
    cmyk = open_image(files["cmyk"])
    assert cmyk.mode == "RGB" and abs(np.asarray(cmyk).mean() - 128) < 20  # not inverted, not black


def test_exif_orientation_is_applied(bad_folder):
    _, files = bad_folder
    assert Image.open(files["rotated"]).size == (30, 10)
    assert open_image(files["rotated"]).size == (10, 30)


def test_a_bad_sample_is_replaced_in_training_and_ignored_in_evaluation(bad_folder, tmp_path):
    root, files = bad_folder
    samples = load_source(str(root), DataConfig(train=str(root)))
    bad = samples.items.index(str(files["empty"]))
    log = SkipLog(tmp_path / ".skipped-0.jsonl")
    train = Transformed(samples, [bad, bad + 1], np.asarray, "train", skip_log=log)
    image, label = train[0]
    assert label == samples.targets[bad] and image.shape[-1] == 3  # the next readable image, own class label
    val = Transformed(samples, [bad, bad + 1], np.asarray, "val", skip_log=log, substitute=False)
    assert val[0][1] == IGNORE_LABEL
    assert val[1][1] == samples.targets[bad + 1]
    entries = read_skip_logs(tmp_path)
    assert [(e["split"], Path(e["file"]).name) for e in entries] == [("train", "empty.png"), ("val", "empty.png")]


def test_skip_logs_of_several_processes_are_merged_once_per_file(tmp_path):
    for process in range(3):
        log = SkipLog.for_process(tmp_path, process)
        log.record("train", "a.jpg", "OSError")
        log.record("train", f"only-{process}.jpg", "OSError")
    (tmp_path / ".skipped-3.jsonl").write_text('{"split": "train", "fi')  # a line cut short by a kill
    files = [e["file"] for e in read_skip_logs(tmp_path)]
    assert sorted(files) == ["a.jpg", "only-0.jpg", "only-1.jpg", "only-2.jpg"]


def test_on_bad_image_error_lists_every_bad_file_and_writes_nothing(bad_folder, make_recipe, tmp_path, capsys):
    root, _ = bad_folder
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(root, **{"train.epochs": 1})))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(recipe), "--output", str(tmp_path / "run"), "data.on_bad_image=error"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "truncated.jpg" in err and "empty.png" in err and "data.on_bad_image=skip" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_with_bad_files_and_the_balanced_sampler(bad_folder, make_recipe, tmp_path):
    """`--processes 2` on CPU: each process's loader workers log the bad files they meet; the main process
    merges the logs into one report, once per file. The balanced sampler is sharded by Accelerate."""
    root, _ = bad_folder
    recipe = make_recipe(root, **{"train.epochs": 1, "train.hard_examples": 4, "data.sampler": "balanced",
                                  "train.class_weights": "auto", "data.num_workers": 1, "data.image_size": 24})
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "finetune", "train", str(recipe_file), "--output",
                           str(tmp_path / "run"), "--processes", "2"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert sorted(Path(e["file"]).name for e in report["skipped"]) == ["empty.png", "truncated.jpg"]
    assert "2 process(es)" in proc.stdout
    assert json.loads((tmp_path / "run" / "hard_examples.json").read_text())["val"]


def test_a_decompression_bomb_is_a_bad_image_with_its_reason(tmp_path, make_image_folder):
    """A 20,000 x 20,000 PNG in a class folder: skipped in training with the reason recorded, like a
    truncated file, instead of a DecompressionBombError from a loader worker."""
    root = make_image_folder(tmp_path / "data", classes=2, per_class=3, size=16)
    huge = write_png_header(root / "c0" / "huge.png", 20_000, 20_000)
    samples = load_source(str(root), DataConfig(train=str(root)))
    bad = samples.items.index(str(huge))
    log = SkipLog(tmp_path / ".skipped-0.jsonl")
    image, label = Transformed(samples, [bad, 0], np.asarray, "train", skip_log=log)[0]
    assert label == samples.targets[0] and image.shape[-1] == 3  # the next readable sample stands in
    [entry] = read_skip_logs(tmp_path)
    assert Path(entry["file"]).name == "huge.png"
    assert entry["reason"].startswith("image too large (400000000 pixels > ")


def test_pils_own_decompression_bomb_error_gets_the_same_reason():
    # Images decoded outside open_image (a Hugging Face dataset's Image feature, checkdata's header look)
    error = Image.DecompressionBombError("Image size (400000000 pixels) exceeds limit of 178956970 pixels, "
                                         "could be decompression bomb DOS attack.")
    assert describe_error(error) == "image too large (400000000 pixels > 178956970)"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_or_a_device_is_a_bad_image_with_its_reason_not_a_hang(tmp_path, make_image_folder, within):
    root = make_image_folder(tmp_path / "data", classes=2, per_class=3, size=16)
    os.mkfifo(root / "c0" / "fifo.png")
    samples = FileSamples([str(root / "c0" / "fifo.png"), "/dev/zero", str(root / "c0" / "0.png")], [0, 0, 0],
                          ["c0"], "manifest")
    log = SkipLog(tmp_path / ".skipped-0.jsonl")
    view = Transformed(samples, [0, 1, 2], np.asarray, "train", skip_log=log)
    image, label = within(20, lambda: view[0], root / "c0" / "fifo.png")
    assert image.shape == (16, 16, 3) and label == 0  # the next readable image stands in
    assert [e["reason"] for e in read_skip_logs(tmp_path)] == [
        "NotRegularFile: a FIFO (named pipe), not a regular file", "NotRegularFile: a character device, not a "
        "regular file"]
