"""The `finetune` command. Subcommands map one-to-one onto the Python API.

User mistakes (FinetuneError) are printed as one paragraph without a traceback and exit with code 2; a
run stopped by a signal (Stopped) is printed as a stop and exits with 128 + the signal's number; anything
else is a bug and keeps its traceback. `check-data` exits 1 when the data it reports on cannot train.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from . import __version__
from .errors import FinetuneError, Stopped

EPILOG = "overrides: any recipe key as section.key=value, e.g. optim.lr=1e-3 train.epochs=3 freeze.backbone=true"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune pretrained timm image backbones.")
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune as a recipe says", epilog=EPILOG)
    p.add_argument("recipe", nargs="?", help="YAML file or shipped recipe name (optional with --resume)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--output", "-o", help="run directory (default: runs/<time>-<backbone>)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint; "
                   "`--resume auto --output DIR`: resume DIR if it holds an interrupted run, else start it")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="with --resume: accept a checkpoint without a checksum manifest (an older finetune's)")
    p.add_argument("--processes", type=int, metavar="N",
                   help="train with N processes on this machine (one per GPU, or N CPU processes), started with "
                        "torchrun; train.batch_size stays the global batch")

    p = sub.add_parser("plan", help="print the parameter-group plan without training", epilog=EPILOG)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print a JSON list of groups")

    p = sub.add_parser("show", help="print the fully resolved recipe, every default written out", epilog=EPILOG)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    p = sub.add_parser("check-data", help="report what is wrong with a recipe's data, without training "
                       "(exit 0: it can train, 1: it cannot)", epilog=EPILOG)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("lr-find", help="LR range test: sweep optim.lr, plot loss against LR, suggest a value",
                       epilog=EPILOG)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--output", "-o", help="a new folder for lr_find.png/.json (default: runs/<time>-<backbone>-lr-find)")
    p.add_argument("--start", type=float, default=1e-7, help="first base LR (default 1e-7)")
    p.add_argument("--end", type=float, default=10.0, help="last base LR (default 10)")
    p.add_argument("--steps", type=int, default=100, help="updates in the sweep at most (default 100)")
    p.add_argument("--epoch", type=int, default=0,
                   help="sweep the unfreezing phase this epoch (0-based) trains in (default 0)")

    p = sub.add_parser("predict", help="classify images with a trained run")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+", help="image files, folders (every image inside, recursively) or "
                   ".csv/.jsonl manifests")
    p.add_argument("--top-k", "-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON: one object per image")
    p.add_argument("--csv", metavar="OUT", help="write path,prediction,probability (and the next top-k classes) "
                   "to this CSV file instead of printing")
    p.add_argument("--tta", action="store_true", help="average the logits of each image and its horizontal mirror")
    p.add_argument("--threshold", type=float, default=None, help="multi-label runs: predict every label whose "
                   "probability reaches this (default: the run's train.threshold, kept in config.json)")

    p = sub.add_parser("eval", help="score a trained run on labelled data: metrics.json, confusion matrix, "
                       "reliability diagram, confident mistakes, predictions.csv")
    p.add_argument("run_dir")
    p.add_argument("data", help="a labelled source: folder, .csv/.jsonl manifest, hf:NAME[@split], "
                   "torchvision:NAME[@test]")
    p.add_argument("--output", "-o", help="a new folder for the report (default: RUN_DIR/eval-<data>-<time>)")
    p.add_argument("--batch-size", type=int, default=64, help="images per process per forward pass (default 64)")
    p.add_argument("--json", action="store_true", help="print metrics.json")
    p = sub.add_parser("export", help="write a run's model as ONNX or TorchScript, checked against PyTorch")
    p.add_argument("run_dir")
    p.add_argument("--format", "-f", required=True, choices=["onnx", "torchscript"],
                   help="onnx (needs the export extra: pip install 'finetune[export]') or torchscript")
    p.add_argument("--output", "-o", help="the file to write (default: model.onnx / model.torchscript.pt in RUN_DIR)")
    p.add_argument("--dynamic-batch", action="store_true", help="accept any batch size (default: batch size 1)")

    p = sub.add_parser("runs", help="one line per run directory: backbone, data, epochs, accuracies, time, "
                       "status (finished / interrupted / running)")
    p.add_argument("folder", nargs="?", default="runs", help="where to look, subfolders included (default: runs)")
    p.add_argument("--sort", default="name", metavar="COLUMN",
                   help="name (default), backbone, data, epochs, best, final, test (these three highest first), "
                        "time or status")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per run")

    p = sub.add_parser("bench", help="input-pipeline and train-step throughput, next to PIL workers and a plain loop",
                       epilog=EPILOG)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="timed steps per loop (after warmup)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per loop")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; the best of each is reported")
    p.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                   help="skip the input-pipeline part (PIL workers vs decoded cache on the recipe's images)")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    # Overrides may also follow --options (`finetune train r.yaml --output o optim.lr=1e-3`).
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    try:
        if args.command == "train" and args.processes not in (None, 1):
            _start_processes(args, sys.argv[1:] if argv is None else argv)
        _run(args)
    except FinetuneError as e:
        stopped = isinstance(e, Stopped)  # on request, by a signal: no error ("finetune: stopped by SIGTERM ...")
        if not e.reported_elsewhere and (not e.raised_on_every_process or os.environ.get("RANK", "0") == "0"):
            print(f"finetune: {e}" if stopped else f"finetune: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code if stopped else 2)  # a stop: the shell's code for its signal
    except KeyboardInterrupt:
        # `train` gets here only before it claimed its run folder (after, rundir/folder.py makes the Ctrl-C a Stopped).
        hint = (" before the run began: nothing was written. To start the run, run the same command again"
                if args.command == "train" else "")
        print(f"\nfinetune: stopped by SIGINT{hint}.", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def _start_processes(args: argparse.Namespace, argv: list[str]) -> None:
    """`train --processes N`: check the recipe and run directory once, here, so that a mistake is reported
    once rather than by each of N processes, then hand over to torchrun (launch.py)."""
    from . import api
    from .training.launch import run_processes, without_processes_option

    if args.processes < 1:
        raise FinetuneError(f"--processes {args.processes}: give a number of processes, 1 or more.")
    recipe, overrides = _recipe_and_overrides(args)
    _require_recipe_or_resume(recipe, args.resume)
    api.resolve_run(recipe, overrides, args.output, args.overwrite, args.resume)
    run_processes(args.processes, without_processes_option(argv))


def _require_recipe_or_resume(recipe: str | None, resume: str | None) -> None:
    if recipe is None and resume is None:
        raise FinetuneError("give a recipe (a YAML file or a shipped name such as quickstart), or --resume RUN_DIR.")


def _recipe_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    overrides = list(getattr(args, "overrides", None) or [])
    recipe = getattr(args, "recipe", None)
    if recipe is not None and "=" in recipe:  # `finetune train --resume DIR key=value`: no recipe given
        overrides.insert(0, recipe)
        recipe = None
    return recipe, overrides


def _run(args: argparse.Namespace) -> None:
    from . import api  # imported here so `finetune --help` answers without loading torch

    recipe, overrides = _recipe_and_overrides(args)
    if args.command == "train":
        _require_recipe_or_resume(recipe, args.resume)
        api.train(recipe, overrides=overrides, output=args.output, overwrite=args.overwrite, resume=args.resume,
                  trust_checkpoint=args.trust_checkpoint)
    elif args.command == "plan":
        plan = api.plan(recipe, overrides)
        print(plan.dumps() if args.json else plan.table())
    elif args.command == "show":
        from .recipe.load import dump_recipe

        print(dump_recipe(api.resolve(recipe, overrides)), end="")
    elif args.command == "check-data":
        from .data.checkdata import format_report
        from .tasks import build_task

        report = api.check_data(recipe, overrides)
        task = build_task(api.resolve(recipe, overrides))  # what the report adds for label sets or numbers
        print(json.dumps(report, indent=2) if args.json else format_report(report, task))
        if not report["trainable"]:
            sys.exit(1)
    elif args.command == "lr-find":
        api.lr_find(recipe, overrides, output=args.output, start=args.start, end=args.end, steps=args.steps,
                    epoch=args.epoch)
    elif args.command == "predict":
        _predict(api.load(args.run_dir), args)
    elif args.command == "eval":
        result = api.evaluate(args.run_dir, args.data, output=args.output, batch_size=args.batch_size)
        if result is not None:  # None: not the main process of a launch
            print(json.dumps({"output": result.output, **result.metrics}, indent=2) if args.json
                  else f"{result.summary}\nreport in {result.output}")
    elif args.command == "export":
        print(api.export(args.run_dir, args.format, args.output, args.dynamic_batch).summary())
    elif args.command == "runs":
        from .rundir.listing import format_runs

        found = api.runs(args.folder, sort=args.sort)
        print(json.dumps([r.to_dict() for r in found], indent=2) if args.json else format_runs(found, args.folder))
    elif args.command == "bench":
        from .training.bench import format_pipeline, format_report, run_bench, run_pipeline_bench
        from .training.runtime import flush_denormals

        config = api.resolve(recipe, overrides)
        with flush_denormals():  # as training runs
            pipeline = run_pipeline_bench(config, batches=args.steps) if args.pipeline else None
            report = run_bench(config, steps=args.steps, warmup=args.warmup, repeats=args.repeats)
        if args.json:
            print(json.dumps({**report, **({"pipeline": pipeline} if pipeline else {})}, indent=2))
        else:
            print((format_pipeline(pipeline) + "\n" if pipeline else "") + format_report(report))


def _predict(predictor, args: argparse.Namespace) -> None:
    from .model.predict import list_images, save_predictions

    if args.top_k < 1:
        raise FinetuneError(f"predict: --top-k {args.top_k}: give a number of classes, 1 or more.")
    images = list_images(args.images)
    predictions = predictor.predict(images, args.top_k, tta=args.tta, threshold=args.threshold)
    if args.csv:
        save_predictions(args.csv, images, predictions, predictor.task)
        print(f"predictions for {len(images)} image(s) in {args.csv}")
    elif args.json:
        print(json.dumps([{"image": i, "predictions": p} for i, p in zip(images, predictions)], indent=2))
    else:
        for image, top in zip(images, predictions):
            print(image + ": " + predictor.task.format_prediction(top))
