"""finetune/training/start.py: the accelerator of this machine and the session prepared with it."""

from __future__ import annotations

import torch

from finetune.recipe.load import load_recipe
from finetune.training.start import build_accelerator, start_session


def test_a_cpu_session_is_prepared_with_its_moving_average(tiny_recipe, image_folder):
    from finetune.data.splits import build_splits

    config = load_recipe(tiny_recipe(image_folder(classes=2, per_class=4), **{"train.ema": 0.9}))
    accelerator, precision = build_accelerator(config)
    assert (accelerator.device.type, precision, accelerator.num_processes) == ("cpu", "fp32", 1)
    s = start_session(config, build_splits(config.data, config.train.seed), accelerator, precision, None,
                      lambda _: None)
    assert s.ema is not None and s.ema.decay == 0.9
    assert all(torch.equal(a, b) for a, b in zip(s.ema.module.state_dict().values(), s.network.state_dict().values()))
    again = start_session(config, build_splits(config.data, config.train.seed), accelerator, precision, None,
                          lambda _: None)
    assert all(torch.equal(a, b) for a, b in zip(s.network.state_dict().values(), again.network.state_dict().values()))
