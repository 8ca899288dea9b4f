"""Every source type, built locally from tiny generated images: opened by load_source (classes, labels,
lazy decoding), then trained for one epoch through the CLI and through the Python API.

The sources hold the same 24 images (16 px, classes cat/dog/c10) in each format: a Hugging Face
dataset written by save_to_disk and as parquet, CSV and JSONL manifests, and a torchvision MNIST root
in its raw idx format. Runs are tiny (test_resnet, 16 px, one epoch, no hard examples except where checked).
"""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import finetune
from finetune import FinetuneError, cli
from finetune.data.samples import FileSamples, HFSamples
from finetune.data.sources import load_source, wrap_in_memory
from finetune.data.splits import build_splits
from finetune.recipe.locate import SourceSpec, parse_source
from finetune.recipe.schema import DataConfig

CLASSES = ["cat", "dog", "c10"]  # sorted naturally by the readers that sort: c10, cat, dog
PER_CLASS = 8
SIZE = 16


def tiny_recipe(train: str, **overrides) -> dict:
    recipe = {"model": {"backbone": "test_resnet", "pretrained": False},
              "data": {"train": train, "image_size": SIZE, "num_workers": 0},
              "train": {"epochs": 1, "batch_size": 8, "hard_examples": 0}}
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        recipe.setdefault(section, {})[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_mnist_raw(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """torchvision's MNIST on-disk format: ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte,
    big-endian idx files (magic 0x0803 for uint8 3-d images, 0x0801 for 1-d labels)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        n, h, w = images.shape
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, n, h, w)
                                                          + images.astype(np.uint8).tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, n)
                                                          + labels.astype(np.uint8).tobytes())
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """One tiny dataset in every on-disk format. Returns {name: source string} plus "_pairs" and "_root"."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    pairs = []
    for k, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            mean = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220]][k], dtype=float)
            pixels = np.clip(rng.normal(mean, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            path = root / "images" / name / f"{i}.png"
            Image.fromarray(pixels).save(path)
            pairs.append((str(path), name))

    # Hugging Face: ClassLabel in the order given (not sorted), image bytes embedded by save_to_disk.
    hf = datasets.Dataset.from_dict({"img": [p for p, _ in pairs], "label": [CLASSES.index(c) for _, c in pairs]})
    hf = hf.cast_column("img", datasets.Image()).cast_column("label", datasets.ClassLabel(names=CLASSES))
    hf.save_to_disk(str(root / "hf_disk"))
    # Parquet: string labels (become classes, natural order), file name `train-...` makes the split.
    (root / "hf_parquet").mkdir()
    strings = datasets.Dataset.from_dict({"image": [p for p, _ in pairs], "species": [c for _, c in pairs]})
    strings.cast_column("image", datasets.Image()).to_parquet(str(root / "hf_parquet" / "train-00000-of-00001.parquet"))

    with open(root / "images" / "labels.csv", "w", newline="") as f:  # paths relative to the manifest
        writer = csv.writer(f)
        writer.writerow(["file", "class"])
        writer.writerows([(Path(p).relative_to(root / "images").as_posix(), c) for p, c in pairs])
    (root / "images" / "labels.jsonl").write_text(
        "".join(json.dumps({"path": Path(p).relative_to(root / "images").as_posix(), "label": c}) + "\n"
                for p, c in pairs))

    digits = np.zeros((20, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1] * 10)
    digits[labels == 1, 4:24, 12:16] = 255  # "ones" are a bar, "zeros" blank
    write_mnist_raw(root / "tv", digits, labels)
    return {"hf_disk": f"hf:{root / 'hf_disk'}", "hf_parquet": f"hf:{root / 'hf_parquet'}",
            "csv": str(root / "images" / "labels.csv"), "jsonl": str(root / "images" / "labels.jsonl"),
            "mnist": "torchvision:MNIST", "_root": root, "_pairs": pairs, "_hf": hf}


def data_cfg(source: str, root: Path) -> DataConfig:
    return DataConfig(train=source, root=str(root / "tv"), label_column=LABEL_COLUMN.get(source.rsplit("_", 1)[-1]))


# The parquet copy names its label column "species", which is not a name the readers guess.
LABEL_COLUMN = {"parquet": "species"}


@pytest.mark.parametrize("text, scheme, name, split", [
    ("path/to/train", "folder", "path/to/train", None),
    ("labels.CSV", "manifest", "labels.CSV", None),
    ("data/labels.jsonl", "manifest", "data/labels.jsonl", None),
    ("hf:beans", "hf", "beans", None),
    ("hf:some-org/some-dataset@validation", "hf", "some-org/some-dataset", "validation"),
    ("hf:/data/me@work/saved", "hf", "/data/me@work/saved", None),  # an '@' inside a path is no split
    ("torchvision:MNIST@test", "torchvision", "MNIST", "test"),
    ("sklearn:digits", "sklearn", "digits", None),
])
def test_source_strings(text, scheme, name, split):
    assert parse_source(text) == SourceSpec(scheme, name, split)


# ----------------------------------------------------------------------------------------------------
# Opening each source: classes, labels, lazy decoding


@pytest.mark.parametrize("name, classes", [
    ("hf_disk", CLASSES),  # a ClassLabel keeps its own order
    ("hf_parquet", ["c10", "cat", "dog"]),  # string labels sort naturally
    ("csv", ["c10", "cat", "dog"]),
    ("jsonl", ["c10", "cat", "dog"]),
])
def test_source_opens_with_classes_and_labels(sources, name, classes):
    samples = load_source(sources[name], data_cfg(sources[name], sources["_root"]))
    assert samples.class_names == classes
    assert len(samples) == len(CLASSES) * PER_CLASS
    given = [c for _, c in sources["_pairs"]]
    assert [samples.class_names[t] for t in samples.targets] == given  # row order kept
    image, label = samples[5]
    assert image.mode == "RGB" and image.size == (SIZE, SIZE) and samples.class_names[label] == given[5]
    assert samples.raw(0)[:8] == b"\x89PNG\r\n\x1a\n"  # the encoded file, for check-data's hashing


def test_hf_source_decodes_lazily_without_copying(sources):
    samples = load_source(sources["hf_disk"], data_cfg(sources["hf_disk"], sources["_root"]))
    assert isinstance(samples, HFSamples)
    # Memory-mapped Arrow, images still encoded: nothing decoded or copied at load.
    assert samples.encoded.features["img"].decode is False
    assert samples.encoded.cache_files, "load_from_disk should memory-map the saved Arrow files"


def test_torchvision_mnist_from_raw_files(sources):
    samples = load_source(sources["mnist"], data_cfg(sources["mnist"], sources["_root"]))
    assert len(samples.class_names) == 10 and samples.class_names[0].startswith("0")
    assert samples.targets[:4] == [0, 1, 0, 1]
    image, _ = samples[1]
    assert image.mode == "RGB" and image.size == (28, 28) and np.asarray(image)[10, 13].tolist() == [255] * 3


def test_val_and_test_align_to_the_training_classes(sources, tmp_path):
    # val holds only two of the classes, in another order: its labels are re-indexed by name.
    pairs = [(p, c) for p, c in sources["_pairs"] if c != "cat"]
    manifest = tmp_path / "val.csv"
    manifest.write_text("image,label\n" + "".join(f"{p},{c}\n" for p, c in pairs[::-1]))
    cfg = DataConfig(train=sources["csv"], val=str(manifest), test=sources["jsonl"])
    splits = build_splits(cfg, seed=0)
    assert splits.class_names == ["c10", "cat", "dog"]
    assert [splits.class_names[t] for t in splits.val.targets] == [c for _, c in pairs[::-1]]
    assert splits.test.class_names == splits.class_names


def test_val_with_a_class_unknown_to_train_is_an_error(sources, tmp_path):
    manifest = tmp_path / "val.csv"
    manifest.write_text(f"image,label\n{sources['_pairs'][0][0]},zebra\n")
    with pytest.raises(FinetuneError, match="zebra"):
        build_splits(DataConfig(train=sources["csv"], val=str(manifest)), seed=0)


def test_manifest_column_can_be_named(sources, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("a,b,kind\n" + "".join(f"x,{p},{c}\n" for p, c in sources["_pairs"]))
    with pytest.raises(FinetuneError, match="data.image_column"):
        load_source(str(manifest), DataConfig(train=str(manifest)))
    samples = load_source(str(manifest), DataConfig(train=str(manifest), image_column="b", label_column="kind"))
    assert isinstance(samples, FileSamples) and samples.class_names == ["c10", "cat", "dog"]


# ----------------------------------------------------------------------------------------------------
# Without data.val: a stratified, seeded split


def test_split_puts_every_class_with_two_images_in_val_and_repeats_with_the_seed(tmp_path):
    labels = ["a"] * 2 + ["b"] * 3 + ["c"] * 40 + ["d"]  # d has one image: it can only train
    pairs = [(f"{i}.png", c) for i, c in enumerate(labels)]
    cfg = DataConfig(train="python:train_data")
    splits = build_splits(cfg, 7, train=pairs)
    val_classes = {splits.train.targets[i] for i in splits.val_indices}
    assert val_classes == {0, 1, 2}
    assert not set(splits.train_indices) & set(splits.val_indices)
    assert len(splits.train_indices) + len(splits.val_indices) == len(labels)
    again = build_splits(cfg, 7, train=pairs)
    assert again.val_indices == splits.val_indices
    other = build_splits(cfg, 8, train=pairs)
    assert other.val_indices != splits.val_indices  # the seed does drive it


# ----------------------------------------------------------------------------------------------------
# Python API inputs


def test_in_memory_inputs_become_samples(sources):
    cfg = DataConfig(train="python:train_data")
    pairs = sources["_pairs"]
    as_files = wrap_in_memory(pairs, None, cfg, "train_data")
    assert isinstance(as_files, FileSamples) and as_files.class_names == ["c10", "cat", "dog"]
    hf = wrap_in_memory(sources["_hf"], None, cfg, "train_data")
    assert isinstance(hf, HFSamples) and hf.class_names == CLASSES
    tensors = [(torch.zeros(3, 8, 8, dtype=torch.uint8), i % 2) for i in range(4)]
    with pytest.raises(FinetuneError, match="class_names"):
        wrap_in_memory(tensors, None, cfg, "train_data")
    indexed = wrap_in_memory(tensors, ["a", "b"], cfg, "train_data")
    assert indexed[1][0].mode == "RGB" and indexed.targets == [0, 1, 0, 1]


# ----------------------------------------------------------------------------------------------------
# One epoch on each source: through the CLI (in-process) and through the Python API


@pytest.mark.parametrize("name", ["hf_disk", "hf_parquet", "csv", "jsonl", "mnist"])
def test_one_epoch_through_the_cli(sources, name, tmp_path, monkeypatch):
    monkeypatch.chdir(sources["_root"])  # data.root is relative to the working directory
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(sources[name], **{"data.root": "tv"}))
    column = ["data.label_column=species"] if name == "hf_parquet" else []
    column += ["data.val=torchvision:MNIST@test"] if name == "mnist" else []  # the t10k files
    cli.main(["train", str(recipe), "--output", str(tmp_path / "run"), "train.batch_size=4", *column])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    expected = {"hf_disk": CLASSES, "mnist": None}.get(name, ["c10", "cat", "dog"])
    if expected is not None:
        assert config["label_names"] == expected
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["val_images"] > 0


class PlainDataset(torch.utils.data.Dataset):
    """A user's own map-style dataset: (CHW uint8 tensor, class index), with a .classes list."""
    classes = ["dark", "light"]

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.full((3, 12, 12), 30 if i % 2 == 0 else 220, dtype=torch.uint8), i % 2


@pytest.mark.parametrize("name", ["hf_disk", "hf_parquet", "csv", "jsonl", "mnist", "map_style", "hf_dataset",
                                  "pairs"])
def test_one_epoch_through_the_api(sources, name, tmp_path, monkeypatch):
    monkeypatch.chdir(sources["_root"])
    kwargs = {}
    if name == "map_style":
        kwargs = {"train_data": PlainDataset(), "val_data": PlainDataset()}
    elif name == "hf_dataset":
        split = sources["_hf"].train_test_split(test_size=0.25, seed=0, stratify_by_column="label")
        kwargs = {"train_data": split["train"], "val_data": split["test"], "test_data": split["test"]}
    elif name == "pairs":
        kwargs = {"train_data": sources["_pairs"]}
    recipe = tiny_recipe(sources.get(name, "unused"), **{"data.root": "tv"})
    if name == "hf_parquet":
        recipe["data"]["label_column"] = "species"
    if kwargs:
        del recipe["data"]["train"]
    result = finetune.train(recipe, output=tmp_path / "run", **kwargs)
    assert len(result.metrics) == 1 and result.metrics[0]["val_images"] > 0
    assert set(result.metrics[0]["val_per_class_acc"]) == set(
        json.loads((tmp_path / "run" / "config.json").read_text())["label_names"])
    if name == "hf_dataset":
        assert result.test is not None and result.test["test_images"] == len(split["test"])


# ----------------------------------------------------------------------------------------------------
# Manifests that are wrong: one paragraph naming the file, the line and what to do


def manifest_error(path: Path, text: str) -> str:
    path.write_text(text)
    with pytest.raises(FinetuneError) as info:
        load_source(str(path), DataConfig(train=str(path)))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


@pytest.mark.parametrize("row", [0, 2])
def test_a_csv_row_with_more_fields_than_the_header_is_an_error_naming_its_line(sources, tmp_path, row):
    lines = [f"{p},{c}" for p, c in sources["_pairs"][:4]]
    lines[row] += ",extra,more"
    message = manifest_error(tmp_path / "m.csv", "image,label\n" + "\n".join(lines) + "\n")
    assert f"line {row + 2}" in message and "2 more fields than its header" in message and "quote" in message


def test_a_csv_row_without_its_label_or_image_is_an_error_naming_its_line(sources, tmp_path):
    (p0, c0), (p1, _) = sources["_pairs"][:2]
    assert "line 4 has no 'label'" in manifest_error(tmp_path / "short.csv", f"image,label\n{p0},{c0}\n\n{p1}\n")
    assert "line 3 has no image path" in manifest_error(tmp_path / "blank.csv", f"image,label\n{p0},{c0}\n,{c0}\n")


@pytest.mark.parametrize("label, kind", [("null", "no 'label'"), ("true", "label true"), ("false", "label false"),
                                         ("2.5", "label 2.5"), ('{"a": 1}', 'label {"a": 1}')])
def test_a_jsonl_label_that_names_no_class_is_an_error_naming_its_line(sources, tmp_path, label, kind):
    (p0, c0), (p1, _) = sources["_pairs"][:2]
    message = manifest_error(tmp_path / "m.jsonl", json.dumps({"image": p0, "label": c0}) + "\n"
                             + f'{{"image": {json.dumps(p1)}, "label": {label}}}\n')
    assert f"line 2 has {kind}" in message or f"line 2: {kind}" in message


@pytest.mark.parametrize("line", ['["a.png", "cat"]', '"a.png"', '{"image": 3, "label": "cat"}',
                                  pytest.param("[" * 100_000, id="nested-100000-deep")])
def test_a_jsonl_line_that_is_no_object_with_an_image_path_is_an_error_naming_its_line(sources, tmp_path, line):
    p0, c0 = sources["_pairs"][0]
    assert "line 2" in manifest_error(tmp_path / "m.jsonl", json.dumps({"image": p0, "label": c0}) + f"\n{line}\n")


def test_integer_labels_name_the_same_classes_in_csv_and_jsonl(sources, tmp_path):
    pairs = [(p, i % 2 + 1) for i, (p, _) in enumerate(sources["_pairs"][:4])]
    (tmp_path / "m.csv").write_text("image,label\n" + "".join(f"{p},{c}\n" for p, c in pairs))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"image": p, "label": c}) + "\n" for p, c in pairs))
    csv_samples, jsonl_samples = (load_source(str(tmp_path / name), DataConfig(train=str(tmp_path / name)))
                                  for name in ("m.csv", "m.jsonl"))
    assert csv_samples.class_names == jsonl_samples.class_names == ["1", "2"]
    assert csv_samples.targets == jsonl_samples.targets == [0, 1, 0, 1]


def test_cli_train_on_a_manifest_row_with_extra_fields_is_exit_2_without_traceback(sources, tmp_path, capsys):
    lines = [f"{p},{c}" for p, c in sources["_pairs"]]
    lines[0] += ",extra"
    (tmp_path / "m.csv").write_text("image,label\n" + "\n".join(lines) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(str(tmp_path / "m.csv")))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", str(recipe), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("finetune: error: ") and err.count("\n") == 1
    assert "line 2" in err and not (tmp_path / "run").exists()
