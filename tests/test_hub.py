"""finetune/data/hub.py: whether `datasets` holds a copy of a hub dataset it can load offline (its cache
as `datasets` lays it out), whether the hub can be reached, and the error that says what to do when
neither: raised when the data is opened, before anything is written."""

from __future__ import annotations

import datasets
import pytest
import yaml

from finetune import cli
from finetune.data.hub import hf_hub_cached, hf_hub_offline
from finetune.data.sources import load_source
from finetune.errors import FinetuneError
from finetune.recipe.schema import DataConfig


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(folder))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return folder


@pytest.mark.parametrize("name, folder", [("ylecun/MNIST", "ylecun___mnist"), ("SomeDataset", "some_dataset"),
                                          ("org/beans", "org___beans")])
def test_a_prepared_copy_is_found_where_datasets_puts_it(cache, name, folder):
    assert not hf_hub_cached(name)
    (cache / folder / "default").mkdir(parents=True)
    assert not hf_hub_cached(name)  # a prepared copy is CONFIG/VERSION/HASH
    (cache / folder / "default" / "0.0.0" / "0123abcd").mkdir(parents=True)
    assert hf_hub_cached(name)


def test_the_hub_is_off_limits_in_offline_mode_or_when_its_host_does_not_resolve(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert hf_hub_offline()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 6761)
    assert hf_hub_offline()


def test_an_uncached_hub_dataset_offline_says_where_it_looked_and_what_to_do(cache):
    with pytest.raises(FinetuneError) as error:
        load_source("hf:some-org/some-dataset", DataConfig())
    message = str(error.value)
    assert "cannot be reached" in message and str(cache) in message and "save_to_disk" in message


def test_train_reports_it_before_writing_anything(cache, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"backbone": "test_resnet", "pretrained": False},
                                      "data": {"train": "hf:some-org/some-dataset", "image_size": 16}}))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(recipe), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and "hf:some-org/some-dataset" in err
    assert "cannot be reached" in err and not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
