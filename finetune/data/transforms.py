"""The backbone's own preprocessing: timm's pretrained data config (mean, std, interpolation, crop) and its
train/eval transforms, so a ViT and a ResNet each see the images they were trained on.
"""

from __future__ import annotations

from typing import Callable

import timm.data
import torch

from ..recipe.schema import DataConfig


def resolve_data_config(model: torch.nn.Module, cfg: DataConfig) -> dict:
    """timm's preprocessing for this backbone (mean, std, interpolation, crop), at data.image_size if set."""
    data_cfg = timm.data.resolve_model_data_config(model)
    if cfg.image_size is not None:
        data_cfg["input_size"] = (data_cfg["input_size"][0], cfg.image_size, cfg.image_size)
    if cfg.crop_pct is not None:
        data_cfg["crop_pct"] = cfg.crop_pct
    if cfg.interpolation is not None:
        data_cfg["interpolation"] = cfg.interpolation
    return data_cfg


def train_size(data_cfg: dict, cfg: DataConfig, fixed_input_size: bool) -> int:
    """The side of a training crop: data.train_image_size, or with auto 3/4 of the eval size rounded to a
    multiple of 32 (224 -> 160, 160 -> 128, 288 -> 224) for backbones that take any size and inputs of 128
    px or more."""
    size = data_cfg["input_size"][-1]
    if cfg.train_image_size == "auto":
        return max(32, round(0.75 * size / 32) * 32) if not fixed_input_size and size >= 128 else size
    return size if cfg.train_image_size is None else cfg.train_image_size


def build_transforms(data_cfg: dict, cfg: DataConfig, train_side: int | None = None) -> tuple[Callable, Callable]:
    """(train transform with augmentation at `train_side` px, eval transform: resize + center crop at the
    data config's size), both from timm. With data.augment false, training gets the eval transform too."""
    evaluation = timm.data.create_transform(**data_cfg, is_training=False)
    if not cfg.augment:
        return evaluation, evaluation
    side = train_side or data_cfg["input_size"][-1]
    train = timm.data.create_transform(**{**data_cfg, "input_size": (data_cfg["input_size"][0], side, side)},
                                       is_training=True, scale=cfg.scale, hflip=cfg.hflip,
                                       color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment)
    return train, evaluation
