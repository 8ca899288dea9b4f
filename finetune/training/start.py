"""Starting a run: the Accelerator for this machine and launcher, and the session built with it, prepared
by Accelerate with identical initial weights on every process. The loop, the LR finder, the benchmark and
`finetune eval` all start here, so they run the same precision, devices and input pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed

from ..data.splits import Splits
from ..recipe.schema import RecipeConfig
from .inputs import Place
from .launch import check_process_count, check_processes_per_machine
from .plugins import Plugins
from .runtime import resolve_precision
from .session import Session, build_session
from .tracking import tracker_settings

Log = Callable[[str], None]


def build_accelerator(config: RecipeConfig, run_dir: Path | None = None) -> tuple[Accelerator, str]:
    """The Accelerator for this machine and launcher, and the precision it runs (trackers: into run_dir)."""
    cuda = torch.cuda.is_available()
    precision = resolve_precision(config.train.precision, cuda)
    if cuda:
        check_processes_per_machine(torch.cuda.device_count())
    forget_accelerator_state()
    accelerator = Accelerator(
        # Without cpu=True, torchrun on a machine without GPUs would start N unrelated single-process jobs;
        # with it, the processes form one gloo group.
        cpu=not cuda,
        mixed_precision={"fp32": "no"}.get(precision, precision),
        dynamo_backend="inductor" if config.train.compile else "no",  # torch.compile, applied by prepare()
        **tracker_settings(config, run_dir),  # train.log_with: Accelerate's own trackers (tracking.py)
        # Shuffling seeded by (seed, epoch): every process agrees on the order, and resume repeats it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.train.seed,
                                                  non_blocking=cuda),
    )
    check_process_count(accelerator.num_processes)
    if cuda:
        torch.backends.cudnn.benchmark = True  # training batches have one fixed shape: tune kernels once
    return accelerator, precision


def forget_accelerator_state() -> None:
    """Accelerate keeps its settings per Python process and refuses different ones later, but a second
    run in one process (a notebook, the tests) may ask for another precision. Accelerate has no public
    way to start over; these resets are the ones its own test suite uses (tests/test_loop.py runs two
    precisions in one process). The process group itself is kept."""
    AcceleratorState._reset_state()
    GradientState._reset_state()


def start_session(config: RecipeConfig, splits: Splits, accelerator: Accelerator, precision: str,
                  skip_log_folder, log: Log, plugins: Plugins = Plugins()) -> Session:
    """The run's objects, built once with identical initial weights on every process and prepared for it."""
    set_seed(config.train.seed)
    return build_session(config, splits, Place.of(accelerator), precision, skip_log_folder, log, plugins,
                         accelerator.prepare)
