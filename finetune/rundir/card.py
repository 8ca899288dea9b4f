"""The run's model card: `README.md` in the Hugging Face model-card format, written from the run directory.

Metadata first, written by huggingface_hub's `ModelCardData` as the YAML front matter the hub reads
(`library_name: timm`, `pipeline_tag: image-classification`, tags, the starting weights as `base_model`
when they came from the hub, and the exported epoch's metrics as `EvalResult`s, its `model-index`),
then what a person reads: what the model classifies, how to load it with timm from the folder
(`local-dir:`) and after `hf upload` (`hf-hub:`), the data, the metrics per epoch with the curves, and
the full recipe. Uploading the run directory then gives a hub model that `timm.create_model` loads.

Everything comes from files the run already wrote (recipe.yaml, metrics.jsonl, config.json,
data_report.json, environment.json, test_metrics.json when there is one), so the card can be rewritten
at any time; the loop rewrites it with every export (training/loop.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..atomic import write_atomic
from ..data.badimages import DATA_REPORT_NAME
from ..errors import FinetuneError
from ..model.custom import CUSTOM_ARCHITECTURE, custom_usage
from ..model.environment import ENVIRONMENT_NAME
from ..model.export import CONFIG_NAME
from ..recipe.userfiles import parse_yaml
from ..reporting.review import TEST_METRICS_NAME
from ..tasks import SingleLabel, Task, load_task
from .folder import CARD_NAME, CURVES_NAME, RECIPE_NAME
from .records import METRICS_NAME, read_metrics_file

MAX_LISTED_CLASSES = 30
# The metrics of a record the card's metadata lists: (key in metrics.jsonl after the split's prefix, the
# hub's metric type, its name after the split's); a record lists those its task wrote.
CARD_METRICS = (("acc", "accuracy", "accuracy"), ("balanced_acc", "accuracy", "balanced accuracy"),
                ("map", "mAP", "mAP"), ("f1_micro", "f1", "micro F1"), ("mae", "mae", "MAE"),
                ("rmse", "rmse", "RMSE"), ("r2", "r_squared", "R²"))
# The metadata as huggingface_hub writes it (card_data), then the text a person reads.
TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"


def save_card(run_dir: Path) -> None:
    """(Re)write README.md in `run_dir`, a run directory with recipe.yaml and an export."""
    write_atomic(Path(run_dir) / CARD_NAME, render_card(Path(run_dir)))


def render_card(run_dir: Path) -> str:
    recipe_text = (run_dir / RECIPE_NAME).read_text()
    recipe = parse_yaml(recipe_text, f"run recipe {run_dir / RECIPE_NAME}")
    config = _read_json(run_dir / CONFIG_NAME) or {}
    records = read_metrics_file(run_dir / METRICS_NAME)[0]
    exported = _exported_record(records)
    test = _read_json(run_dir / TEST_METRICS_NAME)
    try:
        task = load_task(config)  # its metrics and what predict gives
    except FinetuneError:  # a task of one's own, which config.json cannot rebuild: described as a classifier
        task = SingleLabel()
    sections = [
        _intro(recipe, config, exported, len(records), task),
        _usage(run_dir, config, task),
        _data(recipe, _read_json(run_dir / DATA_REPORT_NAME)),
        _results(records, test, (run_dir / CURVES_NAME).is_file(), task),
        "## Recipe\n\nThe fully resolved recipe (`recipe.yaml`; `finetune train recipe.yaml` repeats the run):\n\n"
        f"```yaml\n{recipe_text.rstrip()}\n```",
        _environment(_read_json(run_dir / ENVIRONMENT_NAME)),
    ]
    body = "\n\n".join(s for s in sections if s) + "\n"
    data = card_data(run_dir.name, recipe, config, exported, test)
    return str(ModelCard.from_template(data, template_str=TEMPLATE, body=body))


def card_data(name: str, recipe: dict, config: dict, exported: dict | None, test: dict | None) -> ModelCardData:
    """The card's metadata (its YAML front matter), as the Hugging Face hub reads it."""
    model, data = recipe.get("model", {}), recipe.get("data", {})
    backbone = str(model.get("backbone", config.get("architecture", "")))
    library = "pytorch" if config.get("architecture") == CUSTOM_ARCHITECTURE else "timm"  # timm cannot load custom
    base = base_model(backbone, model.get("pretrained"), config)
    # The starting weights' license; finetune cannot know one for other weights.
    license_ = config.get("pretrained_cfg", {}).get("license") if base else None
    results, val_source = [], data.get("val") or data.get("train")
    for split, record, prefix, source in (("validation", exported, _val_prefix(exported), val_source),
                                          ("test", test, "test", data.get("test"))):
        results += [EvalResult(task_type="image-classification", task_name="Image Classification",
                               dataset_name=_dataset_name(str(source)), dataset_type=_dataset_type(str(source)),
                               dataset_split=split, metric_type=kind, metric_value=record[f"{prefix}_{key}"],
                               metric_name=f"{split.title()} {label}")
                    for key, kind, label in CARD_METRICS
                    if record and isinstance(record.get(f"{prefix}_{key}"), (int, float))]
    return ModelCardData(library_name=library, pipeline_tag="image-classification",
                         tags=["image-classification", library, "finetune"], base_model=base, license=license_ or None,
                         metrics=list(dict.fromkeys(r.metric_type for r in results)) or None,
                         eval_results=results or None, model_name=name if results else None)


