"""The recipe schema: typed, frozen sections, loaded from YAML with a safe loader, strictly checked.

Every default lives in the dataclasses below, on one screen, with its unit and reason. A recipe names a
timm backbone and a data source; everything else has a default chosen to fine-tune well. Loading reads
YAML (and an optional `base:` recipe it extends), applies `key.path=value` overrides, converts every
value by its declared type (YAML reads `1e-4` as a string), and reports every problem at once as one
`FinetuneError`, before anything is downloaded, allocated or written.

Converting values by type is typed.py's job; whether a named source, weights file or backbone exists is
locate.py's; turning a source into a dataset is sources.py's.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import FinetuneError
from .locate import check_backbone, check_distinct_sources, check_source, check_weights
from .typed import build_dataclass

# ----------------------------------------------------------------------------------------------------
# The schema. Defaults are a quality bar: a recipe naming only backbone, weights and data should train well.


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = ""  # required: a timm model name (`timm.list_models()`), e.g. resnet50, vit_small_patch16_224
    # true: timm's default weights (hub or local HF cache); false: random init; or a weights file:
    # a path (.safetensors, .pth, .pt, .bin) or `package:DIST_MODULE/path/in/package.pth` for weights
    # shipped inside an installed Python package.
    pretrained: Union[bool, str] = True
    drop_path_rate: float = 0.0  # stochastic depth for ViTs/ConvNeXts; 0.1 helps long fine-tunes of big models


@dataclass(frozen=True)
class DataConfig:
    # required: a source: a folder (one subfolder per class), a .csv/.jsonl manifest, hf:NAME_OR_DIR[@split],
    # torchvision:NAME[@train|test] or sklearn:digits (grammar: locate.parse_source)
    train: str = ""
    val: str | None = None  # none: a stratified, seeded split of train (val_fraction of every class)
    test: str | None = None  # evaluated once after training, with the best epoch's weights; none: no test
    val_fraction: float = 0.2  # share of each class held out when `val` is absent
    image_size: int | None = None  # pixels (square); none: the backbone's pretrained input size
    # Eval-time centre crop: resize to image_size / crop_pct, crop image_size. none: the backbone's (often
    # 0.875); 1.0 keeps the whole image, right when objects touch the border (digits, documents).
    crop_pct: float | None = None
    # Resampling filter for resizes; none: the backbone's (usually bicubic). bilinear is smoother when
    # upsampling very small images (bicubic overshoots at hard edges).
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    # Training augmentation, passed to timm's create_transform. Gentle enough for small datasets.
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range, as in timm's train.py
    hflip: float = 0.5  # probability; set 0 when a mirror image means something else (digits, text)
    color_jitter: float = 0.4  # brightness/contrast/saturation strength; 0 turns it off
    auto_augment: str | None = None  # a timm policy string such as rand-m9-mstd0.5; none: off
    num_workers: int | None = None  # loader processes per training process; none: min(8, cores / processes - 1)
    # hf: and manifests: the column holding images (or image paths) and the one holding labels. none: found
    # automatically (an Image feature and a ClassLabel; else a column named image/path/file, label/class).
    image_column: str | None = None
    label_column: str | None = None
    root: str = "data"  # folder holding torchvision:NAME datasets, relative to the working directory
    download: bool = False  # torchvision only: fetch missing files into root; off so a run never downloads by surprise
    # An unreadable, truncated or empty image file: skip (listed in data_report.json; the run goes on) or
    # error (every image is decoded once before training and all bad files are listed; nothing is written).
    on_bad_image: Literal["skip", "error"] = "skip"
    # shuffle: each image once per epoch. balanced: every class drawn equally often (with replacement), for
    # data where rare classes matter as much as common ones.
    sampler: Literal["shuffle", "balanced"] = "shuffle"


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    # The backbone's peak learning rate (the head gets lr × head_lr_mult). None: the optimizer's usual
    # fine-tuning scale, 3e-4 for adamw and 0.01 for sgd, at batch_size 64.
    lr: float | None = None
    head_lr_mult: float = 10.0  # the new head learns this many times faster than the pretrained body
    # None: 0.05 for adamw (decoupled decay), 1e-4 for sgd (L2). Never applied to norms and biases.
    weight_decay: float | None = None
    momentum: float = 0.9  # sgd only (Nesterov)
    # Layer-wise LR decay in (0, 1] (BEiT/MAE): the top body block learns at lr, each block below at
    # layer_decay times the one above; blocks come from timm's group_matcher(coarse=False). None: off.
    # 0.65-0.75 suits ViTs; convnets need less (0.8-0.9). The head sits head_lr_mult above the top block.
    layer_decay: float | None = None
    # LR multipliers by parameter-name glob, e.g. {"stem.*": 0.1}; several matches multiply. A glob that
    # matches no parameter is an error (it is almost always a typo).
    lr_mult: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FreezeConfig:
    # true: the whole body is frozen, only the head trains (a linear probe; BatchNorm follows `bn`).
    backbone: bool = False
    # Freeze the first N groups of timm's group_matcher(coarse=True): the stem, then stages (convnets)
    # or blocks (ViTs). `finetune plan` shows the stage of every group. 0: none.
    stages: int = 0
    # Parameter-name globs (fnmatch) frozen for the whole run, e.g. ["patch_embed.*", "*.norm*"].
    patterns: list[str] = field(default_factory=list)
    # BatchNorm inside frozen parts. eval (default): running statistics fixed (module in eval mode), the
    # affine trains and absorbs a domain shift; the frozen part computes the same function on any number
    # of devices and at any batch size. train: batch statistics, running statistics and affine all update
    # (fastai's train_bn). frozen: statistics and affine fixed, bit for bit as loaded. README: measurements.
    bn: Literal["train", "eval", "frozen"] = "eval"
    # Gradual unfreezing. unfreeze_at E: what backbone/stages froze trains from epoch E (0-based: after
    # E finished epochs), fastai-style. phases {EPOCH: STAGES}: from EPOCH on, only the first STAGES
    # stages stay frozen, e.g. {0: 4, 2: 2, 4: 0}; stages may only thaw. Both none/empty: no phases.
    unfreeze_at: int | None = None
    phases: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # global: images per optimizer update, summed over all processes
    # Images one device holds in one forward/backward pass; none: batch_size / processes. When smaller,
    # gradient accumulation fills the global batch, so the recipe trains the same on 1 GPU or 8.
    micro_batch_size: int | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs that have it, else fp32
    seed: int = 0  # one seed for model init, data order, split and augmentation
    warmup_epochs: float = 1.0  # linear warmup, then cosine to zero; protects the body from the random head
    label_smoothing: float = 0.1  # cross-entropy smoothing; regularises small fine-tuning sets
    grad_clip: float | None = None  # max global gradient norm; none: no clipping
    # auto: weigh each class's loss by inverse frequency (N / (classes x count)), so rare classes count as much
    # as common ones; none: every image weighs the same.
    class_weights: Literal["none", "auto"] = "none"
    # After training: this many highest-loss train and val images (the likely label errors) go into
    # hard_examples.json and a PNG grid; 0 skips the extra inference pass over train and val.
    hard_examples: int = 24
    # BatchNorm statistics over the whole global batch instead of each device's share (several GPUs only):
    # worth it when the per-device batch is small (under ~16); costs a synchronisation per BatchNorm layer.
    sync_bn: bool = False
    # Images and conv weights in NHWC layout, which tensor cores prefer. none: on for convolutional nets
    # on CUDA, off on CPU and for ViTs (one patch-embedding conv gains nothing).
    channels_last: bool | None = None


@dataclass(frozen=True)
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_REQUIRED = {"model.backbone": "a timm model name", "data.train": "a data source"}
# Per-optimizer defaults for `optim.lr` and `optim.weight_decay` when a recipe leaves them out.
OPTIMIZER_DEFAULTS = {"adamw": {"lr": 3e-4, "weight_decay": 0.05}, "sgd": {"lr": 0.01, "weight_decay": 1e-4}}

# ----------------------------------------------------------------------------------------------------
# Loading: YAML (+ base) -> nested dict -> overrides -> typed, checked RecipeConfig.

RecipeLike = Union[str, Path, dict, RecipeConfig]


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
    config = _resolve_defaults(build_dataclass(RecipeConfig, raw, "", errors, bad, _REQUIRED))
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
    """Fill the optimizer-dependent defaults so the saved recipe shows the numbers actually used."""
    per_opt = OPTIMIZER_DEFAULTS[config.optim.name]
    optim = dataclasses.replace(
        config.optim,
        lr=per_opt["lr"] if config.optim.lr is None else config.optim.lr,
        weight_decay=per_opt["weight_decay"] if config.optim.weight_decay is None else config.optim.weight_decay,
    )
    return dataclasses.replace(config, optim=optim)


def _check_values(c: RecipeConfig, bad: set[str]) -> list[str]:
    """Range checks and existence checks that the types alone cannot express (skipping `bad` keys)."""
    errors = []
    rules = [
        ("optim.lr", c.optim.lr > 0, "must be > 0"),
        ("optim.head_lr_mult", c.optim.head_lr_mult > 0, "must be > 0"),
        ("optim.weight_decay", c.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.momentum", 0 <= c.optim.momentum < 1, "must be in [0, 1)"),
        ("train.epochs", c.train.epochs >= 1, "must be >= 1"),
        ("train.batch_size", c.train.batch_size >= 1, "must be >= 1"),
        ("train.micro_batch_size", c.train.micro_batch_size is None or c.train.micro_batch_size >= 1,
         "must be >= 1 or null"),
        ("train.warmup_epochs", c.train.warmup_epochs >= 0, "must be >= 0"),
        ("train.label_smoothing", 0 <= c.train.label_smoothing < 1, "must be in [0, 1)"),
        ("train.grad_clip", c.train.grad_clip is None or c.train.grad_clip > 0, "must be > 0 or null"),
        ("data.val_fraction", 0 < c.data.val_fraction < 1, "must be between 0 and 1"),
        ("data.image_size", c.data.image_size is None or c.data.image_size >= 8, "must be >= 8 pixels or null"),
        ("data.crop_pct", c.data.crop_pct is None or 0 < c.data.crop_pct <= 1, "must be in (0, 1] or null"),
        ("data.scale", 0 < c.data.scale[0] <= c.data.scale[1] <= 1, "must be [min, max] with 0 < min <= max <= 1"),
        ("data.hflip", 0 <= c.data.hflip <= 1, "is a probability, in [0, 1]"),
        ("data.color_jitter", c.data.color_jitter >= 0, "must be >= 0"),
        ("data.num_workers", c.data.num_workers is None or c.data.num_workers >= 0, "must be >= 0 or null"),
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


def save_recipe(config: RecipeConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe_to_dict(config), sort_keys=False))
