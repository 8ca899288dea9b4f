"""A model of the user's own, passed in Python (`finetune.train(recipe, model=module)`): the checks it must
pass before a run builds anything on it, and its export.

Any `nn.Module` that maps a batch of images (N, 3, H, W) to logits (N, classes) trains. The head (what
learns head_lr_mult faster) is named by the recipe's `model.head`, else by the module's own `head_names`
attribute, else by timm's `get_classifier()` (model/groups.py). Its weights are used as the module holds
them: finetune neither loads model.pretrained nor zeroes its head. Its preprocessing is timm's default data
config at data.image_size (a module built by timm keeps its own pretrained config).

A module that timm did not build has no timm config, so its export is `model.safetensors` plus a
config.json that says so (`architecture: custom`); `finetune predict` then explains that the weights load
into the user's own class in Python, with `load_state_dict(safetensors.torch.load_file(...))`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import FinetuneError

CUSTOM_ARCHITECTURE = "custom"  # config.json's architecture for a module timm cannot rebuild
LABEL_PREFIX = "custom:"  # model.backbone's label when a recipe trains a module of one's own and names none


def is_timm_like(model: nn.Module) -> bool:
    """The interface finetune's cached features and head probe need: timm's body/head split."""
    return all(callable(getattr(model, name, None)) for name in ("get_classifier", "forward_features", "forward_head"))


def backbone_label(model: nn.Module) -> str:
    """model.backbone for a run of `model`: the timm architecture it was built as, else custom:ClassName."""
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return architecture if isinstance(architecture, str) and architecture else LABEL_PREFIX + type(model).__name__


def check_custom_model(model: nn.Module, num_classes: int, input_size: tuple[int, int, int]) -> None:
    """Run one blank image through `model` (eval mode, no gradients) and check it gives one logit per class,
    so that a wrong head or input size fails now, with the numbers, rather than in the first update."""
    if not any(p.requires_grad for p in model.parameters()):
        raise FinetuneError(f"the model you passed ({type(model).__name__}) has no parameter that requires a "
                            "gradient, so nothing would train; switch requires_grad back on (freeze parts with "
                            "freeze.patterns in the recipe instead).")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_size, device=device))
    except Exception as e:  # the user's forward: any exception says the input does not fit it
        raise FinetuneError(f"the model you passed ({type(model).__name__}) failed on a batch of one "
                            f"{input_size[0]}x{input_size[1]}x{input_size[2]} image ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}); set data.image_size to the size "
                            "it takes.") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FinetuneError(f"the model you passed ({type(model).__name__}) returns {got} for one image, but the "
                            f"data has {num_classes} classes: it must return logits of shape (batch, "
                            f"{num_classes}). Size its last layer to the class count (e.g. nn.Linear(features, "
                            f"{num_classes})).")


def save_custom_export(model: nn.Module, folder: Path, model_config: dict, data_config: dict) -> None:
    """model.safetensors (the state dict) and a config.json naming the class, `model_config` (the labels,
    a multi-label task) and the preprocessing, in `folder` (export.py renames them into place)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(folder) / "model.safetensors"))
    cls, classes = type(model), len(model_config["label_names"])
    config = {"architecture": CUSTOM_ARCHITECTURE, "module_class": f"{cls.__module__}.{cls.__qualname__}",
              "num_classes": classes, **model_config, "pretrained_cfg": {**data_config, "num_classes": classes},
              "how_to_load": f"model = {cls.__qualname__}(...); model.load_state_dict("
                             "safetensors.torch.load_file('model.safetensors'))"}
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, default=list))


def refuse_custom_export(config: dict, run_dir: Path) -> None:
    """Raise, for an export of a module of one's own: timm cannot rebuild it from config.json."""
    if config.get("architecture") == CUSTOM_ARCHITECTURE:
        raise FinetuneError(f"{run_dir} holds a model of your own class ({config.get('module_class', '?')}), "
                            "which timm cannot rebuild from config.json, so `finetune predict`, `eval` and "
                            "`export` cannot load it. Load it in Python with your own class: "
                            f"{config.get('how_to_load', '')}; its preprocessing is config.json's pretrained_cfg.")


def custom_usage(config: dict) -> str:
    """The model card's "How to use it" for a module of one's own (rundir/card.py)."""
    size = config.get("pretrained_cfg", {}).get("input_size", [3, 224, 224])
    return f"""## How to use it

Build your own class as you did for training, then load the weights (`config.json` holds the labels and
the {size[0]}x{size[1]}x{size[2]} preprocessing, `pretrained_cfg`, as timm's data config):

```python
{config.get("how_to_load", "")}
```"""
