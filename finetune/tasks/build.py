"""Which task a run has: the recipe's `task` key made a `Task` (`build_task`), and an export's config.json
made one again for `finetune.load` (`load_task`), with what the export recorded (a threshold, a regression's
standardisation)."""

from __future__ import annotations

from typing import Mapping

from ..errors import FinetuneError
from ..recipe.schema import RecipeConfig
from .base import Task
from .multi_label import MultiLabel
from .regression import Regression
from .single_label import SingleLabel


def build_task(config: RecipeConfig) -> Task:
    """The recipe's task, not yet fitted to the data (Task.fit)."""
    if config.task == "multi_label":
        return MultiLabel(config.train.threshold)
    if config.task == "regression":
        return Regression(config.train.loss or "mse")
    return SingleLabel()


def load_task(config: Mapping, where: str = "the export", task: Task | None = None) -> Task:
    """The task of an exported model from its config.json (model/export.py writes what Task.export_config
    returns). A task of one's own cannot be rebuilt from it: it is passed again as `task`, and takes what
    the export recorded (a regression's standardisation) from config.json."""
    name = config.get("task", SingleLabel.name)
    built_in = {t.name: t for t in (SingleLabel, MultiLabel, Regression)}
    try:
        if task is not None:
            return task.from_export(dict(config))
        if name in built_in:
            return built_in[name]().from_export(dict(config))
    except (KeyError, TypeError, ValueError) as e:
        raise FinetuneError(f"{where}'s config.json says task {name!r} but lacks what it needs ({type(e).__name__}: "
                            f"{e}); copy the run directory again from where it was trained.") from None
    raise FinetuneError(f"{where} was trained with a task of your own ({name!r}), which finetune cannot rebuild from "
                        "config.json; pass it again: finetune.load(RUN_DIR, task=YourTask()).")
