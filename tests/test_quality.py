"""scripts/quality.py: the minimal recipe on train/test folders, printed as one table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# A subprocess that trains: the slow tier.
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quality.py"


def test_quality_script_runs_the_minimal_recipe_and_reports_test_accuracy(tmp_path, make_image_folder):
    data = tmp_path / "shapes"
    make_image_folder(data / "train", classes=3, per_class=10, size=32)
    make_image_folder(data / "test", classes=3, per_class=4, size=32, seed=1)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(data), "--backbone", "test_resnet", "--weights", "false",
                           "--set", "data.image_size=32", "--set", "train.epochs=2", "--set", "data.num_workers=0",
                           "--output", str(tmp_path / "runs"), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [row] = json.loads(proc.stdout[proc.stdout.index("[\n"):])
    # The table holds the run's own numbers: val accuracy the better of the model and its moving average.
    run = Path(row["run_dir"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [round(max(r["val_acc"], r.get("ema_val_acc") or 0.0), 4) for r in records]
    test = json.loads((run / "test_metrics.json").read_text())
    assert row["data"] == "shapes" and row["epochs"] == len(records) == 2
    assert row["best_val_acc"] == max(val) and row["final_val_acc"] == val[-1]
    assert row["test_acc"] == round(test["test_acc"], 4) and test["test_images"] == 12  # the test folder
