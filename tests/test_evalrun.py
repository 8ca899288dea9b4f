"""finetune/training/evalrun.py through `finetune.evaluate` and `finetune eval`: a tiny run (test_resnet, 2
epochs, an explicit val folder) scored again on its own val folder gives its own val numbers, the val report
written after training agrees, the run's files are left alone, classes are matched by name, mistakes are
one paragraph with exit code 2, and two processes count every image once."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import finetune
from finetune.cli import main as cli_main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evalrun")


@pytest.fixture(scope="module")
def val_dir(workdir, make_image_folder) -> Path:
    """15 images, two of them labelled as another class, so the model makes mistakes to agree on: 5 c0, 6 c1,
    4 c2."""
    val = make_image_folder(workdir / "val", classes=3, per_class=5, size=32, seed=1)
    (val / "c0" / "0.png").rename(val / "c1" / "from_c0.png")
    (val / "c2" / "0.png").rename(val / "c0" / "from_c2.png")
    return val


@pytest.fixture(scope="module")
def run(workdir, val_dir, make_image_folder, make_recipe) -> Path:
    train = make_image_folder(workdir / "train", classes=3, per_class=8, size=32)
    return Path(finetune.train(make_recipe(train, **{"data.val": str(val_dir)}), output=workdir / "run").run_dir)


def exported_val(run: Path) -> dict:
    """The exported epoch's val numbers from metrics.jsonl (the model's, or its moving average's)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = [r for r in records if r["exported"]][-1]
    prefix = "ema_val" if best["exported"] == "ema" else "val"
    return {"epoch": best["epoch"], **{key: best[f"{prefix}_{key}"] for key in ("acc", "balanced_acc", "loss",
                                                                               "per_class_acc")}}


def test_val_report_after_training_is_the_exported_epochs_val(run):
    report, val = json.loads((run / "val_report.json").read_text()), exported_val(run)
    assert report["epoch"] == val["epoch"] and report["images"] == 15
    assert report["top1_acc"] == pytest.approx(val["acc"], abs=1e-6)
    assert report["balanced_acc"] == pytest.approx(val["balanced_acc"], abs=1e-6)
    assert report["loss"] == pytest.approx(val["loss"], abs=1e-4)
    rows = [sum(row) for row in report["confusion_matrix"]]
    assert rows == [report["per_class"][c]["support"] for c in ("c0", "c1", "c2")] == [5, 6, 4]
    assert report["top1_acc"] < 1  # the two relabelled images
    for name in ("val_confusion_matrix.png", "val_reliability.png"):
        assert (run / name).stat().st_size > 5000, name


def test_eval_on_the_val_folder_agrees_with_the_run(run, val_dir):
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    result = finetune.evaluate(run, str(val_dir))
    output = Path(result.output)
    assert output.parent == run and output.name.startswith("eval-val-")
    after = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p != output}
    assert after == before  # the run's own files untouched
    m, val = result.metrics, exported_val(run)
    assert m["top1_acc"] == pytest.approx(val["acc"], abs=1e-6)
    assert m["balanced_acc"] == pytest.approx(val["balanced_acc"], abs=1e-6)
    assert m["loss"] == pytest.approx(val["loss"], abs=1e-4)
    assert {c: m["per_class"][c]["recall"] for c in m["per_class"]} == pytest.approx(val["per_class_acc"], abs=1e-6)
    assert m["confusion_matrix"] == json.loads((run / "val_report.json").read_text())["confusion_matrix"]
    assert m["classes_missing"] == [] and m["unreadable"] == []
    assert sorted(p.name for p in output.iterdir()) == ["confusion_matrix.png", "metrics.json", "mistakes.png",
                                                         "predictions.csv", "reliability.png"]
    with open(output / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in val_dir.rglob("*.png"))
    assert sum(r["label"] == r["prediction"] for r in rows) == round(15 * m["top1_acc"])
    second = finetune.evaluate(run, str(val_dir))
    assert second.output != result.output  # a new folder every time


def test_python_objects_and_classes_missing_from_the_data(run, val_dir):
    pairs = [(str(p), p.parent.name) for p in sorted((val_dir / "c2").glob("*.png"))]
    by_name = finetune.evaluate(run, pairs)
    assert by_name.metrics["images"] == 4 and by_name.metrics["classes_missing"] == ["c0", "c1"]
    assert by_name.metrics["per_class"]["c0"]["recall"] is None
    indexed = finetune.evaluate(run, [(path, 2) for path, _ in pairs])  # integer labels: the run's class indices
    assert indexed.metrics["confusion_matrix"] == by_name.metrics["confusion_matrix"]


