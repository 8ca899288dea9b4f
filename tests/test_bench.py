"""finetune/training/bench.py: the toolkit's training step timed next to a plain PyTorch loop."""

from __future__ import annotations

import pytest

from finetune.recipe.load import load_recipe
from finetune.training.bench import format_report, run_bench


def test_bench_times_both_loops_on_the_same_setup(image_folder, tiny_recipe):
    config = load_recipe(tiny_recipe(image_folder(), **{"train.batch_size": 8, "train.micro_batch_size": 4}))
    report = run_bench(config, steps=2, warmup=1, repeats=2, num_classes=3)
    assert (report["per_device"], report["accumulation"], report["precision"]) == (4, 2, "fp32")
    assert len(report["rounds"]) == 2 and all(r["toolkit_s"] > 0 and r["plain_s"] > 0 for r in report["rounds"])
    images = 2 * 8
    assert report["toolkit_images_per_second"] == round(images / min(r["toolkit_s"] for r in report["rounds"]), 1)
    assert report["ratio"] == pytest.approx(report["toolkit_images_per_second"] / report["plain_images_per_second"],
                                            rel=1e-3)
    assert "ratio toolkit/plain" in format_report(report)
