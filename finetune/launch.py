"""`finetune train RECIPE --processes N`: start N training processes on this machine with torchrun.

A convenience, not a launcher of our own: it runs exactly `python -m torch.distributed.run --standalone
--nproc_per_node N -m finetune train RECIPE ...`, which is also what `accelerate launch --multi_gpu`
does underneath. torchrun is the one launcher that starts several processes on CPU as well as on GPUs
(`accelerate launch --cpu --num_processes N` starts one process unless MPI is set up), and its agent
stops every process as soon as one fails. Several machines: use `accelerate launch` with `accelerate
config`, or torchrun with its rendezvous options, and leave --processes out.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from .errors import FinetuneError


def without_processes_option(argv: list[str]) -> list[str]:
    """The command line minus `--processes N` / `--processes=N`, for the processes torchrun starts."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def run_processes(processes: int, argv: list[str]) -> NoReturn:
    """Replace this process with torchrun starting `processes` copies of `finetune <argv>`; never returns."""
    if "WORLD_SIZE" in os.environ:
        raise FinetuneError(f"--processes {processes} starts processes itself, but this process was already started "
                            f"by a launcher (WORLD_SIZE={os.environ['WORLD_SIZE']}); leave --processes out and let "
                            "the launcher's own option (torchrun --nproc_per_node, accelerate launch "
                            "--num_processes) set the count.")
    import torch  # here, not at import time: `finetune --help` answers without loading torch

    gpus = torch.cuda.device_count()
    if gpus and processes > gpus:
        raise FinetuneError(f"--processes {processes} asks for more processes than this machine's {gpus} GPUs; each "
                            f"process drives one GPU. Use --processes {gpus} or fewer (set train.micro_batch_size if "
                            "the batch does not fit).")
    env = dict(os.environ)
    if not gpus and "OMP_NUM_THREADS" not in env:
        # CPU processes share the cores; torchrun's default of 1 thread each would leave most of them idle.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // processes))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "finetune", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)
