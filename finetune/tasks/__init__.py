"""Tasks: what differs between one class per image (single_label.py), any number of labels per image
(multi_label.py, its label sets in label_sets.py and reports in multi_label_reports.py) and a number per
image (regression.py, numbers.py, regression_reports.py), each a `Task` (base.py) that the loop, the data
pipeline, reporting and the export call instead of asking which task a run has. build.py picks the
recipe's task, or rebuilds an export's from its config.json.

May import `finetune.recipe`, `finetune.data` and `finetune.reporting`; the model and training layers import
it, never the other way round.
"""

from .base import Task
from .build import build_task, load_task
from .multi_label import MultiLabel
from .regression import Regression
from .single_label import SingleLabel

# What the built-in tasks' reports add to a run directory: the run directory knows its files without asking
# which task wrote them.
TASK_RUN_FILES = frozenset(name for task in (SingleLabel, MultiLabel, Regression) for name in task.run_files)

__all__ = ["Task", "SingleLabel", "MultiLabel", "Regression", "build_task", "load_task", "TASK_RUN_FILES"]
