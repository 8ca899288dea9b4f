"""finetune/model/predict.py: what a Predictor refuses. (Loading a trained run and predicting with it are
tested end to end, on a real run, in test_end_to_end.py.)"""

from __future__ import annotations

import pytest
import torch

from finetune import FinetuneError
from finetune.model.predict import Predictor


def test_a_decompression_bomb_is_a_user_error_naming_the_file(tmp_path):
    from test_images import write_png_header

    huge = write_png_header(tmp_path / "huge.png", 20_000, 20_000)
    predictor = Predictor(torch.nn.Identity(), ["a"], lambda image: torch.zeros(3, 8, 8), torch.device("cpu"))
    with pytest.raises(FinetuneError) as info:
        predictor.predict(huge)
    message = str(info.value)
    assert "huge.png" in message and "400000000 pixels" in message and "MAX_IMAGE_PIXELS" in message


def test_a_file_that_is_not_an_image_is_a_user_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    predictor = Predictor(torch.nn.Identity(), ["a"], lambda image: torch.zeros(3, 8, 8), torch.device("cpu"))
    with pytest.raises(FinetuneError, match="notes.txt"):
        predictor.predict(tmp_path / "notes.txt")
