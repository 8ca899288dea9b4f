"""Loading a recipe: YAML read by userfiles.py (and an optional `base:` recipe it extends), `key.path=value`
overrides, conversion of every value by its declared type (typed.py; YAML reads `1e-4` as a string), and
checks that report every problem at once as one `FinetuneError`, before anything is downloaded,
allocated or written. Whether a named source, weights file or backbone exists is locate.py's question.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.resources
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import FinetuneError
from .locate import check_backbone, check_distinct_sources, check_path_text, check_source, check_weights, is_file
from .optimizers import resolve_optimizer
from .ranges import value_rules
from .schema import (
    REQUIRED,
    TOP_LEVEL_KEYS,
    RecipeConfig,
    RecipeLike,
)
from .typed import build_dataclass, optional_dataclass, shown, shown_text
from .userfiles import YAML_SYNTAX_ERRORS, parse_yaml, read_yaml_file

LISTED_PROBLEMS = 20  # problems a recipe error lists; the rest are counted (fix these first)


def packaged_recipes() -> dict[str, Path]:
    """Recipes shipped inside the wheel (the repository's recipes/ folder), by name."""
    try:
        folder = importlib.resources.files("finetune.recipes")
    except ModuleNotFoundError:  # a source checkout that is not installed
        return {}
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def find_recipe(name_or_path: Any, what: str = "recipe") -> Path:
    """A path to an existing file, or the name of a packaged recipe (`quickstart`). `what` names it in errors."""
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise FinetuneError(f"{what} {shown(name_or_path)} is not a recipe; give a YAML file path or the name of "
                            "a shipped recipe, such as quickstart.")
    problem = check_path_text(str(name_or_path))
    if problem:
        raise FinetuneError(f"{what} {problem}.")
    path = Path(name_or_path).expanduser()
    if is_file(path):
        return path
    shipped = packaged_recipes()
    stem = path.stem if path.suffix in (".yaml", ".yml") and len(path.parts) <= 2 else str(name_or_path)
    if stem in shipped:
        return shipped[stem]
    raise FinetuneError(f"{what} {shown(str(name_or_path))} not found (looked at {shown_text(path.resolve())}); "
                        "give a YAML file path or one of the shipped recipes: "
                        f"{', '.join(sorted(shipped)) or 'none installed'}.")


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read a recipe file and the `base:` chain beneath it, merged section by section."""
    path = path.resolve()
    if path in chain:
        raise FinetuneError(f"recipe {path} extends itself through `base:` ({' -> '.join(map(str, chain + (path,)))}).")
    raw = read_yaml_file(path) or {}
    if not isinstance(raw, dict):
        raise FinetuneError(f"recipe {path} must be a mapping of sections (model:, data:, ...), not "
                            f"{type(raw).__name__}.")
    base = raw.pop("base", None)
    if base is None:
        return raw
    # Relative to this file (an absolute base replaces the folder), else a shipped recipe's name.
    near = path.parent / base if isinstance(base, str) else None
    found = near if near is not None and is_file(near) else find_recipe(base, f"{path.name}: base:")
    return _merge(_read_yaml(found, chain + (path,)), raw)


def _merge(base: dict, child: dict) -> dict:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def parse_overrides(items: list[str] | dict[str, Any]) -> dict[str, Any]:
    """`["optim.lr=1e-3", "freeze.patterns=[a.*]"]` -> {"optim.lr": "1e-3", "freeze.patterns": ["a.*"]}."""
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise FinetuneError(f"override {item!r} is not KEY=VALUE; write for example optim.lr=1e-3.")
        try:
            out[key.strip()] = parse_yaml(text, f"override {shown(item)}") if text.strip() else None
        except YAML_SYNTAX_ERRORS:  # not YAML: the text itself
            out[key.strip()] = text
    return out


def load_recipe(recipe: RecipeLike, overrides: list[str] | dict[str, Any] | None = None) -> RecipeConfig:
    """Load, override, convert and check a recipe. Raises one FinetuneError listing every problem."""
    if isinstance(recipe, RecipeConfig):
        raw = recipe_to_dict(recipe)
    elif isinstance(recipe, dict):
        raw = copy.deepcopy(recipe)  # never edit the caller's dict
        base = raw.pop("base", None)
        if base is not None:
            raw = _merge(_read_yaml(find_recipe(base, "base:")), raw)
    else:
        raw = _read_yaml(find_recipe(recipe))
    errors: list[str] = []
    for dotted, value in parse_overrides(overrides or {}).items():
        _set_dotted(raw, dotted, value, errors)
    # A bad field falls back to its default so that the range and path checks still run on the rest:
    # every problem is reported at once. `bad` holds the keys already reported.
    bad: set[str] = set()
    config = build_dataclass(RecipeConfig, raw, "", errors, bad, REQUIRED)
    optim, optim_errors = resolve_optimizer(config.optim, bad)  # its name, and its LR and weight decay defaults
    config = _resolve_defaults(dataclasses.replace(config, optim=optim))
    errors += optim_errors + _check_values(config, bad)
    if errors:
        listed = errors[:LISTED_PROBLEMS] + ([f"... and {len(errors) - LISTED_PROBLEMS:,} more"]
                                             if len(errors) > LISTED_PROBLEMS else [])
        raise FinetuneError("the recipe has {:,} problem{}:\n  - {}".format(
            len(errors), "s" if len(errors) > 1 else "", "\n  - ".join(listed)))
    return config


def _set_dotted(raw: dict, dotted: Any, value: Any, errors: list[str]) -> None:
    if not isinstance(dotted, str):
        errors.append(f"override {shown(dotted)} must name section.key as text, e.g. optim.lr")
        return
    section, _, rest = dotted.partition(".")
    if not rest and section in TOP_LEVEL_KEYS:  # `task=multi_label`: a key of the recipe itself
        raw[section] = value
        return
    if not rest:
        errors.append(f"override {dotted!r} must name section.key, e.g. optim.lr")
        return
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        errors.append(f"override {dotted!r}: {section} is not a section")
        return
    key, _, subkey = rest.partition(".")
    hint = _section_hints(section).get(key)
    # optim.lr_mult.blocks.*=0.5 sets one entry of a mapping; train.early_stop.patience=3 one key of a
    # sub-section, turning it on when it was null.
    sub_section = optional_dataclass(hint) is not None
    if subkey and (typing.get_origin(hint) is dict or sub_section):
        if sub_section and target.get(key) is None:
            target[key] = {}
        entries = target.setdefault(key, {})
        if not isinstance(entries, dict):
            errors.append(f"override {dotted!r}: {section}.{key} is {shown(entries)}, not a mapping with entries "
                          f"to set; give the whole mapping, e.g. {section}.{key}={{{subkey!r}: ...}}")
            return
        entries[subkey] = value
    else:
        target[rest] = value


@functools.cache
def _section_hints(section: str) -> dict[str, Any]:
    """The type hints of a recipe section's keys ({} for no section); cached: thousands of overrides each ask."""
    section_cls = {f.name: f.default_factory for f in dataclasses.fields(RecipeConfig)}.get(section)
    return typing.get_type_hints(section_cls) if dataclasses.is_dataclass(section_cls) else {}


def _resolve_defaults(config: RecipeConfig) -> RecipeConfig:
    """Fill the defaults that depend on other keys (freeze.bn auto; the optimizer's LR and weight decay are
    optimizers.py's), so the saved recipe shows the settings actually used."""
    freeze = dataclasses.replace(config.freeze, bn=config.freeze.batch_norm())
    return dataclasses.replace(config, freeze=freeze)


def _check_values(c: RecipeConfig, bad: set[str]) -> list[str]:
    """Range checks and existence checks that the types alone cannot express (skipping `bad` keys)."""
    errors = []
    rules = value_rules(c)  # ranges and combinations (ranges.py), techniques' and tasks' (techniques.py)
    for key, ok, what in rules:
        if not ok and key not in bad:
            errors.append(f"{key}: {shown(functools.reduce(getattr, key.split('.'), c))} {what}")
    d = c.data
    # Paths the OS cannot take (a NUL, too long) are reported here, not as an OSError from the checks below.
    for key, text in (("data.train", d.train), ("data.val", d.val), ("data.test", d.test), ("data.root", d.root),
                      ("data.cache_dir", d.cache_dir), ("model.pretrained", c.model.pretrained)):
        problem = check_path_text(text) if isinstance(text, str) and key not in bad else None
        if problem:
            errors.append(f"{key}: {problem}")
            bad.add(key)
    checks = [("model.backbone", c.model.backbone, lambda: check_backbone(c.model.backbone)),
              ("data.train", d.train, lambda: check_source("data.train", d.train, d.root, d.download)),
              ("data.val", d.val, lambda: [] if d.val is None else check_source("data.val", d.val, d.root, d.download)),
              ("data.test", d.test, lambda: [] if d.test is None else check_source("data.test", d.test, d.root,
                                                                                  d.download)),
              ("data.train", d.train, lambda: check_distinct_sources(d.train, d.val, d.test)),
              ("model.pretrained", c.model.pretrained, lambda: check_weights(c.model.pretrained))]
    for key, value, check in checks:
        if key in bad or "data.root" in bad and key.startswith("data."):
            continue
        try:
            errors += check()
        except OSError as e:  # e.g. a folder on the way that this user may not list
            errors.append(f"{key}: cannot look at {shown(value)}: {e.strerror or e}; give a path this user can read.")
    return errors


def recipe_to_dict(config: RecipeConfig) -> dict:
    """The fully resolved recipe as plain YAML-ready data (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return {section: plain(values) for section, values in dataclasses.asdict(config).items()}


def dump_recipe(config: RecipeConfig) -> str:
    """The fully resolved recipe as YAML text, every default written out."""
    return yaml.safe_dump(recipe_to_dict(config), sort_keys=False)
