"""The exported model: `model.safetensors` + `config.json` in timm's own format.

timm's public `save_for_hf` writes both (the config holds architecture, num_classes, label_names and the
pretrained_cfg with mean/std/input size), so `timm.create_model("local-dir:RUN_DIR", pretrained=True)`
rebuilds the model anywhere timm runs, without finetune. timm writes into a scratch folder inside the
run directory; each file is then renamed into place, so a crash mid-write never leaves half an export.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from timm.models import save_for_hf

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def save_export(model: torch.nn.Module, run_dir: Path, label_names: list[str], data_cfg: dict) -> None:
    """Write the model's weights and timm config into `run_dir` atomically (weights first: a config
    always describes weights at least as new as itself)."""
    if any(not t.is_contiguous() for t in model.state_dict().values()):
        # channels_last weights: safetensors stores only contiguous tensors, and a file's layout must not
        # depend on how the run trained. The copy lives only while the files are written.
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    scratch = run_dir / f".export.tmp{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        save_for_hf(model, str(scratch), model_config={"label_names": list(label_names)}, safe_serialization=True,
                    data_config={k: data_cfg[k] for k in DATA_CONFIG_KEYS if k in data_cfg})
        os.replace(scratch / WEIGHTS_NAME, run_dir / WEIGHTS_NAME)
        os.replace(scratch / CONFIG_NAME, run_dir / CONFIG_NAME)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