def test_manifest_and_hugging_face_sources_give_the_folders_numbers(run, val_dir, workdir):
    """The same 15 images as a CSV manifest and as a save_to_disk dataset whose ClassLabel lists the classes
    in another order: matched by name, the same confusion matrix."""
    import datasets

    pairs = sorted((str(p), p.parent.name) for p in val_dir.rglob("*.png"))
    manifest = workdir / "val.csv"
    manifest.write_text("path,label\n" + "".join(f"{path},{label}\n" for path, label in pairs))
    order = ["c2", "c0", "c1"]
    hf = datasets.Dataset.from_dict({"image": [p for p, _ in pairs], "label": [order.index(c) for _, c in pairs]})
    hf.cast_column("image", datasets.Image()).cast_column("label", datasets.ClassLabel(names=order)).save_to_disk(
        str(workdir / "val_hf"))
    folder = finetune.evaluate(run, str(val_dir)).metrics
    for source in (str(manifest), f"hf:{workdir / 'val_hf'}"):
        m = finetune.evaluate(run, source).metrics
        assert m["confusion_matrix"] == folder["confusion_matrix"], source
        assert m["loss"] == pytest.approx(folder["loss"], abs=1e-5), source


def eval_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_prints_a_summary_or_json(run, val_dir, tmp_path, capsys):
    cli_main(["eval", str(run), str(val_dir), "--output", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert "15 images, 3 classes: top-1" in out and f"report in {tmp_path / 'report'}" in out
    cli_main(["eval", str(run), str(val_dir), "--output", str(tmp_path / "report2"), "--json"])
    assert json.loads(capsys.readouterr().out)["images"] == 15
    code, _, err = eval_cli(capsys, run, val_dir, "--output", tmp_path / "report")  # never over a report
    assert code == 2 and "already exists" in err


def test_mistakes_are_one_paragraph_with_exit_code_2(run, workdir, make_image_folder, capsys):
    stranger = make_image_folder(workdir / "stranger", classes=["c0", "zebra"], per_class=2, size=32)
    code, _, err = eval_cli(capsys, run, stranger)
    assert code == 2 and "'zebra'" in err and "never saw" in err and "Traceback" not in err
    assert err.count("\n") == 1
    code, _, err = eval_cli(capsys, workdir / "train", stranger)  # a folder of images, not a run
    assert code == 2 and "config.json" in err and "Traceback" not in err
    code, _, err = eval_cli(capsys, run, workdir / "no-such-data")
    assert code == 2 and "no such file or folder" in err and "Traceback" not in err
    assert not any(p.name.startswith("eval-stranger") for p in run.iterdir())


@pytest.mark.slow
def test_two_processes_count_every_image_once(run, workdir, make_image_folder):
    """7 images over 2 processes and batches of 2: the last batch of one shard is padded by Accelerate."""
    odd = make_image_folder(workdir / "odd", classes=["c1", "c2"], per_class=4, size=32, seed=2)
    (odd / "c2" / "3.png").unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "finetune", "eval", str(run), str(odd), "--output", str(workdir / "odd-report"),
                           "--batch-size", "2", "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workdir / "odd-report" / "metrics.json").read_text())
    assert report["images"] == 7 and report["classes_missing"] == ["c0"]
    with open(workdir / "odd-report" / "predictions.csv", newline="") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    assert sorted(paths) == sorted(str(p) for p in odd.rglob("*.png"))  # each once
    single = finetune.evaluate(run, str(odd))
    assert single.metrics["confusion_matrix"] == report["confusion_matrix"]


def test_an_alias_in_the_runs_recipe_is_a_one_paragraph_error(tmp_path):
    from finetune.training.evalrun import eval_config

    (tmp_path / "recipe.yaml").write_text("a: &a [x, x]\ndata: {image_column: *a}\n")
    with pytest.raises(finetune.FinetuneError, match=r"recipe\.yaml, line 2: the YAML alias \*a is refused") as info:
        eval_config(tmp_path, str(tmp_path / "data"))
    assert "\n" not in str(info.value)
