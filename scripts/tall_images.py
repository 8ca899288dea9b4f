"""Peak memory of every command on a dataset holding one very tall image (issue 27, item 2).

    python scripts/tall_images.py OUT [--heights 0,20000,400000] [--image-size 224]

For each height H it writes a 1 x H PNG (a few hundred bytes to 2 KB) into a tiny class-folder dataset
(train and val, 2 classes x 8 images of 32 px; H = 0: a 32 px image instead, the baseline), then runs,
each as its own process under `/usr/bin/time -v`, with test_resnet at --image-size px:
  train-pil       finetune train, 1 epoch, data.cache=none, no loader workers (the eval transform in-process)
  train-decoded   finetune train, 1 epoch, data.cache=decoded (builds the decoded-image cache)
  check-data      finetune check-data on the recipe
  eval            finetune eval of the trained run on the val folder
  predict-file    finetune predict RUN tall.png (refused: exit 2)
  predict-folder  finetune predict RUN val/ (holds the tall image: exit 2, as for any unreadable file)
and prints one row per command: exit code, peak RSS ("Maximum resident set size"), seconds, and the line
of its output that mentions the tall image. Before issue 27, the eval transform of a 1 x 20,000 image
peaked at about 6 GB and predict of a 1 x 400,000 one at 3.1 GB; the target is under 1 GB everywhere.
The code run is this checkout's (PYTHONPATH is set to it).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_dataset(root: Path, height: int) -> Path:
    """root/{train,val}/{c0,c1}/*.png plus a 1 x height PNG (height 0: 32 x 32) in train/c0 and val/c0.
    Returns the tall image."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, colour in enumerate(((220, 40, 40), (40, 40, 220))):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(8):
                pixels = np.clip(rng.normal(colour, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    tall = root / "train" / "c0" / "tall.png"
    Image.new("RGB", (1, height) if height else (32, 32), (90, 160, 30)).save(tall)
    (root / "val" / "c0" / "tall.png").write_bytes(tall.read_bytes())
    return tall


def measured(command: list[str], cwd: Path) -> dict:
    """Runs `command` under /usr/bin/time -v: exit code, peak RSS in MB, seconds, and its output."""
    report = cwd / "time.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(cwd / "xdg-cache")}
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", "-o", str(report), *command], cwd=cwd, env=env,
                          capture_output=True, text=True)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report.read_text())
    return {"rc": proc.returncode, "peak_mb": int(peak[1]) / 1024 if peak else float("nan"),
            "seconds": time.perf_counter() - start, "output": proc.stdout + proc.stderr}


def about_tall(output: str) -> str:
    """The first line of `output` that shows what became of the tall image."""
    lines = [line.strip() for line in output.splitlines()
             if any(word in line for word in ("Traceback", "elongated", "unreadable", "skipped"))]
    return (lines[0] if lines else "-")[:110]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--heights", default="0,20000,400000")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    finetune = [sys.executable, "-m", "finetune"]
    print(f"{'height':>7} {'command':<15} {'exit':>4} {'peak RSS':>9} {'s':>5}  output about the tall image")
    for height in (int(h) for h in args.heights.split(",")):
        root = (args.out / f"tall-{height}").absolute()
        tall = write_dataset(root, height)
        recipe = {"model": {"backbone": "test_resnet", "pretrained": False},
                  "data": {"train": str(root / "train"), "val": str(root / "val"), "image_size": args.image_size,
                           "num_workers": 0, "cache_dir": str(root / "cache")},
                  "train": {"epochs": 1, "batch_size": 8, "hard_examples": 0}}
        (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        run = root / "run-pil"
        steps = {
            "train-pil": [*finetune, "train", "recipe.yaml", "--output", str(run), "--overwrite", "data.cache=none"],
            "train-decoded": [*finetune, "train", "recipe.yaml", "--output", str(root / "run-decoded"), "--overwrite",
                              "data.cache=decoded"],
            "check-data": [*finetune, "check-data", "recipe.yaml"],
            "eval": [*finetune, "eval", str(run), str(root / "val"), "--output", str(root / f"eval-{time.time_ns()}")],
            "predict-file": [*finetune, "predict", str(run), str(tall)],
            "predict-folder": [*finetune, "predict", str(run), str(root / "val")],
        }
        for name, command in steps.items():
            result = measured(command, root)
            print(f"{height:>7} {name:<15} {result['rc']:>4} {result['peak_mb']:>6.0f} MB {result['seconds']:>5.1f}  "
                  f"{about_tall(result['output'])}", flush=True)


if __name__ == "__main__":
    main()