def base_model(backbone: str, pretrained, config: dict) -> str | None:
    """The hub repository the starting weights came from: only when timm downloaded them (pretrained: true);
    a weights file or a random start names none."""
    if pretrained is not True:
        return None
    if backbone.startswith("hf-hub:"):
        return backbone.removeprefix("hf-hub:").split("@")[0]
    tag = config.get("pretrained_cfg", {}).get("tag")
    name = f"{config.get('architecture', backbone)}.{tag}" if tag else backbone
    # An architecture this timm does not know names no base model rather than a wrong one.
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False) if timm.is_model(name) else None
    return getattr(cfg, "hf_hub_id", None) or None


def _val_prefix(record: dict | None) -> str:
    return "ema_val" if record and record.get("exported") == "ema" else "val"


def _dataset_name(source: str) -> str:
    """A data source as the hub shows it: a folder or manifest by its name (not the user's absolute path)."""
    if ":" in source and not os.path.exists(source):  # hf:beans, torchvision:CIFAR10, sklearn:digits
        return source
    return Path(source).name or source


def _dataset_type(source: str) -> str:
    if source.startswith("hf:"):
        return source.removeprefix("hf:").split("@")[0]
    if ":" in source and not os.path.exists(source):  # torchvision:CIFAR10, sklearn:digits, python:train_data
        return source.split(":", 1)[1].split("@")[0].lower()
    return "imagefolder" if os.path.isdir(source) else "manifest"


def _intro(recipe: dict, config: dict, exported: dict | None, epochs_run: int, task: Task) -> str:
    model = recipe.get("model", {})
    backbone = model.get("backbone", config.get("architecture"))
    labels = [str(x) for x in config.get("label_names") or []]
    listed = ", ".join(f"`{x}`" for x in labels[:MAX_LISTED_CLASSES])
    more = f" and {len(labels) - MAX_LISTED_CLASSES} more" if len(labels) > MAX_LISTED_CLASSES else ""
    pretrained = model.get("pretrained")
    start = {True: "timm's pretrained weights" + (f" (`{config.get('pretrained_cfg', {}).get('tag')}`)"
                                                   if config.get("pretrained_cfg", {}).get("tag") else ""),
             False: "random weights (no pretraining)"}.get(pretrained, f"the weights file `{pretrained}`")
    if config.get("architecture") == CUSTOM_ARCHITECTURE:  # model.pretrained is not read for a module of one's own
        start = "the weights the module came with"
    kind = (f"A `{config.get('module_class')}` (a module of your own, passed to finetune.train)"
            if config.get("architecture") == CUSTOM_ARCHITECTURE else
            f"A [timm](https://github.com/huggingface/pytorch-image-models) `{config.get('architecture', backbone)}`")
    text = (f"# {backbone} fine-tuned with finetune\n\n"
            f"{kind} {task.card_subject(len(labels), listed + more)}, fine-tuned with finetune from "
            f"{start}.")
    if exported:
        which = "the moving average (EMA) of the weights" if exported.get("exported") == "ema" else "the weights"
        (key, _, metric), _ = task.card_columns()  # the task's selection metric
        acc = exported.get(f"{_val_prefix(exported)}_{key}")
        epochs = recipe.get("train", {}).get("epochs", "?")
        text += (f" The model is {which} after epoch {exported['epoch']} of {epochs}, the best by validation {metric}"
                 + (f" ({task.format_value(acc)})" if isinstance(acc, (int, float)) else "")
                 + f" of the {epochs_run} epoch(s) finished when this card was written.")
    return text


