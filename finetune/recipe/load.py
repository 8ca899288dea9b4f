"""Loading a recipe: YAML with a safe loader (and an optional `base:` recipe it extends), `key.path=value`
overrides, conversion of every value by its declared type (typed.py; YAML reads `1e-4` as a string), and
checks that report every problem at once as one `FinetuneError`, before anything is downloaded,
allocated or written. Whether a named source, weights file or backbone exists is locate.py's question.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import FinetuneError
from .locate import check_backbone, check_distinct_sources, check_source, check_weights
from .schema import OPTIMIZER_DEFAULTS, REQUIRED, RecipeConfig, RecipeLike
from .typed import build_dataclass


def packaged_recipes() -> dict[str, Path]:
    """Recipes shipped inside the wheel (the repository's recipes/ folder), by name."""
    try:
        folder = importlib.resources.files("finetune.recipes")
    except ModuleNotFoundError:  # a source checkout that is not installed
        return {}
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def find_recipe(name_or_path: str | Path) -> Path:
    """A path to an existing file, or the name of a packaged recipe (`quickstart`)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = packaged_recipes()
    stem = path.stem if path.suffix in (".yaml", ".yml") and len(path.parts) <= 2 else str(name_or_path)
    if stem in shipped:
        return shipped[stem]
    raise FinetuneError(f"recipe {str(name_or_path)!r} not found (looked at {path.resolve()}); give a YAML file "
                        f"path or one of the shipped recipes: {', '.join(sorted(shipped)) or 'none installed'}.")


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read a recipe file and the `base:` chain beneath it, merged section by section."""
    path = path.resolve()
    if path in chain:
        raise FinetuneError(f"recipe {path} extends itself through `base:` ({' -> '.join(map(str, chain + (path,)))}).")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FinetuneError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise FinetuneError(f"recipe {path} must be a mapping of sections (model:, data:, ...), not {type(raw).__name__}.")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    return _merge(_read_yaml(base_path if base_path.is_file() else find_recipe(base), chain + (path,)), raw)


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
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = text
    return out


def load_recipe(recipe: RecipeLike, overrides: list[str] | dict[str, Any] | None = None) -> RecipeConfig:
    """Load, override, convert and check a recipe. Raises one FinetuneError listing every problem."""
    if isinstance(recipe, RecipeConfig):
        raw = recipe_to_dict(recipe)
    elif isinstance(recipe, dict):
        raw = copy.deepcopy(recipe)  # never edit the caller's dict
        if "base" in raw:
            raw = _merge(_read_yaml(find_recipe(raw.pop("base"))), raw)
    else:
        raw = _read_yaml(find_recipe(recipe))
    errors: list[str] = []
    for dotted, value in parse_overrides(overrides or {}).items():
        _set_dotted(raw, dotted, value, errors)
    # A bad field falls back to its default so that the range and path checks still run on the rest:
    # every problem is reported at once. `bad` holds the keys already reported.
    bad: set[str] = set()
    config = _resolve_defaults(build_dataclass(RecipeConfig, raw, "", errors, bad, REQUIRED))
    errors += _check_values(config, bad)
    if errors:
        raise FinetuneError("the recipe has {} problem{}:\n  - {}".format(
            len(errors), "s" if len(errors) > 1 else "", "\n  - ".join(errors)))
    return config


def _set_dotted(raw: dict, dotted: str, value: Any, errors: list[str]) -> None:
    section, _, rest = dotted.partition(".")
    if not rest:
        errors.append(f"override {dotted!r} must name section.key, e.g. optim.lr")
        return
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        errors.append(f"override {dotted!r}: {section} is not a section")
        return
    key, _, subkey = rest.partition(".")
    section_cls = {f.name: f.default_factory for f in dataclasses.fields(RecipeConfig)}.get(section)
    hint = typing.get_type_hints(section_cls).get(key) if section_cls else None
    if subkey and typing.get_origin(hint) is dict:  # optim.lr_mult.blocks.*=0.5 sets one entry of a mapping
        target.setdefault(key, {})[subkey] = value
    else:
        target[rest] = value


def _resolve_defaults(config: RecipeConfig) -> RecipeConfig:
    """Fill the defaults that depend on other keys (the optimizer's LR and weight decay, freeze.bn auto), so
    the saved recipe shows the settings actually used."""
    per_opt = OPTIMIZER_DEFAULTS[config.optim.name]
    optim = dataclasses.replace(
        config.optim,
        lr=per_opt["lr"] if config.optim.lr is None else config.optim.lr,
        weight_decay=per_opt["weight_decay"] if config.optim.weight_decay is None else config.optim.weight_decay,
    )
    freeze = dataclasses.replace(config.freeze, bn=config.freeze.batch_norm())
    return dataclasses.replace(config, optim=optim, freeze=freeze)


def _check_values(c: RecipeConfig, bad: set[str]) -> list[str]:
    """Range checks and existence checks that the types alone cannot express (skipping `bad` keys)."""
    errors = []
    rules = [
        ("optim.lr", c.optim.lr > 0, "must be > 0"),
        ("optim.head_lr_mult", c.optim.head_lr_mult > 0, "must be > 0"),
        ("optim.weight_decay", c.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.momentum", 0 <= c.optim.momentum < 1, "must be in [0, 1)"),
        ("train.epochs", c.train.epochs >= 1, "must be >= 1"),
        ("train.batch_size", c.train.batch_size == "auto" or c.train.batch_size >= 1, "must be >= 1 or auto"),
        ("train.ema", c.train.ema in (None, "auto") or 0 < c.train.ema < 1, "is a decay in (0, 1), auto or null"),
        ("train.micro_batch_size", c.train.micro_batch_size is None or c.train.micro_batch_size >= 1,
         "must be >= 1 or null"),
        ("train.warmup_epochs", c.train.warmup_epochs >= 0, "must be >= 0"),
        ("train.label_smoothing", 0 <= c.train.label_smoothing < 1, "must be in [0, 1)"),
        ("train.grad_clip", c.train.grad_clip is None or c.train.grad_clip > 0, "must be > 0 or null"),
        ("data.val_fraction", 0 < c.data.val_fraction < 1, "must be between 0 and 1"),
        ("data.image_size", c.data.image_size is None or c.data.image_size >= 8, "must be >= 8 pixels or null"),
        ("data.train_image_size", c.data.train_image_size in (None, "auto") or c.data.train_image_size >= 8,
         "must be >= 8 pixels, auto or null"),
        ("data.crop_pct", c.data.crop_pct is None or 0 < c.data.crop_pct <= 1, "must be in (0, 1] or null"),
        ("data.scale", 0 < c.data.scale[0] <= c.data.scale[1] <= 1, "must be [min, max] with 0 < min <= max <= 1"),
        ("data.hflip", 0 <= c.data.hflip <= 1, "is a probability, in [0, 1]"),
        ("data.color_jitter", c.data.color_jitter >= 0, "must be >= 0"),
        ("data.num_workers", c.data.num_workers is None or c.data.num_workers >= 0, "must be >= 0 or null"),
        ("data.feature_views", 1 <= c.data.feature_views <= 64, "must be between 1 and 64"),
        ("train.hard_examples", c.train.hard_examples >= 0, "must be >= 0 (0 turns hard examples off)"),
        ("model.drop_path_rate", 0 <= c.model.drop_path_rate < 1, "must be in [0, 1)"),
        ("optim.layer_decay", c.optim.layer_decay is None or 0 < c.optim.layer_decay <= 1, "must be in (0, 1] or null"),
        ("optim.lr_mult", all(v > 0 for v in c.optim.lr_mult.values()),
         "multipliers must be > 0 (to stop a parameter from learning, list it in freeze.patterns)"),
        ("freeze.stages", c.freeze.stages >= 0, "must be >= 0"),
        ("freeze.stages", not (c.freeze.backbone and c.freeze.stages),
         "and freeze.backbone=true both set; the backbone already takes every stage: keep one"),
        ("freeze.unfreeze_at", c.freeze.unfreeze_at is None or 0 < c.freeze.unfreeze_at < c.train.epochs,
         f"must be an epoch between 1 and train.epochs - 1 ({c.train.epochs - 1}) or null"),
        ("freeze.unfreeze_at", c.freeze.unfreeze_at is None or c.freeze.backbone or c.freeze.stages > 0,
         "thaws what freeze.backbone or freeze.stages froze; set one of them too"),
        ("freeze.unfreeze_at", c.freeze.unfreeze_at is None or not c.freeze.phases,
         "and freeze.phases both set; unfreeze_at E is the same as phases {E: 0}: keep one"),
        ("optim.name", c.optim.name != "lbfgs" or (c.freeze.backbone and c.freeze.batch_norm() == "frozen"
                                                   and c.freeze.unfreeze_at is None and not c.freeze.phases
                                                   and c.data.feature_cache == "auto"),
         "fits a linear probe's head on cached features: it needs freeze.backbone=true for the whole run, "
         "freeze.bn auto or frozen and data.feature_cache auto; use adamw or sgd to train more than the head"),
        ("freeze.phases", all(0 <= e < c.train.epochs and n >= 0 for e, n in c.freeze.phases.items()),
         f"maps epochs in [0, {c.train.epochs - 1}] to numbers of frozen stages >= 0"),
    ]
    for key, ok, what in rules:
        if not ok and key not in bad:
            section, name = key.split(".")
            errors.append(f"{key}: {getattr(getattr(c, section), name)!r} {what}")
    d = c.data
    checks = [("model.backbone", lambda: check_backbone(c.model.backbone)),
              ("data.train", lambda: check_source("data.train", d.train, d.root, d.download)),
              ("data.val", lambda: check_source("data.val", d.val, d.root, d.download) if d.val is not None else []),
              ("data.test", lambda: check_source("data.test", d.test, d.root, d.download) if d.test is not None else []),
              ("data.train", lambda: check_distinct_sources(d.train, d.val, d.test)),
              ("model.pretrained", lambda: check_weights(c.model.pretrained))]
    for key, check in checks:
        if key not in bad:
            errors += check()
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
