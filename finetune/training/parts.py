"""What a checkpoint holds of a session, as files that load without unpickling: the trained module
(`model.safetensors`), the moving average (`ema.safetensors`), the optimizer and the fp16 scaler (tensortree.py:
tensors as tensors, the rest as JSON) and each process's RNG states. checkpoint.py puts them in a folder,
checksums and swaps it; this module knows what goes in it and how it comes back.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_model, save_model

from .session import Session
from .tensortree import load_tree, save_tree

MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
EMA_NAME = "ema.safetensors"
SCALER_NAME = "scaler.safetensors"
RNG_NAME = "rng_{}.safetensors"  # one per process


def read_parts(accelerator: Accelerator, path: Path, s: Session) -> None:
    """Restore the session from the checkpoint in `path`, in this format or finetune 0.1's."""
    if (path / OPTIMIZER_NAME).is_file():
        _read_new_parts(accelerator, path, s)
    else:
        _read_parts_of_finetune_0_1(accelerator, path, s)


def write_parts(accelerator: Accelerator, folder: Path, s: Session) -> None:
    """The tensors of a checkpoint: the processes hold the same weights and optimizer state (they average
    gradients), so the main process writes those; each process writes its own RNG states."""
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(s.model, keep_torch_compile=False), str(folder / MODEL_NAME))
        save_tree(s.optimizer.state_dict(), folder / OPTIMIZER_NAME)
        if s.ema is not None:
            save_model(s.ema, str(folder / EMA_NAME))
        if accelerator.scaler is not None:
            save_tree(accelerator.scaler.state_dict(), folder / SCALER_NAME)
    save_tree(_rng_states(), folder / RNG_NAME.format(accelerator.process_index))


def _read_new_parts(accelerator: Accelerator, path: Path, s: Session) -> None:
    load_model(accelerator.unwrap_model(s.model, keep_torch_compile=False), str(path / MODEL_NAME))
    s.optimizer.load_state_dict(load_tree(path / OPTIMIZER_NAME))
    _match_layouts(s.optimizer)
    if s.ema is not None:
        load_model(s.ema, str(path / EMA_NAME))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(load_tree(path / SCALER_NAME))
    rng = path / RNG_NAME.format(accelerator.process_index)
    if rng.is_file():  # a resume on more processes than saved: the new ones keep their seeds
        _set_rng_states(load_tree(rng))


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Safetensors stores tensors contiguous, but a channels_last parameter's moments must share its strides:
    fused optimizers walk parameter and state memory in step, so other strides pair the wrong elements."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_strided(param.shape, param.stride(), dtype=value.dtype,
                                                     device=value.device).copy_(value)


def _read_parts_of_finetune_0_1(accelerator: Accelerator, path: Path, s: Session) -> None:
    """A checkpoint Accelerate's `save_state` wrote: its pickles are read with PyTorch's restricted
    unpickler, which refuses anything but tensors and plain containers. Its RNG files are not read (they
    hold NumPy objects): every update and every sample is seeded from the run's seed anyway (step.py,
    loaders.py)."""
    load_model(accelerator.unwrap_model(s.model, keep_torch_compile=False), str(path / MODEL_NAME))
    s.optimizer.load_state_dict(torch.load(path / "optimizer.bin", map_location="cpu", weights_only=True))
    if s.ema is not None:
        s.ema.load_state_dict(torch.load(path / "custom_checkpoint_0.pkl", map_location="cpu", weights_only=True))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))


def _rng_states() -> dict:
    kind, keys, *rest = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), *rest], "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