def _usage(run_dir: Path, config: dict, task: Task) -> str:
    local = _shown_path(run_dir)
    size = config.get("pretrained_cfg", {}).get("input_size", [3, 224, 224])
    if config.get("architecture") == CUSTOM_ARCHITECTURE:  # timm cannot rebuild it: the user's class can
        return custom_usage(config)
    scores, shown = task.card_usage()  # a softmax, a sigmoid per label, a number in the user's units
    return f"""## How to use it

With timm alone (no finetune needed). From this folder:

```python
import timm
import torch
from PIL import Image

model = timm.create_model("local-dir:{local}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
labels = model.pretrained_cfg["label_names"]
with torch.no_grad():
    probs = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0)){scores}
print({shown})
```

After uploading the folder to the Hugging Face hub (the checkpoint is only needed to resume training):

```bash
hf upload YOUR_NAME/{run_dir.name} {local} . --exclude "checkpoint/*"   # older huggingface_hub: huggingface-cli upload
```

```python
model = timm.create_model("hf-hub:YOUR_NAME/{run_dir.name}", pretrained=True).eval()
```

The model takes {size[0]}x{size[1]}x{size[2]} images preprocessed as `config.json` says (the transform above).
`finetune export {local} --format onnx` (or `torchscript`) writes a checked ONNX or TorchScript file."""


def _shown_path(run_dir: Path) -> str:
    """The folder relative to the working directory when it is inside it; else its name (an absolute path
    would put the user's home folder on the hub)."""
    try:
        return run_dir.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return run_dir.name


def _data(recipe: dict, report: dict | None) -> str:
    data = recipe.get("data", {})
    sizes = (report or {}).get("images", {})
    rows = []
    for split in ("train", "val", "test"):
        source = data.get(split)
        if split == "val" and not source and data.get("train"):
            seed = recipe.get("train", {}).get("seed")
            source = f"{100 * float(data.get('val_fraction', 0.2)):g}% of train, stratified (seed {seed})"
        if source or sizes.get(split):
            rows.append(f"| {split} | {_cell(source)} | {sizes.get(split, '')} |")
    text = "## Data\n\n| split | source | images |\n| --- | --- | --- |\n" + "\n".join(rows)
    skipped = (report or {}).get("skipped_count")
    if skipped:
        text += f"\n\n{skipped} unreadable image(s) were skipped; `data_report.json` lists them."
    return text


def _results(records: list[dict], test: dict | None, curves: bool, task: Task) -> str:
    if not records:
        return ""
    (key, name, prose), (second, second_name, second_prose) = task.card_columns()

    def shown(value) -> str:
        return task.format_value(value) if isinstance(value, (int, float)) else ""
    ema = any(f"ema_val_{key}" in r for r in records)
    head = (f"| epoch | train loss | val loss | val {name} | val {second_name} |"
            + (f" EMA val {name} |" if ema else "") + " exported |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in records:
        cells = [str(r.get("epoch")), _num(r.get("train_loss")), _num(r.get("val_loss")), shown(r.get(f"val_{key}")),
                 shown(r.get(f"val_{second}"))] + ([shown(r.get(f"ema_val_{key}"))] if ema else [])
        lines.append("| " + " | ".join(cells + [r.get("exported") or ""]) + " |")
    text = ("## Results\n\nPer epoch (`metrics.jsonl` has every number, per-class accuracy included):\n\n"
            + "\n".join(lines))
    if test:
        scores = f"{prose} {shown(test.get(f'test_{key}'))}, {second_prose} {shown(test.get(f'test_{second}'))}"
        text += (f"\n\nTest set, with the exported weights (epoch {test.get('epoch')}): {scores} "
                 f"({test.get('test_images')} images).")
    if curves:
        text += "\n\n![loss and accuracy per epoch](curves.png)"
    return text


def _environment(env: dict | None) -> str:
    if not env:
        return ""
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    gpus = env.get("devices", {}).get("gpus") or []
    git = env.get("git") or {}
    text = (f"## Environment\n\nTrained on {env.get('training_device')} ({len(gpus)} GPU(s): "
            f"{', '.join(gpus) or 'none'}), {env.get('processes')} process(es); Python {env.get('python')}; "
            f"{versions}.")
    if git.get("commit"):
        changes = " with uncommitted changes" if git.get("dirty") else ""
        text += f" Working directory at git commit `{git['commit'][:12]}`{changes}."
    return text + f" `{ENVIRONMENT_NAME}` has the details and the command line."


def _exported_record(records: list[dict]) -> dict | None:
    exported = [r for r in records if r.get("exported")]
    return exported[-1] if exported else None


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(value) -> str:
    return str(value).replace("|", "\\|")


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""
