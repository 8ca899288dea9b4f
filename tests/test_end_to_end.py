"""End to end on CPU with test_resnet: the CLI (as a subprocess) and the Python API train, export, reload,
predict, refuse bad input without writing anything, and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import finetune
from finetune import FinetuneError
from finetune.recipe.load import load_recipe

# data_report.json is written by every run (an empty skip list included), so its absence never has to be
# interpreted; val_report.json and the val plots by every run; hard_examples.* by every run with
# train.hard_examples > 0 (the default); the model card README.md and environment.json with every export.
# .finetune-run.json marks the folder as a run finetune created; checkpoint.old is the previous epoch's
# checkpoint (after a run of one epoch there is none).
RUN_FILES = {".finetune-run.json", "recipe.yaml", "plan.json", "metrics.jsonl", "curves.png", "model.safetensors",
             "config.json", "checkpoint", "checkpoint.old", "data_report.json", "hard_examples.json",
             "hard_examples.png", "val_report.json", "val_confusion_matrix.png", "val_reliability.png", "README.md",
             "environment.json"}
HEAD = {"fc.weight", "fc.bias"}  # test_resnet's classifier
CLASSES = ["c0", "c1", "c2"]


def run_cli(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ----------------------------------------------------------------------------------------------------
# One CLI run and one Python API run of the same recipe, shared by the checks below.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def data_dir(workdir, make_image_folder) -> Path:
    return make_image_folder(workdir / "data", classes=3, per_class=8, size=32)


@pytest.fixture(scope="module")
def recipe(data_dir, make_recipe) -> dict:
    return make_recipe(data_dir)  # test_resnet, 32 px, 2 epochs, batch 8, num_workers 0, pretrained false


@pytest.fixture(scope="module")
def recipe_file(workdir, recipe) -> Path:
    return write_recipe(workdir / "recipe.yaml", recipe)


@pytest.fixture(scope="module")
def cli_run(workdir, recipe_file) -> Path:
    run = workdir / "cli_run"
    proc = run_cli("train", recipe_file, "--output", run, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def api_run(workdir, recipe):
    """finetune.train on the same recipe, with no --output: a new folder under ./runs."""
    cwd = workdir / "api_cwd"
    cwd.mkdir()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = finetune.train(recipe)
    finally:
        os.chdir(old)
    return result, cwd


@pytest.fixture(scope="module")
def api_run_dir(api_run) -> Path:
    """The API run's folder: what a run writes is checked on it, as the CLI run is a subprocess (slow tier)
    and test_cli_and_api_runs_of_one_recipe_agree shows the two runs are the same."""
    result, cwd = api_run
    run = Path(result.run_dir)
    return run if run.is_absolute() else cwd / run


# ----------------------------------------------------------------------------------------------------
# The run directory


@pytest.mark.slow
def test_cli_run_writes_exactly_the_run_files(cli_run):
    assert listing(cli_run) == RUN_FILES
    assert (cli_run / "checkpoint").is_dir()
    state = json.loads((cli_run / "checkpoint" / "trainer_state.json").read_text())
    assert state["epoch"] == 2


def test_metrics_records(api_run_dir):
    records = read_metrics(api_run_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    plan = json.loads((api_run_dir / "plan.json").read_text())
    trainable = {g["name"] for g in plan if g["trainable"]}
    for r in records:
        assert isinstance(r["train_loss"], float) and r["train_loss"] > 0
        assert isinstance(r["val_loss"], float) and r["val_loss"] > 0
        assert 0.0 <= r["val_acc"] <= 1.0
        assert set(r["lr"]) == trainable
        assert r["lr"]["head"] == pytest.approx(10 * r["lr"]["backbone"], rel=1e-9)
    assert records[1]["lr"]["backbone"] < records[0]["lr"]["backbone"]  # cosine decay after the warmup epoch


def test_config_json_is_timm_format(api_run_dir):
    config = json.loads((api_run_dir / "config.json").read_text())
    assert config["architecture"] == "test_resnet"
    assert config["num_classes"] == 3
    assert config["label_names"] == CLASSES
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32]
    model = timm.create_model("test_resnet", pretrained=False)
    assert cfg["mean"] == list(model.pretrained_cfg["mean"]) and cfg["std"] == list(model.pretrained_cfg["std"])
    # model.pretrained=false: timm's tag for test_resnet's hub weights (r160_in1k) is not where these came from
    assert "tag" not in cfg and "license" not in cfg


@pytest.mark.slow
def test_model_card_front_matter_parses_and_has_the_exported_epochs_metrics(cli_run):
    text = (cli_run / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "timm" and front["pipeline_tag"] == "image-classification"
    exported = [r for r in read_metrics(cli_run) if r["exported"]][-1]
    acc = exported["ema_val_acc" if exported["exported"] == "ema" else "val_acc"]
    metrics = front["model-index"][0]["results"][0]["metrics"]
    assert metrics[0] == {"type": "accuracy", "value": acc, "name": "Validation accuracy"}
    assert f"local-dir:{cli_run.name}" in text and "hf-hub:YOUR_NAME/cli_run" in text
    environment = json.loads((cli_run / "environment.json").read_text())
    assert environment["versions"]["timm"] == timm.__version__ and environment["processes"] == 1
    assert environment["command_line"].startswith("python -m finetune train ")


def test_saved_recipe_is_fully_resolved_and_loads(api_run_dir, recipe):
    saved = yaml.safe_load((api_run_dir / "recipe.yaml").read_text())
    assert saved["optim"]["lr"] == 3e-4 and saved["optim"]["weight_decay"] == 0.05  # defaults written out
    assert load_recipe(api_run_dir / "recipe.yaml") == load_recipe(recipe)


def test_plan_json_matches_the_plan(api_run_dir, recipe):
    saved = json.loads((api_run_dir / "plan.json").read_text())
    assert saved == json.loads(finetune.plan(recipe).dumps())
    lrs = {g["name"]: g["lr"] for g in saved}
    assert lrs["head"] == 10 * lrs["backbone"]


def test_curves_png_is_a_valid_png(api_run_dir):
    path = api_run_dir / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_export_is_the_best_epoch(api_run_dir):
    records = read_metrics(api_run_dir)
    best = max(records, key=lambda r: r["val_acc"])["epoch"]  # the first epoch with the best accuracy
    exported = load_file(str(api_run_dir / "model.safetensors"))
    last = load_file(str(api_run_dir / "checkpoint" / "model.safetensors"))
    same_as_last = all(torch.equal(exported[k], last[k]) for k in last)
    assert same_as_last == (best == records[-1]["epoch"])


# ----------------------------------------------------------------------------------------------------
# Using the result


def test_timm_and_finetune_load_give_identical_logits(api_run_dir, data_dir):
    plain = timm.create_model(f"local-dir:{api_run_dir}", pretrained=True).eval()
    predictor = finetune.load(api_run_dir)
    assert predictor.label_names == CLASSES
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(plain), is_training=False)
    batch = torch.stack([transform(Image.open(data_dir / c / "0.png").convert("RGB")) for c in CLASSES])
    with torch.no_grad():
        expected = plain(batch)
        got = predictor.model(batch)
    assert expected.shape == (3, 3)
    assert (expected - got).abs().max().item() <= 1e-5
    # the predictor's own preprocessing of paths gives the same logits
    from_paths = predictor.logits([data_dir / c / "0.png" for c in CLASSES])
    assert (from_paths - expected).abs().max().item() <= 1e-5


def test_predictor_accepts_paths_pil_images_and_tensors(api_run_dir, data_dir):
    predictor = finetune.load(api_run_dir)
    path = data_dir / "c1" / "3.png"
    image = Image.open(path).convert("RGB")
    by_path, by_image = predictor.predict(path)[0], predictor.predict(image)[0]
    by_tensor = predictor.predict(torch.tensor(np.array(image)).permute(2, 0, 1))[0]  # CHW uint8
    assert [p["label"] for p in by_path] == [p["label"] for p in by_image] == [p["label"] for p in by_tensor]
    assert by_path[0]["prob"] == pytest.approx(by_image[0]["prob"], abs=1e-6)
    assert by_path[0]["prob"] == pytest.approx(by_tensor[0]["prob"], abs=1e-6)
    assert len(predictor.predict([path, image], top_k=2)) == 2


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_export_of_a_trained_run_matches_its_logits(api_run_dir, workdir):
    result = finetune.export(api_run_dir, "torchscript", output=workdir / "exported" / "model.pt", dynamic_batch=True)
    assert result.max_abs_diff <= 1e-4
    plain = timm.create_model(f"local-dir:{api_run_dir}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (torch.jit.load(str(result.path))(images) - plain(images)).abs().max() <= 1e-4


def test_version_answers_without_a_command(capsys):
    from finetune import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"finetune {finetune.__version__}"


@pytest.mark.slow
def test_predict_json_cli(cli_run, data_dir, workdir):
    images = [str(data_dir / c / "1.png") for c in CLASSES]
    proc = run_cli("predict", "--json", cli_run, *images, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert [r["image"] for r in results] == images
    plain = timm.create_model(f"local-dir:{cli_run}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(plain), is_training=False)
    for r in results:
        assert set(r) == {"image", "predictions"}
        preds = r["predictions"]
        assert len(preds) == 3 and {p["label"] for p in preds} == set(CLASSES)
        assert all(set(p) == {"label", "prob"} for p in preds)
        probs = [p["prob"] for p in preds]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
        with torch.no_grad():
            logits = plain(transform(Image.open(r["image"]).convert("RGB")).unsqueeze(0))
        assert preds[0]["label"] == CLASSES[logits.argmax().item()]


# ----------------------------------------------------------------------------------------------------
# The Python API


def test_api_train_returns_run_dir_and_metrics(api_run):
    result, cwd = api_run
    run = Path(result.run_dir)
    run = run if run.is_absolute() else cwd / run  # a path relative to the working directory of the run
    assert run.parent.resolve() == (cwd / "runs").resolve() and run.name.endswith("-test_resnet")
    assert listing(run) == RUN_FILES
    assert result.metrics == read_metrics(run)
    assert [r["epoch"] for r in result.metrics] == [1, 2]
    assert result.final == result.metrics[-1]
    assert result.best_val_acc == max(max(r["val_acc"], r["ema_val_acc"]) for r in result.metrics)


@pytest.mark.slow
def test_cli_and_api_runs_of_one_recipe_agree(api_run, cli_run):
    """Same seed, same data, num_workers 0: the two entry points run the same loop."""
    result, _ = api_run
    keys = ("epoch", "step", "train_loss", "val_loss", "val_acc", "lr")
    assert [{k: r[k] for k in keys} for r in result.metrics] == [{k: r[k] for k in keys} for r in read_metrics(cli_run)]


def test_api_train_on_in_memory_data(tmp_path, make_recipe):
    rng = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 255, (3, 24, 24), dtype=torch.uint8, generator=rng), i % 2) for i in range(20)]
    recipe = make_recipe("unused", **{"train.epochs": 1})
    del recipe["data"]["train"]
    result = finetune.train(recipe, train_data=data, class_names=["even", "odd"], output=tmp_path / "run")
    assert len(result.metrics) == 1 and result.metrics[0]["val_images"] == 4  # 20% of each class of 10
    assert json.loads((tmp_path / "run" / "config.json").read_text())["label_names"] == ["even", "odd"]


@pytest.mark.parametrize("cache", ["none", "auto"])
def test_freeze_backbone_keeps_every_backbone_tensor_bit_for_bit(tmp_path, data_dir, make_recipe, cache):
    torch.manual_seed(123)
    initial_model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so keeping them is a real check
        for m in initial_model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    initial = {k: v.contiguous() for k, v in initial_model.state_dict().items()}
    save_file(initial, str(tmp_path / "initial.safetensors"))
    recipe = make_recipe(data_dir, **{"model.pretrained": str(tmp_path / "initial.safetensors"),
                                      "freeze.backbone": True, "freeze.bn": "frozen", "data.feature_cache": cache})
    result = finetune.train(recipe, output=tmp_path / "run")
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert {n for g in plan if g["trainable"] for n in g["params"]} == HEAD
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))  # the export of the best epoch
    assert set(trained) == set(initial)
    changed = [k for k in initial if k not in HEAD and not torch.equal(trained[k], initial[k])]
    assert changed == [], f"backbone tensors changed: {changed[:5]}"
    # The checkpoint holds what trains: the whole model, or only the head when it trains on cached features.
    last = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    if cache == "auto":
        assert set(last) == {"classifier.weight", "classifier.bias"}
        assert not torch.equal(last["classifier.weight"], initial["fc.weight"])  # the head did train
    else:
        assert set(last) == set(initial) and all(torch.equal(last[k], initial[k]) for k in initial if k not in HEAD)
        assert not torch.equal(last["fc.weight"], initial["fc.weight"])  # the head did train
    assert result.metrics[-1]["lr"].keys() == {"head", "head.no_decay"}


# ----------------------------------------------------------------------------------------------------
# User errors: exit 2, no traceback, nothing written


@pytest.mark.slow
def test_unknown_key_exits_2_with_did_you_mean_and_writes_nothing(workdir, recipe_file):
    cwd = workdir / "lrr_cwd"
    cwd.mkdir()
    proc = run_cli("train", recipe_file, "optim.lrr=0.1", cwd=cwd)
    assert proc.returncode == 2
    assert "lrr" in proc.stderr and "did you mean optim.lr?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert listing(cwd) == set()  # no runs/ folder


@pytest.mark.slow
def test_missing_data_path_exits_nonzero_naming_it_and_writes_nothing(workdir, recipe_file):
    cwd = workdir / "nodata_cwd"
    cwd.mkdir()
    proc = run_cli("train", recipe_file, "data.train=/no/such/dir", "--output", cwd / "out", cwd=cwd)
    assert proc.returncode == 2
    assert "/no/such/dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert listing(cwd) == set()


@pytest.mark.slow
def test_non_empty_output_is_refused_without_overwrite(workdir, recipe_file):
    out = workdir / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("train", recipe_file, "--output", out, cwd=workdir)
    assert proc.returncode == 2
    assert "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert listing(out) == {"keep.txt"} and (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_only_a_previous_run(tmp_path, recipe):
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(FinetuneError, match="left alone"):
        finetune.train(recipe, output=other, overwrite=True)
    assert listing(other) == {"thesis.tex"}


@pytest.mark.slow
def test_plan_json_cli_parses(workdir, recipe_file):
    proc = run_cli("plan", recipe_file, "freeze.backbone=true", "freeze.bn=frozen", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    groups = json.loads(proc.stdout)
    assert all({"name", "lr", "weight_decay", "params", "trainable"} <= set(g) for g in groups)
    assert {n for g in groups if g["trainable"] for n in g["params"]} == HEAD
    assert sorted(n for g in groups for n in g["params"]) == sorted(
        n for n, _ in timm.create_model("test_resnet", num_classes=3).named_parameters())


# ----------------------------------------------------------------------------------------------------
# Resume


# Runs the real CLI with each optimizer update slowed down, so that a kill lands inside an epoch.
SLOW_CLI = """
import os, sys, time
import finetune.training.session as session
_multiplier = session.lr_multiplier
def slow_multiplier(*args, **kwargs):
    time.sleep(float(os.environ.get("SLOW_UPDATE_SECONDS", "0.25")))
    return _multiplier(*args, **kwargs)
