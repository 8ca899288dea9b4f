"""finetune/data/device_augment.py: crops cut in loader workers, resized, flipped and jittered in one batched
call, equal to timm's eval transform on the eval path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from helpers import add_bad_files, data_config, write_jpegs
from torchvision.transforms.v2 import functional as F

from finetune.data.badimages import SkipLog, read_skip_logs
from finetune.data.decoded import build_decoded
from finetune.data.device_augment import (
    DeviceAugment,
    EvalCrop,
    TrainCrop,
    build_device_steps,
    collate_crops,
    why_not_on_device,
)
from finetune.data.images import open_image
from finetune.data.loaders import Transformed
from finetune.data.samples import IGNORE_LABEL
from finetune.data.sources import load_source
from finetune.errors import FinetuneError
from finetune.recipe.schema import DataConfig

MEAN, STD = timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD


def decoded_folder(tmp_path: Path, cfg: dict, bad: bool = False):
    root = write_jpegs(tmp_path / "data")
    if bad:
        add_bad_files(root)
    source = load_source(str(root))
    return source, build_decoded(source, cfg, tmp_path / "cache", 0, log=lambda _: None)


def run(view, augment: DeviceAugment, positions) -> tuple[torch.Tensor, torch.Tensor]:
    images, params, labels = collate_crops([view[p] for p in positions])
    return augment(images, params), labels


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_eval_path_equals_timms_eval_transform(tmp_path, crop_pct, interpolation):
    cfg = data_config(crop_pct=crop_pct, interpolation=interpolation)
    source, images = decoded_folder(tmp_path, cfg)
    view = Transformed(images, None, EvalCrop(224), "val", substitute=False, raw=True)
    ours, labels = run(view, DeviceAugment(224, MEAN, STD), range(len(view)))
    timm_eval = timm.data.create_transform(**cfg, is_training=False)
    theirs = torch.stack([timm_eval(open_image(source.items[i])) for i in range(len(source))])
    assert ours.shape == theirs.shape == (len(source), 3, 224, 224) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max() <= 1e-5
    assert labels.tolist() == source.targets


def test_a_training_batch_has_the_model_input_shape_and_repeats_with_the_seed():
    step, augment = TrainCrop(), DeviceAugment(160, MEAN, STD, channels_last=True)
    images = [random_image(256, 341, 0), random_image(341, 256, 1), random_image(256, 256, 2)]

    def batch(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return augment(*collate_crops([(step(im), 0) for im in images])[:2])
    first = batch(0)
    assert first.shape == (3, 3, 160, 160) and first.dtype == torch.float32
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch(0), first) and not torch.equal(batch(1), first)


def test_crop_boxes_lie_inside_the_image_with_area_and_aspect_in_range():
    step = TrainCrop(scale=(0.25, 0.5), ratio=(0.5, 2.0), hflip=0.5, color_jitter=0.3)
    torch.manual_seed(0)
    params = torch.stack([step.draw(h, w) for h, w in [(256, 341), (341, 256), (300, 300)] * 200])
    sizes = torch.tensor([[341, 256], [256, 341], [300, 300]] * 200, dtype=torch.float32)  # width, height
    x0, y0, x1, y1 = params[:, :4].T
    assert bool((x0 >= 0).all() and (y0 >= 0).all() and (x1 <= sizes[:, 0]).all() and (y1 <= sizes[:, 1]).all())
    w, h = x1 - x0, y1 - y0
    share = w * h / sizes.prod(1)
    # get_params rounds each side to whole pixels, so the area and the aspect move by up to a pixel a side.
    assert bool(((w + 1) * (h + 1) / sizes.prod(1) >= 0.25).all() and ((w - 1) * (h - 1) / sizes.prod(1) <= 0.5).all())
    assert share.min() < 0.3 and share.max() > 0.45  # the whole range is drawn
    assert bool(((w + 1) / (h - 1) >= 0.5).all() and ((w - 1) / (h + 1) <= 2.0).all())
    flips, factors = params[:, 4], params[:, 5:]
    assert set(flips.tolist()) == {0.0, 1.0} and 0.4 < flips.mean() < 0.6
    assert factors.min() >= 0.7 and factors.max() <= 1.3 and factors.min() < 0.75 and factors.max() > 1.25
    assert torch.equal(TrainCrop(color_jitter=0.0, hflip=0.0).draw(100, 80)[4:], torch.tensor([0.0, 1, 1, 1]))


def test_the_patch_is_the_box_and_the_box_is_moved_onto_it():
    image = random_image(256, 341)
    torch.manual_seed(3)
    drawn = TrainCrop().draw(256, 341)
    torch.manual_seed(3)
    patch, params = TrainCrop()(image)
    x0, y0, x1, y1 = (int(v) for v in drawn[:4])
    assert torch.equal(patch, image[y0:y1, x0:x1])
    assert params[:4].tolist() == [0, 0, x1 - x0, y1 - y0] and torch.equal(params[4:], drawn[4:])


def test_a_flip_mirrors_the_crop():
    image = random_image(120, 90)
    torch.manual_seed(0)
    patch, params = TrainCrop(hflip=0.0)(image)
    flipped = params.clone()
    flipped[4] = 1
    augment = DeviceAugment(64, MEAN, STD)
    plain = augment(patch[None], params[None])
    # Contrast averages the image: summed in another order when mirrored, so equal only to float rounding.
    assert torch.allclose(augment(patch[None], flipped[None]), plain.flip(-1), atol=1e-5)
    assert (plain.flip(-1) - plain).abs().max() > 0.5


def test_shrinking_averages_every_pixel_under_an_output_pixel():
    """Antialiased: shrinking 4x averages the 4x4 pixels under each output pixel (as area resizing does),
    rather than interpolating between two of them."""
    image = random_image(256, 256)
    patch, params = EvalCrop(256)(image)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    ours = (DeviceAugment(64, MEAN, STD)(patch[None], params[None])[0] * std + mean) * 255
    area = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None].float(), size=64, mode="area")[0]
    assert (ours - area).abs().max() <= 1e-3


def test_colour_factors_follow_torchvision_and_factor_one_changes_nothing():
    image = random_image(48, 48)
    patch, params = EvalCrop(48)(image)
    augment = DeviceAugment(48, MEAN, STD)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    untouched = augment(patch[None], params[None])[0] * std + mean
    assert (untouched * 255 - image.permute(2, 0, 1).float()).abs().max() <= 1e-3
    jittered = params.clone()
    jittered[5:] = torch.tensor([1.3, 0.6, 1.4])
    ours = augment(patch[None], jittered[None])[0] * std + mean
    x = image.permute(2, 0, 1).float() / 255
    theirs = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x, 1.3), 0.6), 1.4)
    assert (ours - theirs).abs().max() <= 1e-5 and (ours - untouched).abs().max() > 0.05


def test_padding_never_reaches_a_crop():
    small, large = random_image(45, 70, 1), random_image(200, 150, 2)
    augment = DeviceAugment(64, MEAN, STD)
    for seed in range(5):
        torch.manual_seed(seed)
        sample = (TrainCrop()(small), 0)
        alone = augment(*collate_crops([sample])[:2])
        images, params, _ = collate_crops([(TrainCrop()(large), 0), sample])
        assert images.shape[1:3] != sample[0][0].shape[:2]  # really padded
        # equal up to float summation order (the batch's reductions run over other shapes); leaked padding
        # would differ by whole intensity levels
        assert (augment(images, params)[1:] - alone).abs().max() <= 1e-5


def test_bad_images_are_skipped_substituted_and_reported_as_with_pil(tmp_path):
    cfg = data_config()
    source, images = decoded_folder(tmp_path, cfg, bad=True)
    timm_eval = timm.data.create_transform(**cfg, is_training=False)
    for split, substitute in (("train", True), ("val", False)):
        logs = {kind: tmp_path / f"{split}-{kind}" for kind in ("pil", "cache")}
        for folder in logs.values():
            folder.mkdir()
        pil = Transformed(source, None, timm_eval, split, skip_log=SkipLog.for_process(logs["pil"], 0),
                          substitute=substitute)
        cached = Transformed(images, None, EvalCrop(224), split, skip_log=SkipLog.for_process(logs["cache"], 0),
                             substitute=substitute, raw=True)
        ours, our_labels = run(cached, DeviceAugment(224, MEAN, STD), range(len(cached)))
        expected = [pil[i] for i in range(len(pil))]
        theirs = torch.stack([image for image, _ in expected])
        assert [label for _, label in expected] == our_labels.tolist()
        assert (IGNORE_LABEL in our_labels.tolist()) == (not substitute)
        assert (ours - theirs).abs().max() <= 1e-5
        assert read_skip_logs(logs["cache"]) == read_skip_logs(logs["pil"]) and len(read_skip_logs(logs["pil"])) == 2
    strict = Transformed(images, None, EvalCrop(224), "train", on_bad_image="error", raw=True)
    truncated = source.items.index(str(tmp_path / "data" / "c0" / "truncated.jpg"))
    with pytest.raises(FinetuneError, match="truncated.jpg"):
        strict[truncated]


def test_the_builders_mirror_build_transforms():
    cfg = data_config()
    train, evaluation, train_augment, eval_augment = build_device_steps(cfg, DataConfig(train="x"), 160)
    assert isinstance(train, TrainCrop) and train.scale == [0.08, 1.0] and train.hflip == 0.5
    assert evaluation.size == 224 and train_augment.size == 160 and eval_augment.size == 224
    plain = build_device_steps(cfg, DataConfig(train="x", augment=False), 160)
    assert isinstance(plain[0], EvalCrop) and plain[2].size == 224
    assert why_not_on_device(cfg, DataConfig(train="x")) is None
    assert "auto_augment" in why_not_on_device(cfg, DataConfig(train="x", auto_augment="rand-m9-mstd0.5"))
    assert "crop_mode" in why_not_on_device(data_config(crop_mode="squash"), DataConfig(train="x"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_cpu_agree():
    torch.manual_seed(0)
    batch = collate_crops([(TrainCrop()(random_image(256, 300 + 20 * k, k)), k) for k in range(4)])
    augment = DeviceAugment(160, MEAN, STD)
    on_cpu = augment(batch[0], batch[1])
    on_gpu = augment(batch[0].cuda(non_blocking=True), batch[1].cuda())
    assert on_gpu.device.type == "cuda" and (on_gpu.cpu() - on_cpu).abs().max() <= 1e-4
