"""Processes: `finetune train RECIPE --processes N` starts N training processes on this machine with
torchrun, and the loop checks that the processes a launcher started are the ones Accelerate runs.

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

from ..data.loaders import available_cores
from ..errors import FinetuneError


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
        env["OMP_NUM_THREADS"] = str(max(1, available_cores() // processes))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "finetune", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)


# The launcher's process count, in the variables and order Accelerate reads it from (torchrun, then MPI).
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_process_count(running: int) -> None:
    """The process count Accelerate runs with must be the one the launcher started: otherwise every process
    would train the whole recipe on its own, or one process would quietly do the work of N."""
    name = next((v for v in _WORLD_SIZE_VARIABLES if v in os.environ), "WORLD_SIZE")
    launched = int(os.environ.get(name, "1"))
    if launched != running:
        raise FinetuneError(f"the launcher started {launched} processes ({name}) but Accelerate runs {running}; "
                            "check `accelerate config` (or ACCELERATE_* variables), or launch with torchrun "
                            "--nproc_per_node N, which needs no configuration.")
    # `accelerate launch --num_processes N` without --multi_gpu (or with --cpu) uses its simple launcher,
    # which starts one process and expects MPI to start the rest; it sets ACCELERATE_USE_CPU always and
    # MASTER_ADDR only when several processes were asked for. Without MPI, one process would run alone.
    simple_launcher = "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ
    if running == 1 and simple_launcher and name not in os.environ:
        raise FinetuneError("`accelerate launch` was asked for several processes but started only this one (without "
                            "--multi_gpu, and always with --cpu, it leaves starting the others to MPI). On GPUs add "
                            "--multi_gpu; on CPU use `torchrun --nproc_per_node N -m finetune train ...` or "
                            "`finetune train ... --processes N`. (For one process, unset MASTER_ADDR.)")


def check_processes_per_machine(gpus: int) -> None:
    """One process drives one GPU: more processes than GPUs on a machine would fail deep inside CUDA."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > gpus:
        raise FinetuneError(f"the launcher started {local} processes on this machine, which has {gpus} GPU(s); each "
                            f"process drives one GPU. Start {gpus} (torchrun --nproc_per_node {gpus}, accelerate "
                            f"launch --num_processes {gpus}) and set train.micro_batch_size if the batch does not fit.")
