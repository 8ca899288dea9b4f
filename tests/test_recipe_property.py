"""finetune/recipe, property-based (hypothesis): whatever a recipe or override says, loading it either gives
a checked config or raises the toolkit's one user error, naming a key. Values of every kind (numbers with
infinities, NaN, huge and negative ones, strings up to thousands of characters, null, lists, mappings) go
into every key of every section, next to unknown keys and sections. `finetune.plan` gets fewer examples
(each one opens the data and builds test_resnet) to show that a recipe that loads also plans or is refused
by a FinetuneError."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Literal, Union

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import finetune
from finetune import FinetuneError
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import TOP_LEVEL_KEYS, RecipeConfig

SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(RecipeConfig) if f.name not in TOP_LEVEL_KEYS}
KEYS = [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
HINTS = {(section, name): hint for section, cls in SECTIONS.items()
         for name, hint in typing.get_type_hints(cls).items()}
# Each example loads in about a millisecond. How many run is the Hypothesis profile's (tests/conftest.py:
# 50 in the fast tier, 500 in the full suite), from a fixed seed, writing no example database into the checkout.
SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

NASTY_NUMBERS = [0, 1, -1, 2, 0.5, -0.5, 1e-300, 1e300, -1e300, math.inf, -math.inf, math.nan, 2**31, 2**32,
                 2**63, 2**64, -(2**63), 10**30, 4096, 4097, 256, 257, 1e9]
NASTY_STRINGS = ["", " ", "auto", "none", "null", "true", "false", "1e-4", "inf", ".inf", "-inf", "nan", "1_000",
                 "0x10", "x" * 5000, "d/" * 3000, "a\0b", "~", "/", ".", "..", "hf:beans", "hf:", "torchvision:MNIST",
                 "torchvision:CIFAR10@test", "sklearn:digits", "sklearn:iris", "python:train_data", "package:os/x.pth",
                 "package:no_such_module/x.pth", "w.safetensors", "data/train.csv", "rand-m9-mstd0.5", "*", "[", "{"]
NASTY_INTEGERS = [n for n in NASTY_NUMBERS if isinstance(n, int)]
# Printable ASCII, control characters and a few beyond ASCII (accents, CJK, right-to-left override): a fixed
# alphabet, as hypothesis's default one costs seconds of Unicode tables on a fresh machine.
ALPHABET = "".join(map(chr, range(32, 127))) + "\0\t\n\r\x1b\x7fé字\u202e\U0001f600"
text = functools.partial(st.text, alphabet=ALPHABET)
numbers = st.one_of(st.integers(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
                    st.sampled_from(NASTY_NUMBERS))
strings = st.one_of(text(max_size=12), st.sampled_from(NASTY_STRINGS))
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
keys = st.one_of(text(max_size=6), st.integers(-3, 3))
wild = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(keys, inner, max_size=3)), max_leaves=6)


def typed(hint: Any) -> st.SearchStrategy:
    """Values of the declared type, across their whole range (so that the range checks get their turn)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):  # a sub-section (train.early_stop): any of its keys, each of its type
        return st.fixed_dictionaries({}, optional={name: typed(h) for name, h in typing.get_type_hints(hint).items()})
    if origin in (Union, types.UnionType):
        return st.one_of([st.none() if a is type(None) else typed(a) for a in args])
    if origin is Literal:
        return st.sampled_from(args)
    if origin is tuple:
        return st.tuples(*map(typed, args)).map(list)
    if origin is list:
        return st.lists(typed(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(typed(args[0]), typed(args[1]), max_size=3)
    return {bool: st.booleans(), str: strings,
            int: st.one_of(st.integers(0, 8), st.integers(-3, 70), st.integers(), st.sampled_from(NASTY_INTEGERS)),
            float: st.one_of(st.floats(0, 1), st.floats(-2, 2), numbers)}[hint]


def value_for(key: tuple[str, str]) -> st.SearchStrategy:
    # Mostly the declared type (so that examples get past the type check to the range checks and beyond),
    # else anything; and sometimes as YAML text, as a command line gives it.
    value = st.sampled_from([typed(HINTS[key])] * 3 + [wild]).flatmap(lambda strategy: strategy)
    return st.one_of(value, value.map(as_yaml))


def as_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@st.composite
def recipes(draw) -> tuple[dict, dict, set[str]]:
    """(recipe edits, overrides, the names an error may give): edits and overrides of known keys with any
    value, unknown keys and sections, and whole sections replaced."""
    edits: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True)):
        edits[".".join(key)] = draw(value_for(key))
    if draw(st.integers(0, 4)) == 0:
        section = draw(st.sampled_from(list(SECTIONS) + ["modle", "extra"]))
        edits[f"{section}.{draw(text(min_size=1, max_size=8))}"] = draw(wild)
    if draw(st.integers(0, 9)) == 0:
        edits[draw(st.sampled_from(list(SECTIONS)))] = draw(wild)
    overrides = {".".join(key): draw(value_for(key))
                 for key in draw(st.lists(st.sampled_from(KEYS), max_size=2, unique=True))}
    names = set(edits) | set(overrides) | {key.split(".")[0] for key in (*edits, *overrides)}
    return edits, overrides, names