session.lr_multiplier = slow_multiplier
from finetune.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_kill_mid_run_then_resume_finishes_the_run(tmp_path, make_image_folder, make_recipe):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=12, size=32)  # 3 updates per epoch
    recipe_file = write_recipe(tmp_path / "recipe.yaml", make_recipe(data, **{"train.epochs": 3}))
    run = tmp_path / "run"
    runner = tmp_path / "slow_cli.py"
    runner.write_text(SLOW_CLI)
    proc = subprocess.Popen([sys.executable, str(runner), "train", str(recipe_file), "--output", str(run)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = run / "metrics.jsonl"
            if (metrics.is_file() and metrics.read_text().count("\n") >= 1
                    and (run / "checkpoint" / "trainer_state.json").is_file()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        time.sleep(0.1)  # inside epoch 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(read_metrics(run)) == 1, "the kill should land in epoch 2"

    resumed = run_cli("train", "--resume", run, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "after epoch 1" in resumed.stdout
    # The kill left the lock file naming the dead process; the OS released its lock, so resume takes over.
    assert f"pid {proc.pid} on " in resumed.stdout and "ended without releasing" in resumed.stdout
    assert listing(run) == RUN_FILES
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    per_epoch = records[0]["step"]
    assert [r["step"] for r in records] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["epoch"] == 3
    assert finetune.load(run).label_names == CLASSES


def test_resume_from_epoch_one_checkpoint_matches_uninterrupted_run(tmp_path, recipe, api_run, train_until_epoch_one):
    result, cwd = api_run
    uninterrupted = Path(result.run_dir) if Path(result.run_dir).is_absolute() else cwd / result.run_dir
    train_until_epoch_one(recipe, tmp_path / "run")
    assert len(read_metrics(tmp_path / "run")) == 1

    resumed = finetune.train(resume=tmp_path / "run")
    assert [r["epoch"] for r in resumed.metrics] == [1, 2]
    assert [r["train_loss"] for r in resumed.metrics] == [r["train_loss"] for r in result.metrics]
    expected = load_file(str(uninterrupted / "checkpoint" / "model.safetensors"))
    got = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert set(got) == set(expected)
    worst = max((got[k].double() - expected[k].double()).abs().max().item() for k in expected)
    assert worst <= 1e-6


def test_resume_with_a_different_recipe_is_refused(api_run_dir, recipe):
    with pytest.raises(FinetuneError, match="train.epochs"):
        finetune.train(recipe, resume=api_run_dir, **{"train.epochs": 5})


def test_resume_of_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(FinetuneError, match="not a run directory"):
        finetune.train(resume=tmp_path)


# ----------------------------------------------------------------------------------------------------
# Backbones with a fixed input size, and default run folder names


def test_fixed_size_backbone_at_another_image_size_trains_or_refuses_cleanly(tmp_path, data_dir, make_recipe):
    recipe = make_recipe(data_dir, **{"model.backbone": "test_vit3", "train.epochs": 1})  # native 160 px, asked 32
    run = tmp_path / "run"
    try:
        result = finetune.train(recipe, output=run)
    except FinetuneError as e:
        assert "image_size" in str(e)
        assert not run.exists()
    else:
        assert len(result.metrics) == 1 and listing(run) == RUN_FILES - {"checkpoint.old"}


# ----------------------------------------------------------------------------------------------------
# Issue 14: what a run owns, and damaged state


@pytest.mark.slow
def test_overwrite_of_a_project_folder_holding_a_recipe_yaml_deletes_nothing(tmp_path, make_image_folder,
                                                                            make_recipe):
    """The issue's steps: a project folder with data/, notes and the user's recipe.yaml is no previous run."""
    project = tmp_path / "proj"
    make_image_folder(project / "data", classes=3, per_class=4, size=16)
    (project / "notes.txt").write_text("notes")
    write_recipe(project / "recipe.yaml", make_recipe("data"))
    before = sorted(str(p.relative_to(project)) for p in project.rglob("*"))
    proc = run_cli("train", "recipe.yaml", "--output", ".", "--overwrite", cwd=project)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "was not created by finetune" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == before


@pytest.mark.slow
def test_a_second_run_into_a_directory_in_use_is_refused_naming_the_first(tmp_path, recipe_file):
    run = tmp_path / "run"
    runner = tmp_path / "slow_cli.py"
    runner.write_text(SLOW_CLI)
    first = subprocess.Popen([sys.executable, str(runner), "train", str(recipe_file), "--output", str(run)],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "SLOW_UPDATE_SECONDS": "10"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None and not (run / ".finetune-run.json").is_file():
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-2000:]
        second = run_cli("train", recipe_file, "--output", run, "--overwrite", cwd=tmp_path)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"in use by another finetune run (pid {first.pid} on " in second.stderr
        resumed = run_cli("train", "--resume", run, cwd=tmp_path)
        assert resumed.returncode == 2 and f"(pid {first.pid} on " in resumed.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


def damaged_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


def test_resume_from_a_bit_flipped_checkpoint_uses_the_previous_one_and_says_why(api_run_dir, tmp_path, capsys):
    run = damaged_copy(api_run_dir, tmp_path)
    weights = run / "checkpoint" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10  # inside a tensor: loads fine, trains into garbage
    weights.write_bytes(bytes(data))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # the last line cut off
    result = finetune.train(resume=run)
    out = capsys.readouterr().out
    assert f"{run / 'checkpoint'} is damaged (model.safetensors: its checksum does not match" in out
    assert f"resuming from the previous checkpoint, {run / 'checkpoint.old'} (after epoch 1)" in out
    assert "metrics.jsonl line 2" in out
    assert [r["epoch"] for r in result.metrics] == [1, 2]
    # The damaged checkpoint and line are kept aside; the one resumed from stays as the previous checkpoint.
    assert listing(run) == RUN_FILES | {"metrics.jsonl.damaged", "checkpoint.damaged"}
    assert [json.loads((run / name / "trainer_state.json").read_text())["epoch"]
            for name in ("checkpoint", "checkpoint.old")] == [2, 1]


@pytest.mark.slow
def test_resume_with_both_checkpoints_damaged_is_refused_and_changes_nothing(cli_run, tmp_path):
    run = damaged_copy(cli_run, tmp_path)
    (run / "checkpoint" / "trainer_state.json").write_text("")
    optimizer = run / "checkpoint.old" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_cli("train", "--resume", run, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no usable checkpoint" in proc.stderr and "trainer_state.json" in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_predict_with_a_truncated_export_is_an_error_not_a_traceback(cli_run, tmp_path, data_dir):
    run = damaged_copy(cli_run, tmp_path)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = run_cli("predict", run, data_dir / "c0" / "0.png", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "damaged or incomplete" in proc.stderr


@pytest.mark.slow
def test_resume_auto_starts_a_job_then_resumes_it_when_requeued(tmp_path, image_folder, tiny_recipe,
                                                              train_until_epoch_one):
    """One command for a requeued job: `--resume auto --output DIR` trains when DIR holds no run, resumes an
    interrupted one, and starts over a run that ended before its first checkpoint."""
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 2, "train.hard_examples": 0})
    fresh = finetune.train(recipe, output=tmp_path / "new", resume="auto")
    assert [r["epoch"] for r in fresh.metrics] == [1, 2]

    train_until_epoch_one(recipe, tmp_path / "job")  # killed after epoch 1
    proc = run_cli("train", write_recipe(tmp_path / "r.yaml", recipe), "--output", tmp_path / "job", "--resume", "auto",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming" in proc.stdout and [r["epoch"] for r in read_metrics(tmp_path / "job")] == [1, 2]

    for name in ("checkpoint", "checkpoint.old"):  # as if it had died before its first checkpoint
        shutil.rmtree(tmp_path / "job" / name, ignore_errors=True)
    again = finetune.train(recipe, output=tmp_path / "job", resume="auto")
    assert [r["epoch"] for r in again.metrics] == [1, 2]

    with pytest.raises(FinetuneError, match="--resume auto needs --output DIR"):
        finetune.train(recipe, resume="auto")


def test_a_kill_between_the_checkpoint_and_the_export_is_healed_on_resume(tmp_path, image_folder, tiny_recipe,
                                                                        train_until_epoch_one):
    """The best epoch's export is written after the checkpoint that describes it; a resume from a
    checkpoint of a best epoch writes that export again, from the checkpoint's own weights."""
    recipe = tiny_recipe(image_folder(), **{"train.epochs": 1, "train.hard_examples": 0, "train.ema": None})
    run = tmp_path / "run"
    train_until_epoch_one(recipe, run)  # killed right after the checkpoint of epoch 1, the best so far
    assert not (run / "model.safetensors").exists()
    finetune.train(resume=run)
    exported, checkpointed = load_file(str(run / "model.safetensors")), load_file(str(run / "checkpoint" /
                                                                                       "model.safetensors"))
    assert exported.keys() == checkpointed.keys()
    assert all(torch.equal(exported[k], checkpointed[k]) for k in exported)


def test_a_misspelt_python_argument_is_a_type_error_not_a_recipe_override(image_folder, tiny_recipe):
    recipe = tiny_recipe(image_folder())
    with pytest.raises(TypeError, match=r"train\(\) got an unexpected keyword argument 'criterion'"):
        finetune.train(recipe, criterion=torch.nn.MSELoss())
    with pytest.raises(TypeError, match=r"plan\(\) got an unexpected keyword argument 'optim'"):
        finetune.plan(recipe, optim=1e-3)  # a section takes a dict
    # the three keyword forms of a recipe override all work
    for kw in ({"optim__lr": 1e-3}, {"optim": {"lr": 1e-3}}, {"optim.lr": 1e-3}):
        assert {g.lr for g in finetune.plan(recipe, **kw).groups if g.name == "backbone"} == {1e-3}
