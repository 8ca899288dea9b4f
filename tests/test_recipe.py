"""finetune/config.py: YAML recipes into typed, frozen, strictly checked configs, with every problem at once."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from finetune import FinetuneError
from finetune.recipe.load import dump_recipe, load_recipe
from finetune.recipe.locate import parse_source
from finetune.recipe.schema import RecipeConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED_RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def problems(recipe, overrides=None) -> str:
    with pytest.raises(FinetuneError) as info:
        load_recipe(recipe, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------------------------------
# Loading


def test_yaml_recipe_loads_into_typed_frozen_config(tmp_path, tiny_recipe):
    path = write_yaml(tmp_path / "r.yaml", tiny_recipe(**{"optim.name": "sgd", "freeze.backbone": True}))
    config = load_recipe(path)
    assert isinstance(config, RecipeConfig)
    assert config.model.backbone == "test_resnet" and config.model.pretrained is False
    assert config.optim.name == "sgd" and config.freeze.backbone is True
    assert config.train.epochs == 2 and config.data.image_size == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 1.0


def test_yaml_exponent_without_dot_becomes_float(tmp_path, tiny_recipe):
    # YAML 1.1 reads `1e-4` as the string "1e-4"; the schema converts it by its declared type.
    text = yaml.safe_dump(tiny_recipe()) + "optim:\n  lr: 1e-4\n  weight_decay: 5e-2\n"
    assert yaml.safe_load(text)["optim"]["lr"] == "1e-4"
    config = load_recipe(write_yaml(tmp_path / "r.yaml", yaml.safe_load(text)))
    assert config.optim.lr == 1e-4 and type(config.optim.lr) is float
    assert config.optim.weight_decay == 0.05 and type(config.optim.weight_decay) is float


def test_saved_recipe_loads_back_identical(tmp_path, tiny_recipe):
    config = load_recipe(tiny_recipe(**{"data.scale": [0.5, 1.0]}), ["optim.name=sgd"])
    (tmp_path / "saved.yaml").write_text(dump_recipe(config))
    assert load_recipe(tmp_path / "saved.yaml") == config


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path, image_folder):
    # Gallery recipes name folders or manifests of the user's own images (data/train, data/train.csv):
    # stand in generated folders (multi-label reads a folder as one label per image).
    data = yaml.safe_load(path.read_text()).get("data") or {}
    overrides = {f"data.{key}": str(image_folder(name=key)) for key in ("train", "val")
                 if data.get(key) and parse_source(data[key]).scheme in ("folder", "manifest")}
    config = load_recipe(path, overrides)
    assert config.model.backbone
    assert config.data.train
    assert config.optim.lr is not None and config.optim.lr > 0


def test_recipes_folder_is_not_empty():
    assert SHIPPED_RECIPES, "recipes/*.yaml: nothing to check"


# ----------------------------------------------------------------------------------------------------
# Unknown keys, wrong types, conversion


def test_unknown_key_is_named_with_did_you_mean(tiny_recipe):
    message = problems(tiny_recipe(), ["optim.lrr=0.1"])
    assert "optim.lrr" in message
    assert "did you mean optim.lr?" in message


def test_unknown_key_in_yaml_file_is_named(tmp_path, tiny_recipe):
    path = write_yaml(tmp_path / "r.yaml", tiny_recipe(**{"train.epohcs": 3}))
    message = problems(path)
    assert "train.epohcs" in message and "did you mean train.epochs" in message


def test_unknown_section_suggests_the_section(tiny_recipe):
    recipe = tiny_recipe()
    recipe["modle"] = {"backbone": "test_resnet"}
    message = problems(recipe)
    assert "modle" in message and "did you mean model" in message


@pytest.mark.parametrize("override, key, value, expected", [
    ("train.epochs=abc", "train.epochs", "'abc'", "an integer"),
    ("train.epochs=2.5", "train.epochs", "2.5", "an integer"),
    ("optim.lr=fast", "optim.lr", "'fast'", "a number"),
    ("freeze.backbone=maybe", "freeze.backbone", "'maybe'", "true or false"),
    ("data.scale=[0.5, 1.0, 2.0]", "data.scale", "[0.5, 1.0, 2.0]", "a list of 2"),
])
def test_wrong_type_names_key_value_and_expected_type(tiny_recipe, override, key, value, expected):
    message = problems(tiny_recipe(), [override])
    line = next(line for line in message.splitlines() if key in line)
    assert value in line
    assert expected in line


@pytest.mark.parametrize("override, section, key, expected", [
    ("optim.lr=1e-4", "optim", "lr", 1e-4),
    ("optim.lr=3", "optim", "lr", 3.0),
    ("optim.head_lr_mult=5", "optim", "head_lr_mult", 5.0),
    ("train.epochs=3", "train", "epochs", 3),
    ("train.epochs=4.0", "train", "epochs", 4),
    ("freeze.backbone=true", "freeze", "backbone", True),
    ("freeze.backbone=false", "freeze", "backbone", False),
    ("data.image_size=null", "data", "image_size", None),
    ("data.scale=[0.5, 1.0]", "data", "scale", (0.5, 1.0)),
    ("train.grad_clip=1", "train", "grad_clip", 1.0),
    ("model.pretrained=false", "model", "pretrained", False),
])
def test_override_values_are_converted_by_declared_type(tiny_recipe, override, section, key, expected):
    value = getattr(getattr(load_recipe(tiny_recipe(), [override]), section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_yaml_string_values_are_converted_too(tiny_recipe):
    config = load_recipe(tiny_recipe(**{"optim.lr": "1e-4", "train.epochs": "3", "freeze.backbone": "true"}))
    assert (config.optim.lr, config.train.epochs, config.freeze.backbone) == (1e-4, 3, True)
    assert type(config.optim.lr) is float and type(config.train.epochs) is int


def test_several_problems_reported_at_once(tiny_recipe):
    message = problems(tiny_recipe(), ["optim.lrr=0.1", "train.epochs=abc", "optim.name=adamm"])
    assert "3 problems" in message
    for key in ("optim.lrr", "train.epochs", "optim.name"):
        assert key in message


def test_several_range_problems_reported_at_once(tiny_recipe):
    message = problems(tiny_recipe(), ["optim.lr=0", "train.epochs=0", "data.hflip=2"])
    assert "3 problems" in message
    for key in ("optim.lr", "train.epochs", "data.hflip"):
        assert key in message


def test_unknown_key_and_missing_path_reported_together(tiny_recipe, tmp_path):
    missing = tmp_path / "no_such_dir"
    message = problems(tiny_recipe(), ["optim.lrr=0.1", f"data.train={missing}"])
    assert "optim.lrr" in message
    assert str(missing) in message


def test_bad_override_syntax_is_a_user_error(tiny_recipe):
    assert "KEY=VALUE" in problems(tiny_recipe(), ["optim.lr"])


# ----------------------------------------------------------------------------------------------------
# Required keys, paths, backbone names


@pytest.mark.parametrize("section, key, what", [("model", "backbone", "model.backbone"),
                                                ("data", "train", "data.train")])
def test_required_key_missing_from_its_section(tiny_recipe, section, key, what):
    recipe = tiny_recipe()
    del recipe[section][key]
    message = problems(recipe)
    assert f"{what} is required" in message


@pytest.mark.parametrize("section, what", [("model", "model.backbone"), ("data", "data.train")])
def test_required_key_missing_with_its_whole_section(tiny_recipe, section, what):
    recipe = tiny_recipe()
    del recipe[section]
    message = problems(recipe)
    assert f"{what} is required" in message


def test_missing_data_path_is_named(tiny_recipe, tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    message = problems(tiny_recipe(), [f"data.train={missing}"])
    assert "data.train" in message and str(missing) in message


def test_missing_val_path_is_named(tiny_recipe, tmp_path):
    missing = tmp_path / "val_missing"
    message = problems(tiny_recipe(), [f"data.val={missing}"])
    assert "data.val" in message and str(missing) in message


def test_data_path_that_is_a_file_is_refused(tiny_recipe, tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    assert "is a file" in problems(tiny_recipe(), [f"data.train={tmp_path / 'notes.txt'}"])


def test_missing_weights_file_is_named(tiny_recipe, tmp_path):
    missing = tmp_path / "weights.safetensors"
    message = problems(tiny_recipe(), [f"model.pretrained={missing}"])
    assert "model.pretrained" in message and str(missing) in message


def test_bad_backbone_gives_did_you_mean(tiny_recipe):
    message = problems(tiny_recipe(), ["model.backbone=test_resnt"])
    assert "model.backbone" in message and "'test_resnt'" in message
    assert "did you mean" in message and "test_resnet" in message


def test_sklearn_source_other_than_digits_is_refused(tiny_recipe):
    assert "sklearn:iris" in problems(tiny_recipe(), ["data.train=sklearn:iris"])


# ----------------------------------------------------------------------------------------------------
# Optimizer-dependent defaults


@pytest.mark.parametrize("name, lr, weight_decay", [("adamw", 3e-4, 0.05), ("sgd", 0.01, 1e-4)])
def test_optimizer_defaults_are_resolved(tiny_recipe, name, lr, weight_decay):
    config = load_recipe(tiny_recipe(), [f"optim.name={name}"])
    assert config.optim.lr == lr
    assert config.optim.weight_decay == weight_decay


def test_explicit_lr_and_zero_weight_decay_are_kept(tiny_recipe):
    config = load_recipe(tiny_recipe(), ["optim.name=sgd", "optim.lr=0.5", "optim.weight_decay=0"])
    assert config.optim.lr == 0.5
    assert config.optim.weight_decay == 0.0


# ----------------------------------------------------------------------------------------------------
# base: recipes and overrides


def test_base_recipe_relative_to_the_child_file(tmp_path, tiny_recipe, monkeypatch):
    base = tiny_recipe(**{"optim.name": "sgd", "train.epochs": 5})
    write_yaml(tmp_path / "bases" / "base.yaml", base)
    child = write_yaml(tmp_path / "child.yaml", {"base": "bases/base.yaml", "optim": {"lr": 0.5},
                                                  "train": {"batch_size": 4}})
    monkeypatch.chdir(tmp_path / "bases")  # `base:` is resolved next to the child, not in the working directory
    config = load_recipe(child)
    assert config.optim.name == "sgd"  # kept from the base, beside the child's optim.lr
    assert config.optim.lr == 0.5
    assert config.train.epochs == 5 and config.train.batch_size == 4
    assert config.model.backbone == "test_resnet"


def test_base_chain_of_two(tmp_path, tiny_recipe):
    write_yaml(tmp_path / "a.yaml", tiny_recipe(**{"train.epochs": 7}))
    write_yaml(tmp_path / "b.yaml", {"base": "a.yaml", "optim": {"name": "sgd"}})
    c = write_yaml(tmp_path / "c.yaml", {"base": "b.yaml", "train": {"seed": 3}})
    config = load_recipe(c)
    assert (config.train.epochs, config.optim.name, config.train.seed) == (7, "sgd", 3)


def test_overrides_win_over_base_and_child(tmp_path, tiny_recipe):
    write_yaml(tmp_path / "base.yaml", tiny_recipe(**{"train.epochs": 5}))
    child = write_yaml(tmp_path / "child.yaml", {"base": "base.yaml", "train": {"epochs": 6}})
    assert load_recipe(child, ["train.epochs=9"]).train.epochs == 9


def test_unknown_key_in_base_is_reported(tmp_path, tiny_recipe):
    write_yaml(tmp_path / "base.yaml", tiny_recipe(**{"optim.lrr": 0.1}))
    child = write_yaml(tmp_path / "child.yaml", {"base": "base.yaml"})
    assert "did you mean optim.lr" in problems(child)


def test_base_cycle_is_an_error(tmp_path, tiny_recipe):
    write_yaml(tmp_path / "a.yaml", {"base": "b.yaml", **tiny_recipe()})
    write_yaml(tmp_path / "b.yaml", {"base": "a.yaml"})
    message = problems(tmp_path / "a.yaml")
    assert "extends itself" in message and "a.yaml" in message and "b.yaml" in message


def test_base_naming_itself_is_an_error(tmp_path, tiny_recipe):
    path = write_yaml(tmp_path / "a.yaml", {"base": "a.yaml", **tiny_recipe()})
    assert "extends itself" in problems(path)


def test_dict_recipe_with_base(tmp_path, tiny_recipe):
    base = write_yaml(tmp_path / "base.yaml", tiny_recipe(**{"optim.name": "sgd"}))
    config = load_recipe({"base": str(base), "train": {"epochs": 3}})
    assert config.optim.name == "sgd" and config.train.epochs == 3


def test_invalid_yaml_is_a_user_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    assert "not valid YAML" in problems(path)


def test_load_recipe_does_not_mutate_the_callers_dict(tiny_recipe):
    recipe = tiny_recipe()
    before = copy.deepcopy(recipe)
    load_recipe(recipe, ["data.image_size=48", "model.backbone=test_vit"])
    assert recipe == before


def test_missing_recipe_file_is_a_user_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert "nope.yaml" in problems(missing)


def test_shipped_recipe_by_name():
    assert load_recipe("quickstart").model.backbone == "efficientnet_lite0"


# ----------------------------------------------------------------------------------------------------
# Hostile input: bounded in size, time and message length

# Ten short lines whose last alias expands to 9**8 (43 million) strings as soon as anything walks it.
BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n" for a, b in zip("abcdefg", "bcdefgh"))


def test_a_yaml_alias_is_refused_with_its_line(tmp_path, tiny_recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()) + BILLION_LAUGHS)
    message = problems(path)
    assert "alias *a" in message and "line" in message and "base:" in message and "\n" not in message


def test_a_yaml_merge_of_an_alias_is_refused(tmp_path, tiny_recipe):
    text = yaml.safe_dump({k: v for k, v in tiny_recipe().items() if k != "train"})
    path = tmp_path / "r.yaml"
    path.write_text(text + "defaults: &d {epochs: 3}\ntrain:\n  <<: *d\n")
    assert "alias *d" in problems(path)


def test_a_recipe_over_one_megabyte_is_refused_before_it_is_parsed(tmp_path, tiny_recipe):
    import time

    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()) + "#" * 1_000_000 + "\n")
    start = time.perf_counter()
    message = problems(path)
    assert "over 1,000,000 bytes" in message and str(path) in message
    assert time.perf_counter() - start < 1


def test_an_override_value_over_one_megabyte_or_with_an_alias_is_refused(tiny_recipe):
    assert "1,000,000" in problems(tiny_recipe(), ["data.train=" + "x" * 1_000_001])
    assert "alias *a" in problems(tiny_recipe(), ["freeze.patterns=[&a x, *a]"])


def test_a_glob_looking_override_stays_text(tiny_recipe):
    # `*.png` reads as an alias to an anchor never defined: text, as before aliases were refused.
    assert "'*.png'" in problems(tiny_recipe(), ["model.backbone=*.png"])


@pytest.mark.parametrize("given", ["recipe", "overrides"])
def test_thousands_of_unknown_keys_are_listed_ten_at_a_time_and_quickly(tiny_recipe, given):
    import time

    recipe, overrides = tiny_recipe(), []
    if given == "recipe":
        recipe["train"].update({f"k{i}": 1 for i in range(20_000)})
    else:
        overrides = [f"train.k{i}=1" for i in range(20_000)]
    start = time.perf_counter()
    message = problems(recipe, overrides)
    assert time.perf_counter() - start < 5
    assert len(message) < 4_000 and "train.k0: unknown key" in message and "19,990 more unknown keys" in message


def test_a_long_list_of_problems_is_cut_short(tiny_recipe):
    message = problems(tiny_recipe(), [f"nosuch{i}=1" for i in range(100)])
    assert message.startswith("the recipe has 100 problems") and message.count("\n  - ") == 21
    assert "and 80 more" in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_only_regular_files_are_opened(tmp_path):
    from finetune.recipe.userfiles import NotRegularFile, open_regular, read_yaml_file

    os.mkfifo(tmp_path / "fifo")
    for path, kind in [("/dev/zero", "a character device"), (tmp_path / "fifo", "a FIFO"), (tmp_path, "a folder")]:
        with pytest.raises(NotRegularFile, match=kind):
            open_regular(path)
        with pytest.raises(FinetuneError, match=f"recipe {path} is {kind}"):
            read_yaml_file(path)
    (tmp_path / "r.yaml").write_text("a: 1\n")
    with open_regular(tmp_path / "r.yaml") as f:
        assert f.read() == b"a: 1\n"
