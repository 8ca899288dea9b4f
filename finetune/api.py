"""The Python entry points, re-exported by `finetune/__init__.py`: train, plan, check_data, lr_find, load,
evaluate, export, runs.

They do what the CLI does (the CLI calls them): resolve the recipe and overrides, open the data, pick
the run directory, and hand over to the one loop. Everything is checked before anything is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn
from torch.utils.data import Dataset

from .data.splits import Splits, build_splits
from .errors import FinetuneError
from .model.backbone import build_model
from .model.formats import ExportResult, export_run
from .model.groups import build_plan
from .model.plan import Plan
from .model.predict import Predictor, load
from .recipe.load import load_recipe, recipe_to_dict
from .recipe.overrides import flatten_overrides, keyword_overrides
from .recipe.schema import RecipeConfig, RecipeLike
from .rundir.folder import CHECKPOINT_NAME, MARKER_NAME, RunDir
from .rundir.listing import RunSummary, runs
from .tasks import Task, build_task
from .training.batching import batch_size_problem, require_batch_fits
from .training.loop import train as run_loop
from .training.lrfind import LRFindResult, Sweep, find_lr
from .training.plugins import plugins_from_arguments
from .training.runtime import flush_denormals


@dataclass
class TrainResult:
    run_dir: str
    metrics: list[dict]  # one record per epoch, as in metrics.jsonl
    best_epoch: int
    best_val_acc: float
    test: dict | None = None  # test metrics of the best epoch, when data.test is given
    skipped_images: int = 0  # unreadable files skipped (listed in data_report.json)

    @property
    def final(self) -> dict:
        return self.metrics[-1] if self.metrics else {}


@dataclass
class EvalResult:
    output: str  # the folder holding metrics.json, the plots and predictions.csv
    metrics: dict  # what metrics.json holds (less the run and data it names)
    summary: str = ""  # the report in a few lines, as `finetune eval` prints it


__all__ = ["train", "plan", "check_data", "lr_find", "load", "evaluate", "export", "resolve", "resolve_run",
           "runs", "RunSummary", "Predictor", "TrainResult", "LRFindResult", "EvalResult", "ExportResult"]


def resolve(recipe: RecipeLike | None, overrides: dict[str, Any] | Sequence[str] | None = None,
            in_memory_train: bool = False, in_memory_val: bool = False, in_memory_test: bool = False) -> RecipeConfig:
    """Recipe + overrides -> a checked config. In-memory datasets stand in for data.train / val / test."""
    items = flatten_overrides(overrides)
    for key, given in (("train", in_memory_train), ("val", in_memory_val), ("test", in_memory_test)):
        if given:
            items[f"data.{key}"] = f"python:{key}_data"
    if recipe is None:
        recipe = {}
    return load_recipe(recipe, items)


def train(recipe: RecipeLike | None = None, *, train_data: Dataset | Sequence | None = None,
          val_data: Dataset | Sequence | None = None, test_data: Dataset | Sequence | None = None,
          class_names: Sequence[str] | None = None, model: nn.Module | dict | None = None,
          loss: Callable | None = None, metrics: Callable | Sequence[Callable] | dict | None = None,
          task: Task | str | None = None, output: str | Path | None = None, overwrite: bool = False,
          resume: str | Path | None = None,
          trust_checkpoint: bool = False, overrides: dict[str, Any] | Sequence[str] | None = None,
          **kw_overrides: Any) -> TrainResult:
    """Fine-tune as a recipe says; return the run directory and per-epoch metrics.

    recipe: a YAML path, a shipped recipe name, a dict, or a RecipeConfig.
    train_data / val_data / test_data: optional, in place of the recipe's data.train / val / test: a
        Hugging Face `Dataset`, a list of (image path, label) pairs, or any map-style dataset yielding
        (PIL image, CHW tensor or array, label). Labels are class names, or class indices with
        class_names given (or a `.classes` / `.class_names` attribute on the dataset).
    Overrides: `train(r, **{"optim.lr": 1e-3})`, `train(r, optim={"lr": 1e-3})` or `train(r, optim__lr=1e-3)`.
    resume: a run directory to continue; its saved recipe is used. "auto" with `output`: resume it when it
        holds an interrupted run, else train there from the start (a requeued job needs no edit).
    trust_checkpoint: resume from a checkpoint that has no checksum manifest (refused otherwise).
    Plug-ins (training/plugins.py): `model`, an nn.Module to logits, trained in place (a dict: the model section);
        `loss`, (logits, targets) -> scalar; `metrics`, (logits, targets) -> number on val, as val_<name>;
        `task`, a finetune.tasks.Task of one's own in place of the recipe's (a string: the recipe's `task`).
    """
    plugins, kw_overrides = plugins_from_arguments(model, loss, metrics, kw_overrides, task)
    items = {**flatten_overrides(overrides), **keyword_overrides("train", kw_overrides)}
    items.update(plugins.recipe_overrides(items))
    config, run_dir = resolve_run(recipe, items, output, overwrite, resume, train_data is not None,
                                  val_data is not None, test_data is not None)
    run_dir.trust_checkpoint = trust_checkpoint
    splits = build_splits(config.data, config.train.seed, train_data, val_data, class_names, test_data,
                          task=plugins.task or build_task(config))
    require_batch_fits(config.train.batch_size, splits.sizes()["train"])  # known once the data is read
    if config.data.on_bad_image == "error":
        from .data.checkdata import require_readable  # decodes every image: only when asked

        require_readable(splits)
    # The run owns its directory from here to the end, before the session is built: a second run into it
    # is refused, and a default name is taken now, before the other processes adopt it (rundir/folder.py).
    with run_dir.owned(), flush_denormals():
        return TrainResult(**run_loop(config, run_dir, splits, plugins=plugins))


def resolve_run(recipe: RecipeLike | None, overrides: dict[str, Any] | Sequence[str] | None = None,
                output: str | Path | None = None, overwrite: bool = False, resume: str | Path | None = None,
                in_memory_train: bool = False, in_memory_val: bool = False,
                in_memory_test: bool = False) -> tuple[RecipeConfig, RunDir]:
    """The checked config and the run directory a `train` call would use; reads, never writes. (With
    several processes, each one resolves its own and the loop adopts the main process's choice.)"""
    items = flatten_overrides(overrides)
    if resume == "auto":
        resume, overwrite = _auto_resume(output, overwrite)
    if resume is not None:
        run_dir = RunDir.for_resume(resume)
        config = load_recipe(run_dir.saved_recipe())
        if recipe is not None or items:
            asked = resolve(recipe or run_dir.saved_recipe(), items, in_memory_train, in_memory_val, in_memory_test)
            _check_same(asked, config, run_dir)
    else:
        config = resolve(recipe, items, in_memory_train, in_memory_val, in_memory_test)
        run_dir = RunDir.for_new_run(output, config.model.backbone, overwrite)
    return config, run_dir


def _auto_resume(output: str | Path | None, overwrite: bool) -> tuple[Path | None, bool]:
    """resume="auto" (a requeued job's one command): resume `output` when it holds a run with a checkpoint,
    start it over when it holds a run that ended before its first checkpoint, else start fresh there."""
    if output is None:
        raise FinetuneError("--resume auto needs --output DIR: the folder the job trains into and, when it was "
                            "interrupted, resumes from.")
    folder = Path(output).expanduser()
    is_run = (folder / MARKER_NAME).is_file()
    if is_run and any((folder / name).is_dir() for name in (CHECKPOINT_NAME, CHECKPOINT_NAME + ".old")):
        return folder, False
    return None, overwrite or is_run


def plan(recipe: RecipeLike, overrides: dict[str, Any] | Sequence[str] | None = None, *,
         model: nn.Module | dict | None = None, **kw_overrides: Any) -> Plan:
    """The parameter-group plan a recipe would train with (no weights loaded); `model`: as `train` takes it."""
    plugins, kw_overrides = plugins_from_arguments(model, None, None, kw_overrides)
    items = {**flatten_overrides(overrides), **keyword_overrides("plan", kw_overrides)}
    config = resolve(recipe, {**items, **plugins.recipe_overrides(items)})
    splits = open_data(config)
    network = plugins.model if plugins.model is not None else build_model(
        dataclasses.replace(config.model, pretrained=False), len(splits.class_names), lambda _: None,
        config.data.image_size)
    return build_plan(network, config.optim, config.freeze, config.model.head)


def check_data(recipe: RecipeLike, overrides: dict[str, Any] | Sequence[str] | None = None,
               **kw_overrides: Any) -> dict:
    """What `finetune check-data` reports on a recipe's data: per split class counts, imbalance, unreadable
    files, mode and size outliers, duplicates and leakage across splits; "trainable" False when it cannot
    train. Decodes every image once; trains nothing and writes nothing."""
    from .data.checkdata import check_data as run_check

    config = resolve(recipe, {**flatten_overrides(overrides), **keyword_overrides("check_data", kw_overrides)})
    report = run_check(config.data, config.train.seed, task=build_task(config))
    if problem := batch_size_problem(config.train.batch_size, report["splits"]["train"]["images"]):
        report["errors"].append(problem)
        report["trainable"] = False
    return report


def lr_find(recipe: RecipeLike, overrides: dict[str, Any] | Sequence[str] | None = None, *,
            output: str | Path | None = None, start: float = 1e-7, end: float = 10.0, steps: int = 100,
            epoch: int = 0, model: nn.Module | dict | None = None, loss: Callable | None = None,
            **kw_overrides: Any) -> LRFindResult | None:
    """The LR range test on a recipe: sweeps optim.lr (every group keeps its ratio) and suggests a value.
    Writes lr_find.png and lr_find.json into `output`, a new folder (default runs/<time>-<backbone>-lr-find).
    `epoch` picks the unfreezing phase to sweep (the one that epoch trains in). `model`, `loss`: as in `train`."""
    plugins, kw_overrides = plugins_from_arguments(model, loss, None, kw_overrides)
    items = {**flatten_overrides(overrides), **keyword_overrides("lr_find", kw_overrides)}
    config = resolve(recipe, {**items, **plugins.recipe_overrides(items)})
    if config.optim.name == "lbfgs":
        raise FinetuneError("lr-find sweeps a learning rate, but optim.name=lbfgs finds its own steps by line search; "
                            "there is nothing to sweep. Leave optim.lr at 1 for lbfgs, or sweep for adamw or sgd.")
    if not 0 <= epoch < config.train.epochs:
        raise FinetuneError(f"lr-find: --epoch {epoch} is outside the recipe's epochs 0..{config.train.epochs - 1}.")
    if output is None:
        folder = RunDir.for_new_run(None, f"{config.model.backbone}-lr-find").path
    else:
        folder = Path(output).expanduser()
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise FinetuneError(f"lr-find --output {folder}: it already exists and is not an empty folder (it may "
                                "be a training run, which lr-find never writes into); choose a new folder.")
    splits = open_data(config)
    require_batch_fits(config.train.batch_size, splits.sizes()["train"])
    with flush_denormals():
        return find_lr(config, splits, folder, Sweep(start, end, steps, epoch), plugins=plugins)


def evaluate(run: str | Path, data: str | Dataset | Sequence, *, output: str | Path | None = None,
             class_names: Sequence[str] | None = None, batch_size: int = 64,
             task: Task | None = None) -> EvalResult | None:
    """Score a finished run's exported model on labelled data, writing the report into a new folder (default
    RUN/eval-<data>-<time>; nothing of the run is touched): metrics.json, confusion_matrix.png,
    reliability.png, mistakes.png and predictions.csv; another task's report is its own (Task.evaluate:
    label sets get mAP and F1 at the run's threshold, numbers MAE, RMSE, R² and predicted_vs_true.png).
    `data`: a source string (folder, manifest, hf:, torchvision:, sklearn:digits) or a Python dataset as
    `train` takes; its classes are matched to the run's by name. Integer labels name classes through
    `class_names`, the dataset's `.classes`, or else the run's own list. `task`: the task of one's own the
    run trained with. Under a multi-process launch each process scores a share; the main process writes
    and returns the result, the others return None."""
    from .data.loaders import Transformed
    from .reporting.evaluation import default_output
    from .training.evalrun import eval_config, open_eval_data, predict_dataset

    try:  # every process checks the same things: under a launch, the main process alone reports a mistake
        run = Path(run).expanduser()
        if batch_size < 1:
            raise FinetuneError(f"eval: --batch-size {batch_size}: give a number of images, 1 or more.")
        if not run.is_dir():
            raise FinetuneError(f"{run} is not a folder; give the run directory that `finetune train` wrote.")
        predictor = load(run, device="cpu", task=task)
        config = eval_config(run, str(data) if isinstance(data, (str, Path)) else "python:data")
        samples = open_eval_data(data, config, predictor.label_names, class_names, predictor.task)
        samples = predictor.task.match(samples, predictor.label_names, str(run))
        if output is not None:
            folder = Path(output).expanduser()
            if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
                raise FinetuneError(f"--output {folder} already exists and is not an empty folder; eval never "
                                    "writes over files. Choose a new folder, or leave --output out for "
                                    "RUN/eval-<data>-<time>.")
    except FinetuneError as e:
        raise FinetuneError(str(e), raised_on_every_process=True) from None
    view = Transformed(samples, None, predictor.transform, "eval", substitute=False)
    results = predict_dataset(config, predictor.model, view, batch_size, predictor.task)
    if results is None:
        return None
    folder = Path(output).expanduser() if output is not None else default_output(run, samples.origin)
    about = {"run": str(run.resolve()), "data": samples.origin}
    report, summary = predictor.task.evaluate(folder, results, view, predictor.label_names, about)
    return EvalResult(str(folder), report, summary)


def export(run_dir: str | Path, format: str = "onnx", output: str | Path | None = None,
           dynamic_batch: bool = False) -> ExportResult:
    """Write a run's exported model as ONNX (`format="onnx"`, needs the `export` extra) or TorchScript
    (`"torchscript"`), and check the file before returning: its logits on a few images must match the
    PyTorch model's within 1e-4 (`result.max_abs_diff`). Default file: model.onnx / model.torchscript.pt
    in the run directory. `dynamic_batch`: the file takes any batch size (else batch size 1)."""
    return export_run(run_dir, format, output, dynamic_batch)


def open_data(config: RecipeConfig) -> Splits:
    return build_splits(config.data, config.train.seed, task=build_task(config))


def _check_same(asked: RecipeConfig, saved: RecipeConfig, run_dir: RunDir) -> None:
    a, s = recipe_to_dict(asked), recipe_to_dict(saved)
    diffs = [f"{sec}.{k}: saved {s[sec][k]!r}, given {a[sec][k]!r}"
             for sec in s if isinstance(s[sec], dict) for k in s[sec] if s[sec][k] != a[sec][k]]
    diffs += [f"{key}: saved {s[key]!r}, given {a[key]!r}" for key in s if not isinstance(s[key], dict)
              and s[key] != a[key]]  # `task`, a key of the recipe itself
    if diffs:
        raise FinetuneError(f"--resume {run_dir.path} continues the saved recipe, but the recipe given differs: "
                            f"{'; '.join(diffs[:5])}. Resume without a recipe or overrides, or start a new run.")

