"""The exported model: `model.safetensors` + `config.json` in timm's own format, and in a run directory
`environment.json` (environment.py) beside it; the model card that describes it is rundir/card.py's.

timm's public `save_for_hf` writes both (the config holds architecture, num_classes, label_names and the
pretrained_cfg with mean/std/input size; a task other than single-label adds what predict needs, e.g. a
threshold or the standardisation of numbers (tasks/: Task.export_config), which timm ignores),
so `timm.create_model("local-dir:RUN_DIR", pretrained=True)` rebuilds the model anywhere timm runs,
without finetune. timm writes into a scratch folder inside the
run directory; each file is then renamed into place, so a crash mid-write never leaves half an export.

timm copies the source weights' pretrained tag (`ra_in1k`) and license into the config. They are kept
only when the run started from timm's own weights (recipe.yaml says `pretrained: true`); weights from a
file or a random start are not what that tag names.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from timm.models import save_for_hf

from ..recipe.userfiles import read_yaml_file
from .custom import save_custom_export
from .environment import save_environment

WEIGHTS_NAME = "model.safetensors"
RECIPE_NAME = "recipe.yaml"  # what makes a folder a run directory (rundir/folder.py; model may not import rundir)
CONFIG_NAME = "config.json"
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
HUB_WEIGHTS_KEYS = ("tag", "license")  # what timm's pretrained_cfg says about the hub weights it describes


def save_export(model: torch.nn.Module, run_dir: Path, label_names: list[str], data_cfg: dict,
                task_config: dict | None = None) -> None:
    """Write the model's weights and timm config into `run_dir` atomically (weights first: a config
    always describes weights at least as new as itself). `task_config`: what the task records next to
    timm's keys (Task.export_config). In a run directory (one with recipe.yaml), environment.json follows,
    rewritten for these weights (the loop rewrites the model card)."""
    run_dir = Path(run_dir)
    device = next(model.parameters(), torch.empty(0)).device
    if any(not t.is_contiguous() for t in model.state_dict().values()):
        # channels_last weights: safetensors stores only contiguous tensors, and a file's layout must not
        # depend on how the run trained. The copy lives only while the files are written.
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    scratch = run_dir / f".export.tmp{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    recipe = read_yaml_file(run_dir / RECIPE_NAME, "run recipe") if (run_dir / RECIPE_NAME).is_file() else None
    try:
        model_config = {"label_names": list(label_names), **(task_config or {})}
        data_config = {k: data_cfg[k] for k in DATA_CONFIG_KEYS if k in data_cfg}
        if not hasattr(model, "pretrained_cfg"):  # a module of one's own, which timm did not build (custom.py)
            scratch.mkdir()
            save_custom_export(model, scratch, model_config, data_config)
        else:
            save_for_hf(model, str(scratch), model_config=model_config, safe_serialization=True,
                        data_config=data_config)
        if recipe is not None and recipe.get("model", {}).get("pretrained") is not True:
            drop_hub_weights_claims(scratch / CONFIG_NAME)
        os.replace(scratch / WEIGHTS_NAME, run_dir / WEIGHTS_NAME)
        os.replace(scratch / CONFIG_NAME, run_dir / CONFIG_NAME)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if recipe is not None:
        save_environment(run_dir, device)


def drop_hub_weights_claims(config_path: Path) -> None:
    """Remove what timm's config says about hub weights (their tag, their license) from a config.json whose
    weights did not come from the hub."""
    config = json.loads(config_path.read_text())
    for key in HUB_WEIGHTS_KEYS:
        config.get("pretrained_cfg", {}).pop(key, None)
    config_path.write_text(json.dumps(config, indent=2))
