"""finetune/recipe (load.py, typed.py, locate.py): values that are the right shape but not usable, found
while the recipe is checked: infinities, nulls and lists where a number goes, out-of-range numbers, paths
the OS cannot take, `base:` that is not a name, and a key given twice in one YAML mapping. Each is a
FinetuneError naming the key, never a traceback, and nothing is written."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

import pytest
import yaml

from finetune import FinetuneError, cli
from finetune.recipe.load import load_recipe, parse_overrides
from finetune.recipe.schema import TOP_LEVEL_KEYS, RecipeConfig


def problem_line(recipe, overrides, key: str) -> str:
    """The line of the recipe error that names `key` (the error must name it)."""
    with pytest.raises(FinetuneError) as info:
        load_recipe(recipe, overrides)
    lines = [line for line in str(info.value).splitlines() if key in line]
    assert lines, str(info.value)
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# Issue 14, defect 4: values that used to end in a traceback


@pytest.mark.parametrize("override, key, shown", [
    ("train.epochs=.inf", "train.epochs", "inf"),  # int(inf): OverflowError
    ("train.epochs=null", "train.epochs", "None"),  # int(None): TypeError
    ("train.batch_size=null", "train.batch_size", "None"),
    ("train.epochs=[1, 2]", "train.epochs", "[1, 2]"),
    ("optim.lr=[0.1]", "optim.lr", "[0.1]"),  # float([0.1]): TypeError
    ("train.seed=-1", "train.seed", "-1"),  # numpy's default_rng(-1): ValueError
    ("train.warmup_epochs=inf", "train.warmup_epochs", "inf"),  # plan took it, train overflowed
    ("train.warmup_epochs=.nan", "train.warmup_epochs", "nan"),
    ("train.seed={a: 1}", "train.seed", "{'a': 1}"),
    ("freeze.phases={0: .inf}", "freeze.phases", "inf"),
])
def test_values_that_used_to_raise_are_recipe_errors(tiny_recipe, override, key, shown):
    assert shown in problem_line(tiny_recipe(), [override], key)


def test_a_path_too_long_for_the_os_is_a_recipe_error(tiny_recipe):
    line = problem_line(tiny_recipe(), {"data.train": "x" * 5000}, "data.train")
    assert "too long" in line and "5000" in line
    assert len(line) < 400  # the value is shortened, not printed 5,000 characters long


@pytest.mark.parametrize("key", ["data.val", "data.test", "data.root", "data.cache_dir", "model.pretrained"])
def test_every_path_key_is_checked_for_length(tiny_recipe, key):
    assert "too long" in problem_line(tiny_recipe(), {key: "d/" * 3000}, key)


def test_a_nul_character_in_a_path_is_a_recipe_error(tiny_recipe):
    assert "NUL" in problem_line(tiny_recipe(), {"data.train": "a\0b"}, "data.train")


@pytest.mark.parametrize("base", [["a", "b"], 3, {"x": 1}, "y" * 5000])
def test_base_that_is_not_a_recipe_name_is_a_recipe_error(tmp_path, tiny_recipe, base):
    path = tmp_path / "child.yaml"
    path.write_text(yaml.safe_dump({"base": base, **tiny_recipe()}))
    for recipe in (path, {"base": base, **tiny_recipe()}):
        with pytest.raises(FinetuneError, match="base"):
            load_recipe(recipe)


def test_a_recipe_name_too_long_for_the_os_is_a_user_error():
    with pytest.raises(FinetuneError, match="too long"):
        load_recipe("r" * 5000 + ".yaml")


def test_a_recipe_file_that_is_not_text_is_a_user_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(FinetuneError, match="r.yaml"):
        load_recipe(path)


def test_an_entry_of_a_mapping_key_that_is_not_a_mapping(tiny_recipe):
    line = problem_line(tiny_recipe(**{"optim.lr_mult": 5}), ["optim.lr_mult.stem*=0.1"], "optim.lr_mult")
    assert "5" in line


# ----------------------------------------------------------------------------------------------------
# Issue 14, defect 5: nonsense that used to be accepted


@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=1e9", "optim.lr"),
    ("optim.head_lr_mult=inf", "optim.head_lr_mult"),
    ("optim.weight_decay=inf", "optim.weight_decay"),
    ("data.color_jitter=inf", "data.color_jitter"),
    ("optim.lr_mult={'*': inf}", "optim.lr_mult"),
    ("optim.lr_mult={'*': 1e9}", "optim.lr_mult"),
    ("data.image_size=100000", "data.image_size"),
    ("data.train_image_size=100000", "data.train_image_size"),
    ("data.num_workers=1000000", "data.num_workers"),
    ("train.epochs=10000000", "train.epochs"),
    ("train.batch_size=10000000", "train.batch_size"),
    ("train.micro_batch_size=10000000", "train.micro_batch_size"),
    ("train.seed=99999999999999999999", "train.seed"),
    ("train.warmup_epochs=1e9", "train.warmup_epochs"),
    ("train.grad_clip=1e300", "train.grad_clip"),
    ("train.grad_clip=-inf", "train.grad_clip"),
    ("train.hard_examples=10000000", "train.hard_examples"),
    ("train.ema=nan", "train.ema"),
    ("freeze.stages=10000000", "freeze.stages"),
    ("freeze.phases={0: 10000000}", "freeze.phases"),
    ("data.scale=[0.5, .nan]", "data.scale"),
    ("data.crop_pct=nan", "data.crop_pct"),
    ("model.drop_path_rate=nan", "model.drop_path_rate"),
])
def test_nonsense_values_are_refused(tiny_recipe, override, key):
    problem_line(tiny_recipe(), [override], key)


def test_nonsense_is_refused_before_a_run_directory_is_made(tiny_recipe, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(recipe), "--output", str(tmp_path / "run"), "optim.lr=inf", "train.epochs=.inf"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "train.epochs" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def numeric_keys() -> list[tuple[str, Any]]:
    """Every key of the schema that holds a number, alone or inside a union, list, tuple or mapping."""
    def numeric(hint: Any) -> bool:
        return hint in (int, float) or any(numeric(a) for a in typing.get_args(hint))
    return [(f"{section.name}.{name}", hint) for section in dataclasses.fields(RecipeConfig)
            if section.name not in TOP_LEVEL_KEYS  # `task`: a key of the recipe itself, no section
            for name, hint in typing.get_type_hints(section.default_factory).items() if numeric(hint)]


def extreme(hint: Any, sign: int) -> Any:
    """A value of the declared shape whose numbers are all `sign` x 10**12."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return extreme(next(a for a in args if a in (int, float) or typing.get_args(a)), sign)
    if origin is tuple:
        return [extreme(a, sign) for a in args]
    if origin is dict:
        return {0 if args[0] is int else "*": extreme(args[1], sign)}
    return sign * 10**12


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("key, hint", numeric_keys(), ids=[key for key, _ in numeric_keys()])
def test_every_numeric_key_has_a_finite_range(tiny_recipe, key, hint, sign):
    # Closes the class, not only the examples of the issue: a numeric key added without a bound fails here.
    problem_line(tiny_recipe(), {key: extreme(hint, sign)}, key)