def apply(base: dict, edits: dict) -> dict:
    recipe = {section: dict(values) for section, values in base.items()}
    for dotted, value in edits.items():
        section, _, key = dotted.partition(".")
        if not key:
            recipe[section] = value
        elif isinstance(recipe.setdefault(section, {}), dict):
            recipe[section][key] = value
    return recipe


def assert_names_a_key(error: FinetuneError, names: set[str]) -> None:
    """The message names one of the keys the example touched, and each listed problem starts with its key."""
    message = str(error)
    assert any(name in message for name in names), message
    for line in message.splitlines()[1:]:
        first = line.removeprefix("  - ").split(":")[0].split(" ")[0]
        assert first.split(".")[0] in SECTIONS or first in names or first == "override", message


def assert_checked(config: RecipeConfig) -> None:
    """A recipe that loads holds only finite numbers."""
    def leaves(value):
        if isinstance(value, dict):
            for k, v in value.items():
                yield k
                yield from leaves(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from leaves(v)
        else:
            yield value
    for value in leaves(dataclasses.asdict(config)):
        assert not isinstance(value, float) or math.isfinite(value), config


@pytest.fixture(scope="module")
def base_recipe(tmp_path_factory, make_image_folder, make_recipe) -> dict:
    root = make_image_folder(tmp_path_factory.mktemp("property") / "data", classes=2, per_class=4, size=16)
    return make_recipe(root)


@settings(**SETTINGS)
@given(example=recipes(), as_text=st.booleans())
def test_any_recipe_loads_or_raises_a_user_error_naming_a_key(base_recipe, example, as_text):
    edits, overrides, names = example
    recipe = apply(base_recipe, edits)
    given_overrides: Any = overrides
    if as_text:  # as the command line gives them: KEY=TEXT, strings as typed (`[`, `a: b`, `*`), the rest as YAML
        given_overrides = [f"{k}={v if isinstance(v, str) else as_yaml(v)}" for k, v in overrides.items()]
    try:
        config = load_recipe(recipe, given_overrides)
    except FinetuneError as e:
        event("refused")
        assert_names_a_key(e, names)
    else:
        event("loaded")
        assert_checked(config)


@settings(max_examples=max(1, settings.default.max_examples // 5), **SETTINGS)  # each builds a model
@given(example=recipes())
def test_plan_refuses_with_a_user_error_or_plans(base_recipe, example):
    edits, overrides, names = example
    try:
        finetune.plan(apply(base_recipe, edits), **overrides)
    except FinetuneError as e:
        event("refused")
        assert_names_a_key(e, names)
    else:
        event("planned")
