"""The run directory: where a run's recipe, plan, metrics, plots, export and checkpoints live (the
docs/after-training.md lists them; main process only), and which run owns it. The epoch records in
metrics.jsonl are records.py's.

Ownership. `finetune.train` claims the folder before the session is built (`owned()`): a default name
`runs/<time>-<backbone>` is taken by `os.mkdir`, which fails for the second of two runs started in the
same second (it takes `-2`, `-3`, ...), and an exclusive lock on `.finetune.lock` (atomic.py) is held
until the run ends: a second run into the folder is refused, naming the first one's host and pid. A
lock file left by a kill locks nothing (the OS released it); the next run reports it and takes over
(a resume also removes what the kill left half-written). Only the launch's main process claims; the
others adopt its folder (loop.py). Nothing of the run is written until `create()`, which the loop calls
only after the recipe, data and model were checked and built (a run that fails before leaves no folder);
it writes the marker `.finetune-run.json` (run id, time, host, pid, version). A non-empty folder is never
reused without `overwrite`, which replaces only a folder with the marker and removes only what a run
writes (`RUN_OUTPUTS`): a user's files stay.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import json
import os
import re
import shutil
import signal
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from ..atomic import LockHeld, lock_holder, release_lock, take_lock, this_process, write_atomic
from ..data.badimages import DATA_REPORT_NAME, LOG_GLOB
from ..errors import FinetuneError, Stopped
from ..model.environment import ENVIRONMENT_NAME
from ..model.export import CONFIG_NAME, WEIGHTS_NAME
from ..recipe.load import dump_recipe
from ..recipe.schema import RecipeConfig
from ..reporting.evaluation import CONFUSION_NAME, RELIABILITY_NAME, VAL_REPORT_NAME
from ..reporting.review import HARD_EXAMPLES_JSON, HARD_EXAMPLES_PNG, TEST_METRICS_NAME
from ..tasks import TASK_RUN_FILES
from .records import DAMAGED_METRICS_NAME, METRICS_NAME, append_record, keep_records_through, read_metrics_file

RECIPE_NAME = "recipe.yaml"
PLAN_NAME = "plan.json"
CURVES_NAME = "curves.png"
CHECKPOINT_NAME = "checkpoint"
STATE_NAME = "trainer_state.json"  # in a checkpoint: the training state (training/checkpoint.py), which listing reads
CARD_NAME = "README.md"  # the model card (card.py)
MARKER_NAME = ".finetune-run.json"
LOCK_NAME = ".finetune.lock"
# All a run writes, so all --overwrite removes (and a kill's leftovers: skip logs, temporary files).
RUN_OUTPUTS = {MARKER_NAME, RECIPE_NAME, PLAN_NAME, METRICS_NAME, DAMAGED_METRICS_NAME, CURVES_NAME, WEIGHTS_NAME,
               CONFIG_NAME, DATA_REPORT_NAME, HARD_EXAMPLES_JSON, HARD_EXAMPLES_PNG, TEST_METRICS_NAME, "tensorboard",
               VAL_REPORT_NAME, "val_" + CONFUSION_NAME, "val_" + RELIABILITY_NAME, *TASK_RUN_FILES,
               CARD_NAME, ENVIRONMENT_NAME,
               *(CHECKPOINT_NAME + end for end in ("", ".old", ".tmp", ".damaged"))}
_LEFTOVER = re.compile(r"\.export\.tmp\d+|\.(?P<stem>.+)\.tmp\d+(?P<suffix>\.[^.]*)?")
# The variables launchers give a process's global rank in (torchrun and Accelerate, then MPI).
_RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
Log = Callable[[str], None]


def ctrl_c_outside_training(run_path: Path, resumable: bool) -> Stopped:
    """A Ctrl-C while a run sets up or scores (no checkpoint is written then), saying what to run next:
    `--resume` only where the folder holds the run (`resumable`), else the same command again."""
    if resumable:
        return Stopped(f"stopped by SIGINT outside the training updates (while setting up or scoring), so no "
                       f"checkpoint was written now; {run_path} holds the run as its last checkpoint left it. Continue "
                       f"with `finetune train --resume {run_path}`.", signal.SIGINT, raised_on_every_process=True)
    return Stopped("stopped by SIGINT while setting up, before the run wrote anything: nothing was written. To start "
                   "the run, run the same command again.", signal.SIGINT, raised_on_every_process=True)


def is_launch_main_process() -> bool:
    """True in the process that owns the run directory: the only one of a launch, or its rank 0. Known
    before Accelerate starts, from the launcher's variables."""
    return next((int(os.environ[v]) for v in _RANK_VARIABLES if v in os.environ), 0) == 0


