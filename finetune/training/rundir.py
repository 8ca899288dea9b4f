"""The run directory: where a run's recipe, plan, metrics, plots, export and checkpoint live.

Layout (written by the main process only):
    recipe.yaml        the fully resolved recipe (resume reads it back)
    plan.json          the parameter-group plan
    metrics.jsonl      one JSON object per finished epoch
    curves.png         loss and accuracy per epoch
    model.safetensors  + config.json: the best epoch by val accuracy, in timm's format
    checkpoint/        training state after the last finished epoch (for --resume)
    data_report.json   image counts per split and every unreadable file skipped, with its reason
    hard_examples.json + .png: the highest-loss train and val images after training (likely label errors)
    test_metrics.json  the best epoch's metrics on data.test (when given)

Nothing is written until `create()`, which the loop calls only after the recipe, data and model have
all been checked and built, and an existing non-empty directory is never reused without `overwrite`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..atomic import write_atomic
from ..errors import FinetuneError
from ..recipe.load import dump_recipe
from ..recipe.schema import RecipeConfig

RECIPE_NAME = "recipe.yaml"
PLAN_NAME = "plan.json"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
CHECKPOINT_NAME = "checkpoint"


class RunDir:
    def __init__(self, path: Path, resuming: bool = False, overwrite: bool = False):
        self.path, self.resuming, self.overwrite = path, resuming, overwrite

    @classmethod
    def for_new_run(cls, output: str | Path | None, backbone: str, overwrite: bool = False) -> "RunDir":
        """`output`, or a new timestamped folder under runs/. Refuses a non-empty folder unless overwrite."""
        if output is None:
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{backbone.replace('/', '_').replace(':', '_')}"
            path, suffix = Path("runs") / name, 2
            while path.exists():
                path, suffix = Path("runs") / f"{name}-{suffix}", suffix + 1
            return cls(path.resolve())
        path = Path(output).expanduser()
        if path.exists() and not path.is_dir():
            raise FinetuneError(f"--output {path} is a file; give a directory for the run.")
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise FinetuneError(f"--output {path} already holds files; choose a new directory, add --overwrite "
                                    f"to replace a previous run there, or --resume {path} to continue it.")
            if not (path / RECIPE_NAME).is_file():
                raise FinetuneError(f"--overwrite only replaces a previous run directory (one with {RECIPE_NAME}); "
                                    f"{path} holds other files, so it is left alone. Choose another --output.")
        return cls(path, overwrite=overwrite)

    @classmethod
    def for_resume(cls, path: str | Path) -> "RunDir":
        path = Path(path).expanduser()
        if not (path / RECIPE_NAME).is_file():
            raise FinetuneError(f"--resume {path}: not a run directory (no {RECIPE_NAME} inside); give the folder "
                                "that an interrupted `finetune train` was writing.")
        return cls(path, resuming=True)

    def create(self) -> None:
        if self.overwrite and self.path.is_dir():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------------------
    def saved_recipe(self) -> Path:
        return self.path / RECIPE_NAME

    def write_recipe(self, config: RecipeConfig) -> None:
        write_atomic(self.path / RECIPE_NAME, dump_recipe(config))

    def write_plan(self, plan_json: list[dict]) -> None:
        self.write_json(PLAN_NAME, plan_json)

    def write_json(self, name: str, data: dict | list) -> None:
        write_atomic(self.path / name, json.dumps(data, indent=2))

    def append_metrics(self, record: dict) -> None:
        """The whole file is rewritten (a few lines per epoch), so a kill never leaves half a line."""
        path = self.path / METRICS_NAME
        before = path.read_text() if path.is_file() else ""
        write_atomic(path, before + json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        path = self.path / METRICS_NAME
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def keep_metrics_through(self, epoch: int) -> list[dict]:
        """On resume: drop records of epochs after the checkpoint (an epoch that finished logging but was
        killed before its checkpoint is trained again, so it must not appear twice)."""
        records = [r for r in self.read_metrics() if r["epoch"] <= epoch]
        write_atomic(self.path / METRICS_NAME, "".join(json.dumps(r) + "\n" for r in records))
        return records

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def curves(self) -> Path:
        return self.path / CURVES_NAME

