"""The model: a timm backbone with a freshly initialised head sized for the run's classes.

timm owns the architectures, their pretrained configs and the hub download; we add loading weights from
a file or an installed package (see weights.py) and errors that say what to do when weights are missing.
"""

from __future__ import annotations

from typing import Callable

import timm
from torch import nn

from ..errors import FinetuneError
from ..recipe.locate import resolve_weights_file
from ..recipe.schema import ModelConfig
from .weights import fit_state_dict, read_state_dict


def build_model(cfg: ModelConfig, num_classes: int, log: Callable[[str], None] = print,
                image_size: int | None = None) -> nn.Module:
    """Create the backbone with `num_classes` outputs and load the weights `cfg.pretrained` names.

    `image_size` (data.image_size) is passed on to backbones built for one input size (ViTs), whose
    position embeddings timm then resamples; convolutional nets take any size as they are."""
    if cfg.backbone.startswith("custom:"):  # a label, written by finetune.train(recipe, model=...)
        raise FinetuneError(f"model.backbone {cfg.backbone!r} names a module of your own, which lives in Python: "
                            "pass it again, finetune.train(recipe, model=YourModule(...)) (resume and plan too), "
                            "or set model.backbone to a timm model name.")
    kwargs = {"drop_path_rate": cfg.drop_path_rate} if cfg.drop_path_rate else {}
    if image_size is not None and fixed_input_size(cfg.backbone):
        kwargs["img_size"] = image_size
    from_hub = cfg.pretrained is True
    try:
        model = timm.create_model(cfg.backbone, pretrained=from_hub, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if not from_hub:
            raise
        raise FinetuneError(
            f"could not get timm's pretrained weights for {cfg.backbone!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Without internet, weights come from the local Hugging Face cache "
            "only: run once online, or set model.pretrained to a weights file (a path or "
            "package:MODULE/file.pth), or to false to train from scratch.") from None
    source_head_kept = from_hub and num_classes == model.pretrained_cfg.get("num_classes")
    if not source_head_kept:
        _zero_head(model)
    if isinstance(cfg.pretrained, str):
        path = resolve_weights_file(cfg.pretrained)
        log(fit_state_dict(model, read_state_dict(path), str(path), ordered=path.suffix != ".safetensors"))
    elif from_hub:
        log(f"loaded timm's pretrained weights for {cfg.backbone} ({model.pretrained_cfg.get('tag') or 'default'})")
    else:
        log(f"{cfg.backbone}: random initialisation (model.pretrained=false)")
    return model


def fixed_input_size(backbone: str) -> bool:
    """True for backbones built for one input size (ViTs): they take data.image_size at construction."""
    if backbone.startswith(("hf-hub:", "local-dir:")):
        return False
    if backbone.startswith("custom:"):  # a module of one's own: nothing says it takes another size
        return True
    cfg = timm.get_pretrained_cfg(backbone, allow_unregistered=True)
    return bool(cfg and cfg.fixed_input_size)


def _zero_head(model: nn.Module) -> None:
    """Start the new classifier at zero (as BiT does): the first logits are all equal, the loss starts at
    ln(classes), and the pretrained features are not hit by large random-head gradients. timm's own init
    scales with 1/sqrt(classes), which for a 10-class head gives logits around +-10 and a loss near 6."""
    head = model.get_classifier()
    for p in head.parameters():
        nn.init.zeros_(p)
