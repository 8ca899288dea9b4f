"""finetune/recipe/optimizers.py: which names optim.name takes (ours and timm's), the "did you mean" for
a misspelt one, and the LR and weight decay a recipe gets when it leaves them out."""

from __future__ import annotations

import pytest

from finetune.errors import FinetuneError
from finetune.recipe.load import load_recipe
from finetune.recipe.optimizers import optimizer_names


def problems(recipe, overrides) -> str:
    with pytest.raises(FinetuneError) as info:
        load_recipe(recipe, overrides)
    return str(info.value)


def test_timm_names_are_accepted_beside_our_own():
    names = optimizer_names()
    assert names[:3] == ["adamw", "sgd", "lbfgs"]
    assert {"lamb", "lion", "adafactor", "adam"} <= set(names)
    assert "adahessian" not in names and len(names) == len(set(names))


def test_a_timm_optimizer_with_lr_and_weight_decay_loads_as_given(tiny_recipe):
    config = load_recipe(tiny_recipe(), ["optim.name=lamb", "optim.lr=2e-3", "optim.weight_decay=0.02"])
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == ("lamb", 2e-3, 0.02)


def test_lion_has_defaults_by_the_papers_rule(tiny_recipe):
    config = load_recipe(tiny_recipe(), ["optim.name=lion"])
    assert (config.optim.lr, config.optim.weight_decay) == (3e-5, 0.5)


def test_a_timm_optimizer_without_a_default_needs_lr_and_weight_decay(tiny_recipe):
    message = problems(tiny_recipe(), ["optim.name=lamb"])
    assert "2 problems" in message
    assert "optim.lr: optim.name=lamb is timm's" in message and "optim.weight_decay:" in message
    message = problems(tiny_recipe(), ["optim.name=lamb", "optim.lr=1e-3", "optim.head_lr_mult=0"])
    assert "optim.weight_decay" in message and "optim.head_lr_mult" in message  # other checks still run


@pytest.mark.parametrize("name, suggested", [("lamm", "lamb"), ("lino", "lion"), ("AdamW", "adamw"),
                                             ("adafactr", "adafactor")])
def test_a_misspelt_name_gets_close_names(tiny_recipe, name, suggested):
    message = problems(tiny_recipe(), [f"optim.name={name}"])
    assert "1 problem" in message  # lr and weight decay fall back to adamw's: one mistake, one line
    line = next(line for line in message.splitlines() if "optim.name" in line)
    assert repr(name) in line and "did you mean" in line and suggested in line.split("did you mean")[1]


def test_an_unrelated_name_says_how_to_list_timms(tiny_recipe):
    assert "list_optimizers()" in problems(tiny_recipe(), ["optim.name=qqqqqq"])


def test_adahessian_is_refused_with_the_reason(tiny_recipe):
    assert "second-order" in problems(tiny_recipe(), ["optim.name=adahessian"])