class RunDir:
    def __init__(self, path: Path, resuming: bool = False, overwrite: bool = False, default_name: Path | None = None):
        self.path, self.resuming, self.overwrite = Path(path), resuming, overwrite
        self.run_id: str | None = None
        self.damaged_checkpoint: Path | None = None  # found on resume; set aside at the next save (checkpoint.py)
        self.trust_checkpoint = False  # --trust-checkpoint: resume from a checkpoint without a manifest
        self._default_name = default_name  # runs/<time>-<backbone>, still to be claimed
        self._made = False  # this process made the folder: removed again if the run ends before writing to it
        self._lock: int | None = None  # the open lock file, while this process owns the folder

    def __getstate__(self) -> dict:
        """The copy the loop sends to the other processes: ownership stays with the main process."""
        return {**self.__dict__, "_lock": None}

    @classmethod
    def for_new_run(cls, output: str | Path | None, backbone: str, overwrite: bool = False) -> "RunDir":
        """`output`, or a new timestamped folder under runs/ (claimed later). Refuses a non-empty folder
        unless overwrite, a folder finetune did not create even then, and a folder another run owns.
        Writes nothing. The other processes of a launch skip the checks: they adopt the main process's choice."""
        if output is None:
            base = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{backbone.replace('/', '_').replace(':', '_')}"
            return cls(next(p for p in _names(base) if not p.exists()).resolve(), default_name=base.resolve())
        path = Path(output).expanduser()
        if not is_launch_main_process():
            return cls(path, overwrite=overwrite)
        if path.exists() and not path.is_dir():
            raise FinetuneError(f"--output {path} is a file; give a directory for the run.")
        if path.is_dir():
            _refuse_if_in_use(path)
            _check_reusable(path, overwrite)
        return cls(path, overwrite=overwrite)

    @classmethod
    def for_resume(cls, path: str | Path) -> "RunDir":
        path = Path(path).expanduser()
        if is_launch_main_process():
            _refuse_if_in_use(path)
        if not (path / RECIPE_NAME).is_file():
            raise FinetuneError(f"--resume {path}: not a run directory (no {RECIPE_NAME} inside); give the folder "
                                "that an interrupted `finetune train` was writing.")
        return cls(path, resuming=True)

    # ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def owned(self, log: Log = print) -> Iterator["RunDir"]:
        """Own the folder for a whole run, however it ends (the launch's main process claims it)."""
        if is_launch_main_process():
            self.claim(log)
        try:
            yield self
        except KeyboardInterrupt:  # outside the training updates (they stop gracefully): say what to run next
            raise ctrl_c_outside_training(self.path, resumable=(self.path / RECIPE_NAME).is_file()) from None
        finally:
            self.release()

    def claim(self, log: Log = print) -> None:
        """Make the folder (a default name atomically), take its lock, and check it again now that no other
        run can change it. Raises FinetuneError when another run owns it; reports a lock left by a kill."""
        if self._lock is not None:
            return
        self._make_folder()
        try:
            try:
                self._lock, previous = take_lock(self.path / LOCK_NAME)
            except LockHeld as held:
                raise FinetuneError(_in_use(self.path, held.holder)) from None
            if previous:
                log(f"note: {self.path} was last owned by {_describe(previous)}, which ended without releasing it "
                    "(killed, or its machine stopped); the lock is free, so this run takes the folder over.")
            self._check_folder()
            if self.resuming:  # what a kill left half-written: its writer ended, since this process holds the lock
                left = sorted(n for n in os.listdir(self.path) if _LEFTOVER.fullmatch(n) and _written_by_a_run(n))
                for entry in (self.path / n for n in left):  # this pid's too: a new container's pids repeat
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                if left:
                    log(f"note: removed {', '.join(left)} from {self.path}: left half-written by an interrupted run.")
                if not (self.path / MARKER_NAME).is_file():
                    self._write_marker()  # a run of an older finetune: marked now, so --overwrite may replace it
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the folder up: the lock file goes, and so does a folder this process made but never wrote to."""
        lock, self._lock = self._lock, None
        if lock is not None:
            release_lock(self.path / LOCK_NAME, lock)
            if self._made:
                with contextlib.suppress(OSError):
                    self.path.rmdir()  # only succeeds when empty

    def create(self) -> None:
        """The run's first write: the folder (claimed now unless `finetune.train` claimed it already), the
        previous run's files removed with `overwrite`, and the marker."""
        if self._lock is None:  # loop.train called directly: the folder is made and checked, but not locked
            self._make_folder()
            self._check_folder()
        if self.overwrite:
            for entry in self.path.iterdir():
                if entry.name != LOCK_NAME and _written_by_a_run(entry.name):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self._write_marker()

    def _make_folder(self) -> None:
        if self._default_name is not None:
            self.path, self._made = _claim_name(self._default_name), True
            self._default_name = None
        elif not self.path.exists():
            with contextlib.suppress(FileExistsError):
                self.path.mkdir(parents=True)
                self._made = True

    def _check_folder(self) -> None:
        """What for_new_run / for_resume checked, again: another run may have finished here since."""
        if self.resuming:
            if not (self.path / RECIPE_NAME).is_file():
                raise FinetuneError(f"--resume {self.path}: not a run directory (no {RECIPE_NAME} inside).")
        elif not self._made:
            _check_reusable(self.path, self.overwrite)

    def _write_marker(self) -> None:
        self.run_id = uuid.uuid4().hex
        me = this_process()
        write_atomic(self.path / MARKER_NAME, json.dumps({"run_id": self.run_id, "created": me.pop("started"), **me,
                                                           "finetune_version": _version()}, indent=2))

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
        append_record(self.path, record)

    def read_metrics(self) -> list[dict]:  # a line that is no record (cut off by a full disk or a copy) is skipped
        return read_metrics_file(self.path / METRICS_NAME)[0]

    def keep_metrics_through(self, epoch: int, log: Log = print) -> list[dict]:
        return keep_records_through(self.path, epoch, log)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def curves(self) -> Path:
        return self.path / CURVES_NAME


