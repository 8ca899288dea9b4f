"""finetune/training/plugins.py and model/custom.py: a model, a loss and metrics of one's own passed to
`finetune.train` as Python objects; the export of a module timm did not build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SHAPES, Interrupted, write_shapes
from safetensors.torch import load_file
from torch import nn

import finetune
from finetune.data.samples import IGNORE_LABEL
from finetune.errors import FinetuneError
from finetune.tasks import MultiLabel, SingleLabel
from finetune.training.plugins import UserLoss, build_plugins, score_metrics


class TinyNet(nn.Module):
    """A backbone and a head, no timm interface; the head is declared by `head_names`."""

    def __init__(self, classes: int = 3, head_names: list[str] | None = None):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, classes)
        if head_names is not None:
            self.head_names = head_names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def read_metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory, make_image_folder, make_recipe):
    """One run of a TinyNet with a loss and a metric of its own (2 epochs), shared by the tests below."""
    root = tmp_path_factory.mktemp("custom")
    recipe = make_recipe(make_image_folder(root / "data"), **{"train.hard_examples": 0})
    calls = []

    def counted_cross_entropy(logits, targets):
        calls.append(tuple(logits.shape))
        return nn.functional.cross_entropy(logits, targets)

    seen = []

    def top1(logits, targets):
        seen.append(len(targets))
        return (logits.argmax(-1) == targets).float().mean()

    model = TinyNet(head_names=["classifier"])
    result = finetune.train(recipe, model=model, loss=counted_cross_entropy, metrics=top1, output=root / "run")
    return {"result": result, "model": model, "loss_calls": calls, "metric_calls": seen, "recipe": recipe,
            "root": root}


def test_a_module_of_ones_own_trains_with_its_head_at_ten_times_the_lr(custom_run):
    run = Path(custom_run["result"].run_dir)
    plan = {g["name"]: g for g in json.loads((run / "plan.json").read_text())}
    assert set(plan["head"]["params"]) == {"classifier.weight"}  # the bias is in head.no_decay
    assert plan["head"]["lr"] == pytest.approx(10 * plan["backbone"]["lr"])
    listed = [p for g in plan.values() for p in g["params"]]
    assert sorted(listed) == sorted(n for n, _ in custom_run["model"].named_parameters())  # each once
    assert len(custom_run["result"].metrics) == 2


def test_the_custom_loss_is_the_training_loss(custom_run):
    # 24 images, 20% val: 18 train (rounded per class), batch 8 -> 2 updates per epoch, 2 epochs
    assert len(custom_run["loss_calls"]) == custom_run["result"].metrics[-1]["step"]
    assert all(shape == (8, 3) for shape in custom_run["loss_calls"])


def test_a_custom_metric_is_written_per_epoch_over_the_whole_val_split(custom_run):
    records = read_metrics(custom_run["result"].run_dir)
    assert [("val_top1" in r) for r in records] == [True, True]
    for r in records:  # the same top-1 on the same gathered logits and targets
        assert r["val_top1"] == pytest.approx(r["val_acc"], abs=1e-6)
        assert r["ema_val_top1"] == pytest.approx(r["ema_val_acc"], abs=1e-6)
    images = records[0]["val_images"]
    assert custom_run["metric_calls"] and set(custom_run["metric_calls"]) == {images}


def test_the_saved_recipe_labels_the_module_and_loading_it_again_needs_it(custom_run, make_recipe):
    run = Path(custom_run["result"].run_dir)
    assert "backbone: custom:TinyNet" in (run / "recipe.yaml").read_text()
    with pytest.raises(FinetuneError, match="pass it again"):
        finetune.train(resume=run)


def test_the_export_holds_the_weights_and_says_it_is_a_custom_module(custom_run):
    run = Path(custom_run["result"].run_dir)
    config = json.loads((run / "config.json").read_text())
    assert config["architecture"] == "custom" and config["module_class"].endswith("TinyNet")
    assert config["label_names"] == ["c0", "c1", "c2"]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    exported = load_file(str(run / "model.safetensors"))
    TinyNet().load_state_dict(exported)
    trained = custom_run["model"].state_dict()  # trained in place: it ends holding the exported weights
    assert all(torch.equal(trained[k].cpu(), exported[k]) for k in exported)
    with pytest.raises(FinetuneError, match="your own class"):
        finetune.load(run)


def test_the_head_can_be_named_in_the_recipe(tiny_recipe):
    plan = finetune.plan(tiny_recipe(**{"model.head": ["classifier"]}), model=TinyNet())
    head = [g for g in plan.groups if g.name.startswith("head")]
    assert {p for g in head for p in g.params} == {"classifier.weight", "classifier.bias"}
    assert "no group_matcher" in plan.table()


def test_a_module_without_a_head_is_refused_with_what_to_do(tiny_recipe):
    with pytest.raises(FinetuneError, match="model.head"):
        finetune.plan(tiny_recipe(), model=TinyNet())
    with pytest.raises(FinetuneError, match="'fc'.*no module or parameter of TinyNet"):
        finetune.plan(tiny_recipe(**{"model.head": ["fc"]}), model=TinyNet())


def test_a_wrong_class_count_fails_before_anything_is_written(tmp_path, tiny_recipe):
    with pytest.raises(FinetuneError, match=r"returns \(1, 5\).*3 classes"):
        finetune.train(tiny_recipe(), model=TinyNet(classes=5, head_names=["classifier"]), output=tmp_path / "run")
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_the_model_section_as_a_dict_is_still_an_override_and_misspelt_arguments_are_type_errors(tiny_recipe):
    plan = finetune.plan(tiny_recipe(), model={"drop_path_rate": 0.0})
    assert any(g.name.startswith("head") for g in plan.groups)
    with pytest.raises(TypeError, match="criterion"):
        finetune.train(tiny_recipe(), criterion=nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="nn.Module"):
        finetune.train(tiny_recipe(), model="resnet18")


def test_a_loss_must_give_one_number():
    per_sample = UserLoss(lambda logits, targets: nn.functional.cross_entropy(logits, targets, reduction="none"))
    with pytest.raises(FinetuneError, match=r"returned shape \(4,\)"):
        per_sample(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(FinetuneError, match="trainable parameters"):
        build_plugins(loss=nn.Linear(2, 2))
    with pytest.raises(TypeError):
        build_plugins(loss=3)


def test_metric_names():
    def f1(logits, targets):
        return 0.5

    assert list(build_plugins(metrics=[f1]).metrics) == ["f1"]
    assert list(build_plugins(metrics={"macro": f1, "other": f1}).metrics) == ["macro", "other"]
    with pytest.raises(FinetuneError, match="lambda"):
        build_plugins(metrics=lambda logits, targets: 0.0)
    with pytest.raises(FinetuneError, match="taken"):
        build_plugins(metrics={"acc": f1})
    with pytest.raises(TypeError):
        build_plugins(metrics={"x": 1})


def test_metrics_see_every_labelled_image_and_give_floats():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    targets = torch.tensor([0, 0, IGNORE_LABEL])  # the unreadable image is left out
    scores = score_metrics({"n": lambda lg, t: torch.tensor(len(t)),
                            "top1": lambda lg, t: (lg.argmax(-1) == t).float().mean(),
                            "bad": lambda lg, t: float("nan")}, logits, targets, "val", SingleLabel().kept(targets))
    assert scores == {"val_n": 2.0, "val_top1": 0.5, "val_bad": None}
    with pytest.raises(FinetuneError, match="not a number"):
        score_metrics({"s": lambda lg, t: "high"}, logits, targets, "val", SingleLabel().kept(targets))


def test_the_model_card_of_a_custom_module_says_how_to_load_it(custom_run):
    card = (Path(custom_run["result"].run_dir) / "README.md").read_text()
    assert "library_name: pytorch" in card and "a module of your own" in card
    assert "from the weights the module came with" in card and "timm's pretrained weights" not in card
    assert "load_state_dict" in card and "timm.create_model" not in card


SCRIPT = '''
import json, os, sys
import torch
from torch import nn
import finetune

class TwoPartNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, 3)
        self.head_names = ["classifier"]

    def forward(self, x):
        return self.classifier(self.body(x))

calls = []
def top1(logits, targets):
    calls.append(len(targets))
    return (logits.argmax(-1) == targets).float().mean()

def mean_ce(logits, targets):
    return nn.functional.cross_entropy(logits, targets)

torch.manual_seed(0)
finetune.train(sys.argv[1], model=TwoPartNet(), loss=mean_ce, metrics=[top1], output=sys.argv[2])
with open(os.path.join(sys.argv[3], f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
    json.dump(calls, f)
'''


@pytest.mark.slow
def test_metrics_of_ones_own_see_the_whole_val_split_on_two_processes(tmp_path, make_image_folder, make_recipe):
    """9 val images over 2 processes: each process's metric gets all 9 (gathered, the padding dropped), and
    the run writes val_top1 equal to val_acc."""
    import os
    import subprocess
    import sys

    import yaml

    data = make_image_folder(tmp_path / "data", classes=3, per_class=15, size=32)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(data, **{"train.epochs": 1, "train.hard_examples": 0,
                                                          "train.precision": "fp32"})))
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ACCELERATE_") and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["HF_HOME"] = str(tmp_path / "hf")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "script.py"), str(recipe), str(tmp_path / "run"), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = read_metrics(str(tmp_path / "run"))[0]
    assert record["val_images"] == 9 and record["val_top1"] == pytest.approx(record["val_acc"], abs=1e-6)
    for rank in (0, 1):  # the model's and the moving average's validation, each on all 9 images
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [9, 9]


def test_an_interrupted_run_of_a_custom_module_resumes_with_it(tmp_path, tiny_recipe):
    from finetune import api
    from finetune.data.splits import build_splits
    from finetune.training import loop
    from finetune.training.plugins import build_plugins

    def top1(logits, targets):
        return (logits.argmax(-1) == targets).float().mean()

    def stop_after_epoch_one(epoch: int) -> None:
        if epoch == 1:
            raise Interrupted

    recipe = tiny_recipe(**{"train.hard_examples": 0})
    plugins = build_plugins(TinyNet(head_names=["classifier"]), None, [top1])
    config, run_dir = api.resolve_run(recipe, plugins.recipe_overrides({}), output=tmp_path / "run")
    with pytest.raises(Interrupted):
        loop.train(config, run_dir, build_splits(config.data, config.train.seed), after_checkpoint=stop_after_epoch_one,
                   plugins=plugins)

    class OtherNet(TinyNet):
        pass

    with pytest.raises(FinetuneError, match="model.backbone: saved 'custom:TinyNet', given 'custom:OtherNet'"):
        finetune.train(resume=tmp_path / "run", model=OtherNet(head_names=["classifier"]))
    result = finetune.train(resume=tmp_path / "run", model=TinyNet(head_names=["classifier"]), metrics=[top1])
    assert [r["epoch"] for r in result.metrics] == [1, 2]
    assert all("val_top1" in r for r in read_metrics(result.run_dir))


def test_lr_find_sweeps_a_custom_module_with_its_loss(tmp_path, tiny_recipe):
    calls = []

    def counted(logits, targets):
        calls.append(1)
        return nn.functional.cross_entropy(logits, targets)

    found = finetune.lr_find(tiny_recipe(), model=TinyNet(head_names=["classifier"]), loss=counted,
                             output=tmp_path / "lrf", steps=10)
    assert found is not None and (tmp_path / "lrf" / "lr_find.json").is_file()
    assert len(calls) >= 10


def test_a_multi_label_run_gives_a_custom_loss_and_metric_multi_hot_targets(tmp_path):
    rows = write_shapes(tmp_path, 24, size=32)
    pairs = [(str(tmp_path / r["image"]), r["labels"]) for r in rows]
    shapes = []

    def bce(logits, targets):
        shapes.append(tuple(targets.shape))
        return nn.functional.binary_cross_entropy_with_logits(logits, targets.float())

    def label_count(logits, targets):
        shapes.append(tuple(targets.shape))
        return targets.sum(dim=1).float().mean()

    result = finetune.train({"model": {"head": ["classifier"]}, "train": {"epochs": 1, "batch_size": 8,
                                                                        "hard_examples": 0},
                             "data": {"image_size": 32, "num_workers": 0}}, train_data=pairs, task="multi_label",
                            model=TinyNet(classes=len(SHAPES)), loss=bce, metrics=[label_count],
                            output=tmp_path / "run")
    record = result.metrics[0]
    assert "val_map" in record and 1 <= record["val_label_count"] <= 3
    assert all(len(s) == 2 and s[1] == len(SHAPES) for s in shapes)
    config = json.loads((Path(result.run_dir) / "config.json").read_text())
    assert config["architecture"] == "custom" and config["task"] == "multi_label" and config["threshold"] == 0.5
    with pytest.raises(FinetuneError, match="taken"):
        build_plugins(metrics={"map": label_count})


def test_a_metric_may_not_overwrite_a_key_finetune_wrote():
    with pytest.raises(FinetuneError, match="overwrite finetune's own val_extra"):
        score_metrics({"extra": lambda lg, t: 1.0}, torch.zeros(2, 2), torch.tensor([0, 1]), "val",
                      torch.ones(2, dtype=torch.bool), taken={"val_extra": 0.5})
    rows = torch.tensor([[1, 0], [IGNORE_LABEL, IGNORE_LABEL]])  # multi-hot: an unreadable image is a whole row
    assert score_metrics({"n": lambda lg, t: len(t)}, torch.zeros(2, 2), rows, "val",
                         MultiLabel().kept(rows)) == {"val_n": 1.0}
