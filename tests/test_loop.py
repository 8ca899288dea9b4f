"""finetune/training/loop.py as a unit: what the end-to-end and multi-process tests cannot isolate.
(The loop end to end: test_end_to_end.py, test_strategies.py, test_distributed.py.)"""

from __future__ import annotations

import finetune


def test_two_runs_in_one_process_may_ask_for_different_precisions(tmp_path, image_folder, tiny_recipe):
    """Accelerate refuses new settings in a process that already made an Accelerator; a notebook that
    trains twice must not have to restart (loop.forget_accelerator_state)."""
    data = image_folder()
    for i, precision in enumerate(["bf16", "fp32"]):
        recipe = tiny_recipe(data, **{"train.precision": precision, "train.epochs": 1, "train.hard_examples": 0})
        assert len(finetune.train(recipe, output=tmp_path / f"run{i}").metrics) == 1


def test_set_up_is_printed_once_with_every_derived_setting(tmp_path, image_folder, tiny_recipe, capsys):
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 1, "train.hard_examples": 0, "train.class_weights": "auto"})
    finetune.train(recipe, output=tmp_path / "run")
    out = capsys.readouterr().out
    for line in ("1 process(es) on cpu in fp32 | 0 loader workers per process | channels_last off | sync_bn off",
                 "global batch 8 = 1 process(es) x 8 per device x 1 accumulation step(s)",
                 "class balance: sampler shuffle, loss weights auto"):
        assert out.count(line) == 1, line