def test_the_numeric_keys_are_found():
    keys = {key for key, _ in numeric_keys()}
    assert {"optim.lr", "train.epochs", "data.scale", "optim.lr_mult", "freeze.phases", "train.ema"} <= keys
    assert len(keys) >= 25


@pytest.mark.parametrize("override", ["data.image_size=4096", "data.num_workers=256", "optim.lr=10",
                                      "optim.head_lr_mult=1000", "train.seed=4294967295", "data.color_jitter=1",
                                      "train.warmup_epochs=0", "optim.weight_decay=0"])
def test_values_at_the_bounds_are_accepted(tiny_recipe, override):
    load_recipe(tiny_recipe(), [override])


# ----------------------------------------------------------------------------------------------------
# Issue 14, defect 5: a key given twice in one YAML mapping


def test_duplicate_key_in_a_recipe_file_names_the_key_and_lines(tmp_path, tiny_recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()) + "optim:\n  lr: 0.1\n  name: sgd\n  lr: 0.2\n")
    with pytest.raises(FinetuneError) as info:
        load_recipe(path)
    message = str(info.value)
    lines = path.read_text().splitlines()
    first, second = (i + 1 for i, line in enumerate(lines) if line.strip().startswith("lr:"))
    assert "'lr'" in message and f"line {second}" in message and f"line {first}" in message
    assert str(path) in message


def test_duplicate_section_in_a_recipe_file_is_an_error(tmp_path, tiny_recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()) + "train:\n  epochs: 3\n")
    with pytest.raises(FinetuneError, match="'train'"):
        load_recipe(path)


def test_duplicate_key_in_an_override_value_is_an_error():
    with pytest.raises(FinetuneError, match="'a'"):
        parse_overrides(["optim.lr_mult={a: 1, a: 2}"])


def test_yaml_merge_keys_are_not_duplicates(tmp_path, tiny_recipe):
    # `<<:` merges a mapping in; a key written beside it overrides the merged one (YAML's rule), not a repeat.
    text = yaml.safe_dump({k: v for k, v in tiny_recipe().items() if k != "train"})
    path = tmp_path / "r.yaml"
    path.write_text(text + "train:\n  <<: {epochs: 3, seed: 1}\n  seed: 2\n")
    config = load_recipe(path)
    assert (config.train.epochs, config.train.seed) == (3, 2)


def test_problem_values_are_shown_shortened(tiny_recipe):
    line = problem_line(tiny_recipe(), {"train.epochs": "9" * 20 + "z" * 5000}, "train.epochs")
    assert len(line) < 400 and "5020 characters" in line


@pytest.mark.parametrize("value, expected", [(500, (500, None)), ("15min", (None, 900.0)), ("90s", (None, 90.0)),
                                             ("2h", (None, 7200.0)), ("1.5 h", (None, 5400.0)), (None, (None, None))])
def test_checkpoint_every_is_updates_or_a_duration(value, expected):
    from finetune.recipe.interval import checkpoint_interval

    assert checkpoint_interval(value) == expected


@pytest.mark.parametrize("value", ["0", "15 minutes", "0.5s", "200h", "inf s", "-3", "1e3"])
def test_checkpoint_every_names_what_it_accepts(tiny_recipe, value):
    with pytest.raises(FinetuneError, match=r"train.checkpoint_every: .* must be a number of updates \(1 to "):
        load_recipe(tiny_recipe(), [f"train.checkpoint_every={value}"])
