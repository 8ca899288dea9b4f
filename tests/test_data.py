"""finetune/data.py and images.py: sources, class order, the seeded split, RGB conversion, transforms."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from finetune import FinetuneError
from finetune.data.loaders import Transformed
from finetune.data.samples import natural_key
from finetune.data.sources import load_source
from finetune.data.splits import build_splits, stratified_split
from finetune.data.transforms import build_transforms, resolve_data_config
from finetune.recipe.schema import DataConfig


def test_natural_class_order(image_folder):
    root = image_folder(classes=["c10", "c2", "c1"], per_class=2)
    samples = load_source(str(root))
    assert samples.class_names == ["c1", "c2", "c10"]
    labels = {path.split("/")[-2]: label for path, label in zip(samples.items, samples.targets)}
    assert labels == {"c1": 0, "c2": 1, "c10": 2}


def test_natural_key_sorts_numbers_as_numbers():
    assert sorted(["img10.png", "img2.png", "IMG1.png"], key=natural_key) == ["IMG1.png", "img2.png", "img10.png"]


def test_non_image_files_and_hidden_folders_are_ignored(image_folder):
    root = image_folder(classes=2, per_class=3)
    (root / "c0" / "notes.txt").write_text("not an image")
    (root / "c0" / ".DS_Store").write_bytes(b"\0\1")
    (root / "c1" / "labels.csv").write_text("a,b\n")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "README.md").write_text("a file beside the class folders")
    samples = load_source(str(root))
    assert samples.class_names == ["c0", "c1"]
    assert len(samples) == 6
    assert all(p.endswith(".png") for p in samples.items)


def test_images_come_out_rgb_whatever_their_mode(image_folder):
    root = image_folder(classes=1, per_class=1)
    Image.new("L", (9, 7), 128).save(root / "c0" / "grey.png")
    Image.new("RGBA", (9, 7), (255, 0, 0, 0)).save(root / "c0" / "clear.png")
    Image.new("P", (9, 7)).save(root / "c0" / "palette.gif")
    Image.fromarray(np.full((7, 9), 40000, dtype=np.uint16)).save(root / "c0" / "deep.png")
    samples = load_source(str(root))
    assert len(samples) == 5
    for i in range(len(samples)):
        image, label = samples[i]
        assert image.mode == "RGB" and label == 0
    by_name = {p.rsplit("/", 1)[-1]: samples[i][0] for i, p in enumerate(samples.items)}
    assert by_name["clear.png"].getpixel((0, 0)) == (255, 255, 255)  # transparency composited on white
    assert by_name["deep.png"].getpixel((0, 0))[0] == round(40000 / 65535 * 255)  # 16-bit rescaled, not clipped


def test_empty_folder_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match="no class subfolders"):
        load_source(str(tmp_path / "empty"))


def test_class_folders_without_images_are_a_user_error(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(FinetuneError, match="no images"):
        load_source(str(tmp_path / "data"))


def test_stratified_split_is_seeded_and_validates_every_class():
    targets = [0] * 10 + [1] * 2 + [2] * 7 + [3] * 1 + [4] * 25
    train, val = stratified_split(targets, 0.2, seed=0)
    assert stratified_split(targets, 0.2, seed=0) == (train, val)
    assert stratified_split(targets, 0.2, seed=1) != (train, val)
    assert sorted(train + val) == list(range(len(targets)))
    assert not set(train) & set(val)
    in_val = Counter(targets[i] for i in val)
    assert set(in_val) == {0, 1, 2, 4}  # every class with >= 2 images; class 3 has only one
    assert in_val[0] == 2 and in_val[4] == 5  # about 20% of each class
    assert Counter(targets[i] for i in train)[1] == 1  # a class of two keeps one image to train on


def test_split_from_build_splits_uses_the_seed(image_folder):
    root = image_folder(classes=3, per_class=6)
    a = build_splits(DataConfig(train=str(root), val_fraction=0.5), seed=0)
    b = build_splits(DataConfig(train=str(root), val_fraction=0.5), seed=0)
    c = build_splits(DataConfig(train=str(root), val_fraction=0.5), seed=5)
    assert a.val_indices == b.val_indices and a.val_indices != c.val_indices
    assert Counter(a.train.targets[i] for i in a.val_indices) == {0: 3, 1: 3, 2: 3}


def test_sklearn_digits():
    samples = load_source("sklearn:digits")
    assert len(samples) == 1797
    assert samples.class_names == [str(i) for i in range(10)]
    assert sorted(set(samples.targets)) == list(range(10))
    image, label = samples[0]
    assert image.mode == "RGB" and image.size == (8, 8) and label == 0
    pixels = np.asarray(samples[5][0])
    assert pixels.dtype == np.uint8 and pixels.max() > 200  # 16 grey levels stretched to 0..255
    assert (pixels[..., 0] == pixels[..., 1]).all()


@pytest.mark.parametrize("source", ["folder", "sklearn:digits"])
def test_sources_pickle_for_spawned_loader_workers(image_folder, source):
    """DataLoader workers started with spawn (the default on macOS and Windows) receive the dataset pickled."""
    import pickle

    text = str(image_folder(classes=2, per_class=2)) if source == "folder" else source
    samples = load_source(text)
    copy = pickle.loads(pickle.dumps(samples))
    assert len(copy) == len(samples) and copy[0][1] == samples[0][1]
    assert np.array_equal(np.asarray(copy[0][0]), np.asarray(samples[0][0]))


def test_val_folder_labels_follow_the_training_classes(image_folder):
    train = image_folder(classes=["c1", "c2", "c10"], per_class=2, name="train")
    val = image_folder(classes=["c10"], per_class=2, name="val")
    splits = build_splits(DataConfig(train=str(train), val=str(val)), seed=0)
    assert splits.class_names == ["c1", "c2", "c10"]
    assert splits.val.targets == [2, 2]
    assert splits.train_indices is None and splits.val_indices is None


def test_val_folder_with_unknown_class_is_refused(image_folder):
    train = image_folder(classes=["cat", "dog"], per_class=2, name="train")
    val = image_folder(classes=["cat", "dog", "fox"], per_class=2, name="val")
    with pytest.raises(FinetuneError, match="fox"):
        build_splits(DataConfig(train=str(train), val=str(val)), seed=0)


def test_no_class_with_two_images_cannot_be_split(image_folder):
    root = image_folder(classes=3, per_class=1)
    with pytest.raises(FinetuneError, match="data.val"):
        build_splits(DataConfig(train=str(root)), seed=0)


def test_in_memory_dataset_needs_class_names():
    data = [(Image.new("RGB", (8, 8)), 0), (Image.new("RGB", (8, 8)), 1)] * 2
    with pytest.raises(FinetuneError, match="class_names"):
        build_splits(DataConfig(train="python:train_data"), seed=0, train=data)
    splits = build_splits(DataConfig(train="python:train_data"), seed=0, train=data, class_names=["a", "b"])
    assert splits.class_names == ["a", "b"] and len(splits.val_indices) == 2


def test_transforms_follow_the_backbone_config_and_image_size():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    data_cfg = resolve_data_config(model, DataConfig(train="x", image_size=48))
    assert data_cfg["input_size"] == (3, 48, 48)
    assert data_cfg["mean"] == model.pretrained_cfg["mean"]
    train_tf, eval_tf = build_transforms(data_cfg, DataConfig(train="x", image_size=48))
    dataset = Transformed([(Image.new("L", (100, 70), 200), 1), (torch.zeros(3, 20, 30, dtype=torch.uint8), 0)],
                          None, eval_tf)
    for i, expected_label in enumerate([1, 0]):
        x, label = dataset[i]
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and label == expected_label
    assert train_tf(Image.new("RGB", (64, 64))).shape == (3, 48, 48)


def test_default_workers_share_the_cores_among_the_processes_on_a_machine(monkeypatch):
    import finetune.data.loaders as loaders

    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert loaders.available_cores() == 16
    assert loaders.default_num_workers() == 8  # one process: capped at 8
    assert loaders.default_num_workers(4) == 3  # 4 cores each, one left to its training process
    assert loaders.default_num_workers(16) == 0  # a core each: load in the training process


@pytest.mark.parametrize("size, fixed, asked, expected", [
    (224, False, "auto", 160), (288, False, "auto", 224), (160, False, "auto", 128), (64, False, "auto", 64),
    (224, True, "auto", 224),
    (224, False, 200, 200), (224, False, None, 224),
])
def test_training_crops_default_to_three_quarters_of_the_eval_size_for_conv_nets(size, fixed, asked, expected):
    from finetune.data.transforms import train_size

    assert train_size({"input_size": (3, size, size)}, DataConfig(train_image_size=asked), fixed) == expected


def test_the_train_transform_crops_at_the_training_size_and_eval_at_the_full_size():
    from PIL import Image

    data_cfg = {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                "crop_pct": 0.875, "crop_mode": "center"}
    train, evaluation = build_transforms(data_cfg, DataConfig(), 160)
    image = Image.new("RGB", (300, 240))
    assert train(image).shape == (3, 160, 160) and evaluation(image).shape == (3, 224, 224)


class RandomPerSample(torch.utils.data.Dataset):
    """Each sample: a draw from torch's generator, as an augmentation makes."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int):
        return torch.rand(()), index


