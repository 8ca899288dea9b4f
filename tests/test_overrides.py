"""finetune/recipe/overrides.py: every way the Python API takes overrides gives the same dotted keys."""

from __future__ import annotations

import pytest

from finetune.recipe.overrides import flatten_overrides, keyword_overrides


def test_dicts_sections_keywords_and_strings_flatten_alike():
    expected = {"optim.lr": 0.001, "train.epochs": 3}
    assert flatten_overrides({"optim.lr": 0.001, "train.epochs": 3}) == expected
    assert flatten_overrides({"optim": {"lr": 0.001}, "train__epochs": 3}) == expected
    assert flatten_overrides(["optim.lr=0.001", "train.epochs=3"]) == expected
    assert flatten_overrides(None) == {} and flatten_overrides([]) == {}


def test_a_keyword_that_is_no_override_is_pythons_kind_of_error():
    assert keyword_overrides("train", {"optim__lr": 0.1, "task": "multi_label"}) == {"optim.lr": 0.1,
                                                                                   "task": "multi_label"}
    with pytest.raises(TypeError, match=r"train\(\) got an unexpected keyword argument 'criterion'"):
        keyword_overrides("train", {"criterion": "x"})
    with pytest.raises(TypeError, match="unexpected keyword argument 'optim'"):
        keyword_overrides("train", {"optim": 0.1})  # a section needs a dict
