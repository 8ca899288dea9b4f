"""`finetune runs`: one line per run directory under a folder, to compare runs and see which still go on.

Read only, and cheap enough for hundreds of runs: each run's recipe.yaml (as plain YAML: its data may be
long gone; bounded as every file finetune did not just write, recipe/userfiles.py), metrics.jsonl, test_metrics.json and the checkpoint's small trainer_state.json (never the
checkpoint's tensors or their checksums). A run directory is a folder with the marker `.finetune-run.json`,
a recipe.yaml with metrics or a checkpoint (a run of a finetune from before the marker), or a held lock
(a run still setting up, before it wrote anything).

Status. running: its `.finetune.lock` is held; the OS releases the lock of a killed process, so a lock
file left behind says nothing. finished: every epoch of the recipe is done, or early stopping ended the
run (its last metrics record says so). interrupted: neither (it can be continued with `finetune train
--resume DIR`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..atomic import lock_holder
from ..errors import FinetuneError
from ..recipe.userfiles import open_regular, read_yaml_file
from ..reporting.metrics import percent
from ..reporting.review import TEST_METRICS_NAME
from .folder import CHECKPOINT_NAME, LOCK_NAME, MARKER_NAME, RECIPE_NAME, STATE_NAME, RunDir
from .records import METRICS_NAME

STATUSES = ("running", "interrupted", "finished")
# Column -> how it sorts. Accuracies sort highest first, everything else in ascending order; unknown
# values (a run with no epoch yet) always come last.
SORT_COLUMNS = {"name": False, "backbone": False, "data": False, "epochs": False, "best": True, "final": True,
                "test": True, "time": False, "status": False}


@dataclass(frozen=True)
class RunSummary:
    path: str
    name: str  # the path relative to the folder listed
    backbone: str | None
    data: str | None  # the recipe's data.train
    epochs_done: int
    epochs_planned: int | None
    best_val_acc: float | None  # the best epoch's, model or its moving average: what was exported
    final_val_acc: float | None  # the last epoch's, the better of the model and its average
    test_acc: float | None  # the exported epoch on data.test, once training finished
    seconds: float | None  # the training epochs' time summed (setup, validation and pauses left out)
    status: str
    holder: dict | None = None  # who holds the lock (host, pid, started) while running

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def runs(folder: str | Path = "runs", sort: str = "name") -> list[RunSummary]:
    """Every run directory in `folder` (itself, or any folder below it), summarised; sorted by a column of
    `SORT_COLUMNS`. Reads, never writes."""
    folder = Path(folder).expanduser()
    if sort not in SORT_COLUMNS:
        raise FinetuneError(f"runs: cannot sort by {sort!r}; choose one of {', '.join(SORT_COLUMNS)}.")
    if not folder.is_dir():
        raise FinetuneError(f"runs: {folder} is not a folder; give the folder your runs are in (default: runs).")
    found = [summarise(path, path.relative_to(folder).as_posix() if path != folder else path.name)
             for path in _run_dirs(folder)]
    known = [r for r in found if _sort_key(r, sort) is not None]
    known.sort(key=lambda r: _sort_key(r, sort), reverse=SORT_COLUMNS[sort])
    return known + [r for r in found if _sort_key(r, sort) is None]


def summarise(path: Path, name: str | None = None) -> RunSummary:
    """One run directory's line: what its recipe planned, what its files say was done, and its status."""
    recipe = _read_yaml(path / RECIPE_NAME)
    model, data, train = (recipe.get(k) if isinstance(recipe.get(k), dict) else {} for k in ("model", "data", "train"))
    planned = train.get("epochs") if type(train.get("epochs")) is int else None
    records = RunDir(path).read_metrics()
    accs = [_val_acc(r) for r in records]
    done = _checkpoint_epoch(path)
    if done is None:  # no checkpoint (before the first epoch, or deleted to save space): the metrics tell
        done = max((r["epoch"] for r in records), default=0)
    holder = lock_holder(path / LOCK_NAME)
    ended = planned and done >= planned or bool(records) and records[-1].get("stopped_early") is True  # early stop
    status = "running" if holder is not None else "finished" if ended else "interrupted"
    seconds = [r["epoch_seconds"] for r in records if _is_number(r.get("epoch_seconds"))]
    test = _read_json(path / TEST_METRICS_NAME).get("test_acc")
    return RunSummary(str(path), name or path.name, _text(model.get("backbone")), _text(data.get("train")), done,
                      planned, max((a for a in accs if a is not None), default=None), accs[-1] if accs else None,
                      test if _is_number(test) else None, round(sum(seconds), 1) if seconds else None, status,
                      holder)


def format_runs(summaries: list[RunSummary], folder: str | Path = "runs") -> str:
    """The table `finetune runs` prints: one line per run."""
    if not summaries:
        return f"no runs in {folder}"
    header = ["run", "backbone", "data", "epochs", "best", "final", "test", "time", "status"]
    rows = [[r.name, r.backbone or "?", r.data or "?", f"{r.epochs_done}/{r.epochs_planned or '?'}",
             percent(r.best_val_acc), percent(r.final_val_acc), percent(r.test_acc), _duration(r.seconds),
             r.status + (f" (pid {r.holder['pid']})" if r.holder and "pid" in r.holder else "")] for r in summaries]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def _run_dirs(folder: Path) -> list[Path]:
    """Run directories at or below `folder`; a run's own subfolders (checkpoints, eval reports) are not searched."""
    found = []
    for root, dirs, _ in os.walk(folder):
        if _is_run(Path(root)):
            found.append(Path(root))
            dirs.clear()
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return found


def _is_run(path: Path) -> bool:
    if (path / MARKER_NAME).is_file():
        return True
    if (path / RECIPE_NAME).is_file() and ((path / METRICS_NAME).is_file() or (path / CHECKPOINT_NAME).is_dir()):
        return True
    return (path / LOCK_NAME).is_file() and lock_holder(path / LOCK_NAME) is not None


def _checkpoint_epoch(path: Path) -> int | None:
    """The epoch of the newest checkpoint whose trainer state reads (the swap's two folders, newest first)."""
    for folder in (CHECKPOINT_NAME, CHECKPOINT_NAME + ".old"):
        epoch = _read_json(path / folder / STATE_NAME).get("epoch")
        if type(epoch) is int:
            return epoch
    return None


def _val_acc(record: dict) -> float | None:
    accs = [record.get(k) for k in ("val_acc", "ema_val_acc", "val_map", "ema_val_map")  # map: multi-label runs
            if _is_number(record.get(k))]
    return max(accs) if accs else None


def _sort_key(r: RunSummary, column: str):
    return {"name": r.name, "backbone": r.backbone, "data": r.data, "epochs": r.epochs_done, "best": r.best_val_acc,
            "final": r.final_val_acc, "test": r.test_acc, "time": r.seconds,
            "status": STATUSES.index(r.status)}[column]


def _read_yaml(path: Path) -> dict:
    try:
        data = read_yaml_file(path, "run recipe")  # bounded: a shared run folder may hold anything
    except FinetuneError:
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict:
    try:
        with open_regular(path) as f:  # a FIFO in its place would hang the listing
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _text(value) -> str | None:
    return None if value is None else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"
