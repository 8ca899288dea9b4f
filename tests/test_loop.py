"""finetune/training/loop.py as a unit: what the end-to-end and multi-process tests cannot isolate.
(The loop end to end: test_end_to_end.py, test_strategies.py, test_distributed.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

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
    for line in ("1 process(es) on cpu in fp32 | 0 loader workers per process | channels_last on | sync_bn off",
                 "global batch 8 = 1 process(es) x 8 per device x 1 accumulation step(s)",
                 "class balance: sampler shuffle, loss weights auto"):
        assert out.count(line) == 1, line


class CountingImages(torch.utils.data.Dataset):
    """Coloured squares that count how often each is read (loader workers 0: reads happen here)."""

    def __init__(self, n: int):
        self.reads = [0] * n
        self.targets = [i % 3 for i in range(n)]
        self.classes = ["a", "b", "c"]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        self.reads[i] += 1
        return Image.new("RGB", (16, 16), ((80 * self.targets[i]) % 256, 100, 50)), self.targets[i]


def test_every_training_image_is_seen_every_epoch(tmp_path, tiny_recipe, image_folder):
    """21 images, global batch 8: 3 updates an epoch, every image at least once, 3 drawn again."""
    train = CountingImages(21)
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 2, "train.batch_size": 8, "train.hard_examples": 0,
                                            "train.ema": None})
    result = finetune.train(recipe, train_data=train, val_data=CountingImages(6), output=tmp_path / "run")
    assert [r["step"] for r in result.metrics] == [3, 6]
    assert min(train.reads) >= 2 and sum(train.reads) == 2 * 24


@pytest.mark.parametrize("decay", [0.999999, 0.6])
def test_the_better_of_the_model_and_its_moving_average_is_exported(tmp_path, image_folder, tiny_recipe, decay):
    """After one epoch the export is the model or its EMA, whichever validated better (metrics.jsonl says
    which); a very slow average is still almost the initial weights and cannot win."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    recipe = tiny_recipe(image_folder(classes=3, per_class=10), **{"train.ema": decay, "train.epochs": 1,
                                                                    "train.hard_examples": 0})
    [record] = finetune.train(recipe, output=run).metrics
    exported = load_file(str(run / "model.safetensors"))
    model = load_file(str(run / "checkpoint" / "model.safetensors"))
    ema = {k.removeprefix("module."): v for k, v in load_file(str(run / "checkpoint" / "ema.safetensors")).items()}
    assert record["exported"] == ("ema" if record["ema_val_acc"] > record["val_acc"] else "model")
    chosen, other = (ema, model) if record["exported"] == "ema" else (model, ema)
    assert all(torch.equal(exported[k], chosen[k]) for k in exported)
    assert not all(torch.equal(exported[k], other[k]) for k in exported)
    if decay > 0.9999:
        assert record["exported"] == "model"


def planted_nan(monkeypatch, at_call: int) -> dict:
    """Make the loss of the `at_call`-th micro-batch NaN; record the network and its weights just before."""
    import finetune.training.start as start
    seen = {"calls": 0}
    build = start.build_session

    def planted(*args, **kwargs):
        s = build(*args, **kwargs)
        seen["network"], criterion = s.network, s.criterion

        class Planted(torch.nn.Module):
            def forward(self, logits, labels):
                seen["calls"] += 1
                if seen["calls"] == at_call:
                    seen["before"] = {n: p.detach().clone() for n, p in s.network.named_parameters()}
                    return criterion(logits, labels) * float("nan")
                return criterion(logits, labels)
        return dataclasses.replace(s, criterion=Planted())
    monkeypatch.setattr(start, "build_session", planted)
    return seen


def test_a_non_finite_loss_leaves_the_weights_as_they_were_before_it(tmp_path, image_folder, tiny_recipe, monkeypatch):
    """The health is read at the end of the epoch; the bad update 3 and the ones queued after it are
    skipped on the device, so the weights are those after update 2."""
    from finetune.training import step
    monkeypatch.setattr(step, "HOST_DEVICES", ())  # read as on a GPU: once an epoch
    seen = planted_nan(monkeypatch, at_call=3)
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 2, "train.batch_size": 4, "train.hard_examples": 0,
                                            "train.ema": None})
    with pytest.raises(finetune.FinetuneError, match=r"stopped at update 3: the loss is nan, so nothing of that update "
                                                     r"was applied \(nor of the \d updates after it"):
        finetune.train(recipe, output=tmp_path / "run")
    after = dict(seen["network"].named_parameters())
    assert seen["calls"] > 3 and all(torch.equal(after[n].detach(), before) for n, before in seen["before"].items())
    assert not (tmp_path / "run" / "checkpoint").exists()  # the first epoch never finished cleanly


def test_the_host_waits_for_the_device_once_per_epoch_not_once_per_update(tmp_path, image_folder, tiny_recipe,
                                                                         monkeypatch):
    from finetune.training import faults, step
    monkeypatch.setattr(step, "HOST_DEVICES", ())  # as on a GPU (a CPU's host reads every update: it waits for nothing)
    reads, check = [], faults.Health.check
    monkeypatch.setattr(faults.Health, "check",
                        lambda self, **kw: reads.append(len(self.rows)) or check(self, **kw))
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 2, "train.batch_size": 4, "train.hard_examples": 0})
    result = finetune.train(recipe, output=tmp_path / "run")
    updates = result.metrics[0]["step"]
    assert updates > 2 and reads == [updates, updates]  # one read of all the epoch's updates, per epoch


@pytest.mark.slow
def test_a_compiled_model_trains_and_reports_its_compilation_apart(tmp_path, image_folder, tiny_recipe, capsys):
    """train.compile: torch.compile through Accelerate (inductor compiles C++ on a CPU: a minute here)."""
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 2, "train.hard_examples": 0, "train.compile": True,
                                            "train.ema": None})
    result = finetune.train(recipe, output=tmp_path / "run")
    first, second = result.metrics
    assert first["compile_seconds"] > 1 and "compile_seconds" not in second
    assert "s: compiling)" in capsys.readouterr().out
    reloaded = finetune.load(tmp_path / "run", device="cpu")  # the export holds the plain module's weights
    assert reloaded.label_names == ["c0", "c1", "c2"]


def test_loaders_used_once_after_training_let_their_workers_go(tmp_path, image_folder, tiny_recipe, monkeypatch):
    """Scoring train and val after training makes loaders of its own; only the training and validation
    loaders keep workers (one each) for the run."""
    import multiprocessing

    import finetune.tasks.single_label as single_label  # the scoring the single-label task runs after training
    seen, score = [], single_label.score_after_training

    def counting(*args, **kwargs):
        result = score(*args, **kwargs)
        seen.append(len(multiprocessing.active_children()))
        return result
    monkeypatch.setattr(single_label, "score_after_training", counting)
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 1, "train.hard_examples": 4, "data.num_workers": 1,
                                            "data.cache": "none"})
    finetune.train(recipe, output=tmp_path / "run")
    assert seen == [2]


def test_a_validation_set_with_no_readable_image_is_a_clear_error(tmp_path, image_folder, tiny_recipe):
    val = tmp_path / "val"
    for name in ("c0", "c1", "c2"):
        (val / name).mkdir(parents=True)
        (val / name / "broken.jpg").write_bytes(b"not a jpeg")
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 1, "train.hard_examples": 0, "data.val": str(val)})
    with pytest.raises(finetune.FinetuneError, match="all 3 images of the val data are unreadable"):
        finetune.train(recipe, output=tmp_path / "run")
