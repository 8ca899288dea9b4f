"""scripts/quality.py: the minimal recipe on train/test folders, printed as one table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert row["data"] == "shapes" and row["epochs"] == 2 and 0 <= row["test_acc"] <= 1
    assert row["final_val_acc"] <= row["best_val_acc"] and Path(row["run_dir"], "test_metrics.json").is_file()
