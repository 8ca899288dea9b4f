"""finetune/data/images.py: decoding one file, and refusing one too large to decode (PIL's decompression
bomb limit) with a reason instead of a raw PIL error, and refusing one so elongated that resizing it for
the model would exhaust memory, wherever images are read. (Modes, EXIF and broken files: test_badimages.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_png_header
from PIL import Image

from finetune.data.images import ImageTooElongated, ImageTooLarge, open_image


def test_a_decompression_bomb_is_refused_with_its_size(tmp_path):
    path = write_png_header(tmp_path / "huge.png", 20_000, 20_000)
    with pytest.raises(ImageTooLarge) as info:
        open_image(path)
    assert str(info.value).startswith("image too large (400000000 pixels > ")
    assert isinstance(info.value, ValueError)  # one of badimages.BAD_IMAGE_ERRORS: a bad image in training


def test_the_limit_is_pils_own(tmp_path, monkeypatch):
    # PIL refuses more than twice MAX_IMAGE_PIXELS (it only warns between one and two times); None: no limit.
    path = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ImageTooLarge, match=r"\(1200 pixels > 1000\)"):
        open_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    with pytest.warns(Image.DecompressionBombWarning):
        assert open_image(path).size == (40, 30)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert open_image(path).size == (40, 30)


# Very elongated images: small files whose eval resize (short side scaled up to the model's size) would
# need gigabytes. Each is refused from its header, before a pixel is decoded or resized, wherever images
# are read: training and validation (skipped with the reason), the decoded-image cache, check-data, predict.

def write_tall_png(path: Path, width: int = 1, height: int = 2_000) -> Path:
    """A real, decodable PNG of width x height (a few hundred bytes): cheap to decode, costly to resize."""
    Image.new("RGB", (width, height), (90, 160, 30)).save(path)
    return path


def test_a_very_elongated_image_is_refused_from_its_header(tmp_path):
    # The file says 1 x 20,000 and holds no pixel data: only a check of the header can name the ratio.
    path = write_png_header(tmp_path / "tall.png", 1, 20_000)
    with pytest.raises(ImageTooElongated) as info:
        open_image(path)
    assert str(info.value) == "image too elongated (1x20000 pixels: aspect ratio 20,000:1 > 32:1)"
    assert isinstance(info.value, ValueError)  # one of badimages.BAD_IMAGE_ERRORS: a bad image in training


@pytest.mark.parametrize("size", [(4000, 400), (400, 4000), (320, 10), (1, 32)])
def test_panoramas_up_to_the_limit_pass(tmp_path, size):
    path = tmp_path / "wide.png"
    Image.new("RGB", size).save(path)
    assert open_image(path).size == size


def test_in_memory_images_are_held_to_the_same_limit():
    from finetune.data.samples import as_pil

    assert as_pil(Image.new("RGB", (320, 10))).size == (320, 10)
    for image in (Image.new("RGB", (330, 10)), np.zeros((2_000, 1, 3), np.uint8), torch.zeros(3, 1, 2_000)):
        with pytest.raises(ImageTooElongated, match="aspect ratio"):
            as_pil(image)


def test_training_and_validation_skip_it_with_the_reason(tmp_path, make_image_folder):
    from finetune.data.badimages import SkipLog, read_skip_logs
    from finetune.data.loaders import Transformed
    from finetune.data.samples import IGNORE_LABEL
    from finetune.data.sources import load_source

    root = make_image_folder(tmp_path / "data", classes=2, per_class=3, size=16)
    tall = write_tall_png(root / "c0" / "tall.png")
    samples = load_source(str(root))
    bad = samples.items.index(str(tall))
    log = SkipLog(tmp_path / ".skipped-0.jsonl")
    resized = []  # what the transform was handed: never the tall image
    transform = lambda image: resized.append(image.size) or np.asarray(image)  # noqa: E731
    image, label = Transformed(samples, [bad, 0], transform, "train", skip_log=log)[0]
    assert label == samples.targets[0] and image.shape == (16, 16, 3)
    assert Transformed(samples, [bad, 0], transform, "val", skip_log=log, substitute=False)[0][1] == IGNORE_LABEL
    assert resized == [(16, 16), (16, 16)]
    assert [(e["split"], Path(e["file"]).name, e["reason"]) for e in read_skip_logs(tmp_path)] == [
        ("train", "tall.png", "image too elongated (1x2000 pixels: aspect ratio 2,000:1 > 32:1)"),
        ("val", "tall.png", "image too elongated (1x2000 pixels: aspect ratio 2,000:1 > 32:1)")]


def test_the_decoded_cache_records_it_as_unreadable_and_leaves_it_out_of_its_estimate(tmp_path, make_image_folder):
    from test_decoded import data_config

    from finetune.data.decoded import build_decoded, estimate_decoded_bytes
    from finetune.data.sources import load_source

    root = make_image_folder(tmp_path / "data", classes=2, per_class=3, size=16)
    plain = estimate_decoded_bytes(load_source(str(root)), data_config(size=32))
    write_tall_png(root / "c1" / "tall.png", 2_000, 1)
    samples = load_source(str(root))
    assert estimate_decoded_bytes(samples, data_config(size=32)) <= plain  # not 36 x 72,000 pixels for one file
    images = build_decoded(samples, data_config(size=32), tmp_path / "cache", 0, log=lambda _: None)
    tall = samples.items.index(str(root / "c1" / "tall.png"))
    assert set(images.bad) == {tall}
    with pytest.raises(ImageTooElongated, match="aspect ratio 2,000:1"):
        images[tall]
    [data] = (tmp_path / "cache").glob("*.u8")
    assert data.stat().st_size == 6 * 36 * 36 * 3  # the six 16 px images at 36 px, nothing else


def test_check_data_lists_it_as_unreadable(tmp_path, make_image_folder):
    from finetune.data.checkdata import inspect_image
    from finetune.data.samples import ArraySamples
    from finetune.data.sources import load_source

    root = make_image_folder(tmp_path / "data", classes=2, per_class=2, size=16)
    tall = write_tall_png(root / "c0" / "tall.png")
    samples = load_source(str(root))
    found = inspect_image(samples, samples.items.index(str(tall)))
    assert found == {"error": "image too elongated (1x2000 pixels: aspect ratio 2,000:1 > 32:1)"}
    arrays = ArraySamples([np.zeros((1, 2_000, 3), np.uint8)], [0], ["a"], "arrays")
    assert "aspect ratio" in inspect_image(arrays, 0)["error"]


def test_predict_refuses_it_in_one_paragraph_naming_the_file(tmp_path):
    from finetune import FinetuneError
    from finetune.model.predict import Predictor

    tall = write_tall_png(tmp_path / "tall.png")
    given = []
    predictor = Predictor(torch.nn.Identity(), ["a"], lambda image: given.append(image) or torch.zeros(3, 8, 8),
                          torch.device("cpu"))
    for image in (tall, Image.open(tall)):
        with pytest.raises(FinetuneError) as info:
            predictor.predict(image)
        message = str(info.value)
        assert "aspect ratio 2,000:1 > 32:1" in message and "\n" not in message
        assert ("tall.png" in message) == (image is tall)
    assert given == []  # never handed to the resize
