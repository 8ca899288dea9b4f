"""`finetune check-data`: the report (unreadable files, duplicates and leakage, outliers, class counts)
and its exit codes: 0 when the data can train, 1 when it cannot, 2 when a source cannot be opened."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import finetune
from finetune import cli


@pytest.fixture(scope="module")
def planted(tmp_path_factory, make_bad_image_folder, make_image_folder, make_recipe) -> dict:
    """train: the awkward folder (a truncated and an empty file among others) plus one huge image;
    val: its own images plus a copy of one training image (leakage); a recipe naming both."""
    root = tmp_path_factory.mktemp("check")
    files = make_bad_image_folder(root / "train")
    Image.fromarray(np.full((120, 120, 3), 90, np.uint8)).save(root / "train" / "c2" / "huge.png")
    make_image_folder(root / "val", ["c1", "c2", "c10"], per_class=3, size=24, seed=5)
    shutil.copy(root / "train" / "c1" / "0.png", root / "val" / "c1" / "leaked.png")
    recipe = make_recipe(root / "train", **{"data.val": str(root / "val")})
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return {"root": root, "files": files, "recipe": root / "recipe.yaml"}


def check(capsys, *args: str) -> tuple[int, str, str]:
    code = 0
    try:
        cli.main(["check-data", *map(str, args)])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_json_report_names_the_leak_and_the_unreadable_files(planted, capsys):
    code, out, _ = check(capsys, planted["recipe"], "--json")
    assert code == 0  # warnings only: the data can train
    report = json.loads(out)
    assert report["trainable"] and not report["errors"]
    train = report["splits"]["train"]
    assert {Path(b["file"]).name for b in train["unreadable"]} == {"truncated.jpg", "empty.png"}
    assert all(b["reason"] for b in train["unreadable"])
    [group] = report["leakage"]["train/val"]
    assert sorted(Path(f).name for f in group) == ["0.png", "leaked.png"]
    assert any("leakage" in w for w in report["warnings"])
    assert train["classes"] == {"c1": 8, "c2": 9, "c10": 8}  # readable images; notes.txt is no image
    assert list(train["classes"]) == ["c1", "c2", "c10"]
    assert train["imbalance_ratio"] == pytest.approx(9 / 8, abs=0.01)
    assert {Path(o["file"]).name for o in train["size_outliers"]} == {"huge.png"}
    assert {Path(o["file"]).name for o in train["mode_outliers"]} >= {"cmyk.jpg", "palette.png", "gray16.png",
                                                                       "rgba.png"}
    assert report["splits"]["val"]["images"] == 10


def test_table_lists_splits_classes_and_problems(planted, capsys):
    code, out, _ = check(capsys, planted["recipe"])
    assert code == 0
    assert out.splitlines()[0].split()[:3] == ["split", "images", "readable"]
    assert "truncated.jpg" in out and "empty.png" in out and "leaked.png" in out
    assert "the data can train" in out


def test_duplicates_within_a_split_are_reported(planted, tmp_path, make_image_folder, make_recipe, capsys):
    data = make_image_folder(tmp_path / "d", ["a", "b"], per_class=4, size=16)
    shutil.copy(data / "a" / "0.png", data / "b" / "copy.png")  # the same image under two labels
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(data, **{"data.val_fraction": 0.25})))
    report = finetune.check_data(str(recipe))
    groups = [sorted(Path(f).name for f in g) for split in report["splits"].values() for g in split["duplicates"]]
    groups += [sorted(Path(f).name for f in g) for pair in report["leakage"].values() for g in pair]
    assert groups == [["0.png", "copy.png"]]


def test_val_classes_missing_from_train_exit_1(planted, tmp_path, capsys):
    val = tmp_path / "val"
    shutil.copytree(planted["root"] / "val", val)
    (val / "zebra").mkdir()
    shutil.copy(val / "c1" / "0.png", val / "zebra" / "z.png")
    code, out, _ = check(capsys, planted["recipe"], f"data.val={val}", "--json")
    assert code == 1
    report = json.loads(out)
    assert not report["trainable"] and any("zebra" in e for e in report["errors"])


def test_only_unreadable_images_exit_1(tmp_path, make_recipe, capsys):
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "data" / name / f"{i}.jpg").write_bytes(b"\xff\xd8 not really")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(tmp_path / "data")))
    code, out, _ = check(capsys, recipe)
    assert code == 1 and "no readable images" in out and "cannot train" in out


def test_empty_dataset_exits_nonzero_without_traceback(tmp_path, make_recipe, capsys):
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(tmp_path / "data")))
    code, out, err = check(capsys, recipe)
    assert code == 2 and "no images" in err and "Traceback" not in err


def test_one_class_exits_1(tmp_path, make_image_folder, make_recipe, capsys):
    data = make_image_folder(tmp_path / "d", ["only"], per_class=4, size=16)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(data)))
    code, out, _ = check(capsys, recipe, "--json")
    assert code == 1 and any("at least two" in e for e in json.loads(out)["errors"])


def test_a_manifest_row_with_extra_fields_exits_2_in_one_paragraph(tmp_path, make_image_folder, make_recipe, capsys):
    data = make_image_folder(tmp_path / "d", ["a", "b"], per_class=3, size=16)
    rows = [f"{c}/{i}.png,{c}" for c in ("a", "b") for i in range(3)]
    rows[0] += ",oops"
    (data / "m.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(data / "m.csv")))
    code, out, err = check(capsys, recipe)
    assert code == 2 and err.startswith("finetune: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "m.csv, line 2 has 1 more field than its header" in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_only_regular_files_are_read(tmp_path, make_image_folder, make_recipe, within):
    """A manifest listing a device, a FIFO and a folder: each reported unreadable with what it is, at once
    (the probe's /dev/zero read without end, and a FIFO waited for a writer forever)."""
    data = make_image_folder(tmp_path / "d", ["a", "b"], per_class=3, size=16)
    os.mkfifo(data / "b" / "fifo.png")
    rows = [f"{c}/{i}.png,{c}" for c in ("a", "b") for i in range(3)]
    rows += ["/dev/null,a", "b/fifo.png,b", "a,a"]
    (data / "m.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    report = within(20, lambda: finetune.check_data(make_recipe(data / "m.csv")),
                    data / "b" / "fifo.png")
    reasons = {Path(u["file"]).name: u["reason"] for split in report["splits"].values() for u in split["unreadable"]}
    assert reasons == {"null": "NotRegularFile: a character device, not a regular file",
                       "fifo.png": "NotRegularFile: a FIFO (named pipe), not a regular file",
                       "a": "NotRegularFile: a folder, not a regular file"}
