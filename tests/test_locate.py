"""Named datasets that are not there: each a short error saying what is missing and what to do, exit
code 2, no traceback, nothing written; never a download unless data.download is set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune import cli

REPO = Path(__file__).resolve().parents[1]


def write_recipe(folder: Path, train: str) -> Path:
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"backbone": "test_resnet", "pretrained": False},
                                    "data": {"train": train, "image_size": 16, "num_workers": 0},
                                    "train": {"epochs": 1, "batch_size": 8}}))
    return path


@pytest.mark.slow
def test_hub_dataset_offline_without_a_cache(tmp_path):
    """A subprocess: `datasets` reads HF_HOME and HF_HUB_OFFLINE once, when imported."""
    home = tmp_path / "hf_home"
    home.mkdir()
    env = {**os.environ, "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "finetune", "train", str(write_recipe(tmp_path, "hf:some-org/some-dataset")),
                           "--output", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "hf:some-org/some-dataset" in proc.stderr and "cannot be reached" in proc.stderr
    assert str(home / "datasets") in proc.stderr  # where a cached copy was looked for
    assert "save_to_disk" in proc.stderr  # and how to get one there without a network
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, lacks", [
    ("CIFAR10", ["cifar-10-batches-py", "data_batch_1", "batches.meta", "data.download=true"]),
    ("MNIST", ["MNIST/raw", "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "data.download=true"]),
])
def test_torchvision_dataset_without_files_names_them(tmp_path, monkeypatch, capsys, name, lacks):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(write_recipe(tmp_path, f"torchvision:{name}")), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    for text in lacks:
        assert text in err
    assert str(tmp_path / "data") in err  # data.root, resolved
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # nothing downloaded


def test_torchvision_typo_gets_a_did_you_mean(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["check-data", str(write_recipe(tmp_path, "torchvision:CIFAR11"))])
    assert "torchvision:CIFAR10" in capsys.readouterr().err