def _written_by_a_run(name: str) -> bool:
    if name in RUN_OUTPUTS or fnmatch.fnmatch(name, LOG_GLOB):
        return True
    leftover = _LEFTOVER.fullmatch(name)
    return bool(leftover) and (leftover["stem"] is None or leftover["stem"] + (leftover["suffix"] or "") in RUN_OUTPUTS)


def _check_reusable(path: Path, overwrite: bool) -> None:
    """A folder a new run may write into: empty (a lock file left by a kill aside), or with `overwrite`
    a previous run's folder."""
    if not any(entry.name != LOCK_NAME for entry in path.iterdir()):
        return
    if not overwrite:
        raise FinetuneError(f"--output {path} already holds files; choose a new directory, add --overwrite "
                            f"to replace a previous run there, or --resume {path} to continue it.")
    if not (path / MARKER_NAME).is_file():
        raise FinetuneError(f"--overwrite only replaces a previous run directory, and {path} was not created by "
                            f"finetune (it has no {MARKER_NAME}; a {RECIPE_NAME} alone does not make a run), so it "
                            "is left alone. Choose another --output. (A run of an older finetune has no marker either: "
                            "delete it yourself, or --resume it once, which marks it.)")


def _names(base: Path) -> Iterator[Path]:
    yield base
    yield from (base.with_name(f"{base.name}-{n}") for n in itertools.count(2))


def _claim_name(base: Path) -> Path:
    """The first of base, base-2, base-3, ... that this call creates: os.mkdir fails if another run got it."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for path in _names(base):
        with contextlib.suppress(FileExistsError):
            path.mkdir()
            return path


def _refuse_if_in_use(folder: Path) -> None:
    if (holder := lock_holder(folder / LOCK_NAME)) is not None:
        raise FinetuneError(_in_use(folder, holder))


def _in_use(folder: Path, holder: dict) -> str:
    return (f"{folder} is in use by another finetune run ({_describe(holder)}); two runs in one directory "
            "would mix their files. Wait for it to finish (or stop it), or choose another --output.")


def _describe(holder: dict) -> str:
    return (f"pid {holder['pid']} on {holder.get('host', '?')}, since {holder.get('started', '?')}" if "pid" in holder
            else "a process that has not yet written its name")


def _version() -> str:
    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version("finetune")
    return "unknown"