def _draws(workers: int, start: int = 0, epoch: int = 0) -> dict[int, float]:
    from finetune.data.loaders import EpochSeeded, build_loader, epoch_seed
    from finetune.data.sampling import EpochShuffle, Positioned

    data, sampler = EpochSeeded(RandomPerSample()), Positioned(EpochShuffle(12, 16, seed=3))
    data.set_epoch_seed(epoch_seed(3, epoch))
    sampler.set_epoch(epoch)
    sampler.start = start
    loader = build_loader(data, 4, True, workers, False, sampler, persistent=False)
    out = {}
    for position, (values, _) in zip(range(start, 16, 4), loader):
        out.update({position + k: v.item() for k, v in enumerate(values)})
    return out


def test_a_samples_augmentation_depends_on_its_epoch_and_place_alone():
    """Seeded per sample (EpochSeeded, Positioned): the same with or without loader workers, and when a
    resumed run skips the first batches; another epoch draws anew."""
    whole = _draws(0)
    assert len(whole) == 16 and len(set(whole.values())) == 16
    assert _draws(2) == whole
    assert _draws(0, start=8) == {p: v for p, v in whole.items() if p >= 8}
    assert set(_draws(0, epoch=1).values()).isdisjoint(whole.values())
    from finetune.data.loaders import EpochSeeded

    data, state = EpochSeeded(RandomPerSample()), torch.get_rng_state()
    assert data[(3, 5)] == data[(3, 5)] != data[(3, 6)]
    assert torch.equal(torch.get_rng_state(), state)  # drawn in the training process: its generator is untouched


def test_loader_workers_outlive_a_group_stop_signal_but_not_their_process():
    """A scheduler's SIGTERM to every process of a job leaves the workers to their training process, which
    stops gracefully; the training process's own SIGTERM (a loader's shutdown) still ends them."""
    import os
    import signal
    import subprocess
    import time

    from finetune.data.loaders import build_loader

    loader = build_loader(list(range(64)), 4, False, 1, False)
    batches = iter(loader)
    next(batches)
    worker = batches._workers[0]  # PyTorch's iterator keeps its worker processes there
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # sent by another process
    time.sleep(0.5)
    assert worker.is_alive() and len(list(batches)) == 15
    batches = iter(loader)
    worker = batches._workers[0]
    os.kill(worker.pid, signal.SIGTERM)  # from the training process
    worker.join(timeout=10)
    assert not worker.is_alive()
