"""A checkpoint written onto a full disk: one paragraph naming the last good checkpoint, exit 2, no traceback,
and that checkpoint still resumes (copied to a disk with room). Needs root (it mounts a small tmpfs); run: sudo python scripts/disk_full.py

The unit tests fake the error (tests/test_checkpoint.py); this makes the disk really fill up."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import build_tiny_recipe, write_image_folder  # noqa: E402

import yaml  # noqa: E402


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="finetune-disk-full-"))
    disk = work / "disk"
    disk.mkdir()
    recipe = build_tiny_recipe(write_image_folder(work / "data", classes=3, per_class=8),
                               **{"train.epochs": 4, "data.cache": "none"})
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=11m", "tmpfs", str(disk)], check=True)
    try:
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
        run = disk / "run"
        proc = subprocess.run([sys.executable, "-m", "finetune", "train", str(work / "recipe.yaml"), "--output",
                               str(run)], capture_output=True, text=True, env=env)
        print(f"exit code {proc.returncode}\n--- stderr (last 1500 characters)\n{proc.stderr[-1500:]}")
        ok = proc.returncode == 2 and "Traceback" not in proc.stderr and "disk full at" in proc.stderr
        roomy = work / "run"  # "free space": the run moves to a disk with room, and resumes there
        subprocess.run(["cp", "-a", str(run), str(roomy)], check=True)
        resumed = subprocess.run([sys.executable, "-m", "finetune", "train", "--resume", str(roomy)],
                                 capture_output=True, text=True, env=env)
        print(f"--- resumed elsewhere: exit code {resumed.returncode}\n{resumed.stdout[-600:]}{resumed.stderr[-600:]}")
        return 0 if ok and resumed.returncode == 0 else 1
    finally:
        subprocess.run(["umount", str(disk)], check=False)


if __name__ == "__main__":
    sys.exit(main())
