"""finetune/data/images.py: decoding one file, and refusing one too large to decode (PIL's decompression
bomb limit) with a reason instead of a raw PIL error. (Modes, EXIF and broken files: test_badimages.py.)"""

from __future__ import annotations

import pytest
from helpers import write_png_header
from PIL import Image

from finetune.data.images import ImageTooLarge, open_image


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
