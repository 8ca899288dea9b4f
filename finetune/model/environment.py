"""`environment.json`: what produced a run's exported weights, so a result can be traced and repeated.

Versions of Python and the libraries a run depends on, the devices (the one the model trained on and
what the machine has), the number of processes, the command line, and the git commit of the working
directory (with whether it had uncommitted changes) when it is inside a git repository. It is written
with every export, by the process that wrote the weights: after a `--resume` it describes the resumed
process, which is the one that produced the weights now in the folder.

Library versions are those of the imported modules (torch's carries its CUDA build), else of the installed
packages, so nothing is imported to read them.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from ..atomic import write_atomic

ENVIRONMENT_NAME = "environment.json"
PACKAGES = ("finetune", "torch", "torchvision", "timm", "accelerate", "datasets", "safetensors", "huggingface_hub")


def save_environment(run_dir: Path, device: torch.device | str) -> None:
    """Write environment.json into `run_dir`; `device` is where the exported model trained."""
    record = {"written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **describe_environment(),
              "training_device": str(device), "processes": process_count()}
    write_atomic(Path(run_dir) / ENVIRONMENT_NAME, json.dumps(record, indent=2))


@functools.lru_cache(maxsize=None)
def describe_environment() -> dict:
    """The parts that stay the same for the whole process (read once: an export happens every better epoch)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: package_version(name) for name in PACKAGES},
        "devices": devices(),
        "command_line": command_line(sys.argv),
        "argv": list(sys.argv),
        "python_executable": sys.executable,
        "working_directory": os.getcwd(),
        "git": git_state(Path.cwd()),
    }


def command_line(argv: list[str]) -> str:
    """The command as typed: `python -m finetune ...` or `finetune ...` rather than the path of __main__.py."""
    first = Path(argv[0]) if argv and argv[0] else None
    if first is not None and first.name == "__main__.py" and first.parent.name == "finetune":
        argv = ["python", "-m", "finetune", *argv[1:]]
    elif first is not None and first.name == "finetune":
        argv = ["finetune", *argv[1:]]
    return shlex.join(argv)


def package_version(name: str) -> str | None:
    """The version of a package as imported (torch's includes its build, e.g. +cu130), else as installed."""
    version = getattr(sys.modules.get(name), "__version__", None)
    if version is None:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
    return str(version)


def devices() -> dict:
    cuda = torch.cuda.is_available()
    return {"cpu_count": os.cpu_count(), "cuda": torch.version.cuda if cuda else None,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}


def process_count() -> int:
    """Processes the run trained with: the process group's size, else the launcher's WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def git_state(folder: Path) -> dict | None:
    """{"commit", "dirty"} of the git repository `folder` is in; None outside one or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git, not a repository, no commit yet, or too slow
        return None
    return {"commit": commit, "dirty": dirty}
