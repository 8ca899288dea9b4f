"""Recipe overrides as the Python API takes them (a dict of dotted keys, a section's dict, `section__key`
keywords, or a list of `key=value` strings), flattened to the dotted keys load.py applies.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .load import parse_overrides
from .schema import TOP_LEVEL_KEYS, RecipeConfig


def keyword_overrides(function: str, kw: dict[str, Any]) -> dict[str, Any]:
    """Recipe overrides given as keywords: section__key=value, a section's dict, or **{"section.key": value}.
    Anything else is a misspelt Python argument (criterion=...) and gets Python's own kind of error."""
    sections = [f.name for f in dataclasses.fields(RecipeConfig)]
    for key, value in kw.items():
        if not ("." in key or "__" in key or key in TOP_LEVEL_KEYS  # task="multi_label"
                or (key in sections and isinstance(value, dict))):
            raise TypeError(f"{function}() got an unexpected keyword argument {key!r}; recipe overrides are "
                            "section__key=value (optim__lr=1e-3), a section's dict (optim={'lr': 1e-3}) or "
                            "overrides={'optim.lr': 1e-3}")
    return flatten_overrides(kw)


def flatten_overrides(overrides: dict[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if not isinstance(overrides, dict):
        return parse_overrides(list(overrides))
    flat = {}
    for key, value in overrides.items():
        key = key.replace("__", ".")
        if "." not in key and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat
