"""The exported model: `model.safetensors` + `config.json` in timm's own format.

timm's `save_config_for_hf` writes the config (architecture, num_classes, label_names, pretrained_cfg
with mean/std/input size), so `timm.create_model("local-dir:RUN_DIR", pretrained=True)` rebuilds the
model anywhere timm runs, without finetune. Files are written beside their final name and renamed into
place, so a crash mid-write never leaves a half-written export.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf  # timm 1.x keeps it here, unexported

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_export(model: torch.nn.Module, run_dir: Path, label_names: list[str], data_cfg: dict) -> None:
    """Write the model's weights and timm config into `run_dir` atomically."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp_weights = run_dir / (WEIGHTS_NAME + ".tmp")
    tmp_config = run_dir / (CONFIG_NAME + ".tmp")
    save_file(state, str(tmp_weights), metadata={"format": "pt"})
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    save_config_for_hf(model, str(tmp_config), model_config={"label_names": list(label_names)},
                       data_config={k: data_cfg[k] for k in keys if k in data_cfg})
    os.replace(tmp_weights, run_dir / WEIGHTS_NAME)
    os.replace(tmp_config, run_dir / CONFIG_NAME)
