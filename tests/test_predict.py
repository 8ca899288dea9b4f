"""finetune/model/predict.py: what a Predictor refuses. (Loading a trained run and predicting with it are
tested end to end, on a real run, in test_end_to_end.py.)"""

from __future__ import annotations

import pytest
import torch
from helpers import write_png_header

from finetune import FinetuneError
from finetune.model.predict import Predictor


def test_a_decompression_bomb_is_a_user_error_naming_the_file(tmp_path):
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


class Mirrored(torch.nn.Module):
    """Logits that tell an image from its mirror: a linear layer on the flattened pixels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3 * 8 * 8, 3)

    def forward(self, x):
        return self.linear(x.flatten(1))


def test_tta_averages_the_logits_of_each_image_and_its_mirror():
    from torchvision.transforms.functional import to_pil_image, to_tensor

    predictor = Predictor(Mirrored().eval(), ["a", "b", "c"], to_tensor, torch.device("cpu"))
    images = [to_pil_image(t) for t in torch.rand(5, 3, 8, 8)]
    batch = torch.stack([to_tensor(image) for image in images])
    with torch.no_grad():
        expected = (predictor.model(batch) + predictor.model(batch.flip(-1))) / 2
    assert torch.allclose(predictor.logits(batch, tta=True), expected)
    assert not torch.allclose(predictor.logits(batch), expected)
    assert torch.allclose(predictor.logits(images, tta=True, batch_size=2), expected)  # 3 forward passes of 2, 2, 1


def test_list_images_takes_files_folders_recursively_and_manifests(tmp_path, image_folder):
    from finetune.model.predict import list_images

    folder = image_folder(classes=2, per_class=11)  # data/c0/0.png ... data/c1/10.png
    (folder / "c0" / "notes.txt").write_text("not an image")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.png").write_bytes((folder / "c0" / "0.png").read_bytes())
    found = list_images([folder])
    assert found == [str(folder / c / f"{i}.png") for c in ("c0", "c1") for i in range(11)]  # 10 after 9
    manifest = tmp_path / "m.csv"
    manifest.write_text("label,path\nc1,data/c1/3.png\nc0,data/c0/1.png\n")
    assert list_images([manifest, folder / "c0" / "2.png"]) == [str(tmp_path / "data/c1/3.png"),
                                                                 str(tmp_path / "data/c0/1.png"),
                                                                 str(folder / "c0" / "2.png")]
    with pytest.raises(FinetuneError, match="no such file or folder"):
        list_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match="holds no images"):
        list_images([tmp_path / "empty"])


@pytest.fixture
def exported(tmp_path):
    """A folder with an export as a run leaves it: test_resnet, classes a, b, c."""
    import timm
    import timm.data

    from finetune.model.export import save_export

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    (tmp_path / "run").mkdir()
    save_export(model, tmp_path / "run", ["a", "b", "c"], timm.data.resolve_model_data_config(model))
    return tmp_path / "run"


def test_cli_predicts_a_folder_into_a_csv_with_top_k_columns(exported, image_folder, tmp_path, capsys):
    import csv

    from finetune import cli, load

    folder = image_folder(classes=2, per_class=3)
    out = tmp_path / "out" / "predictions.csv"
    cli.main(["predict", str(exported), str(folder), "--csv", str(out), "-k", "2", "--tta"])
    assert "predictions for 6 image(s)" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "prediction", "probability", "prediction_2", "probability_2"]
    assert [r["path"] for r in rows] == [str(folder / c / f"{i}.png") for c in ("c0", "c1") for i in range(3)]
    expected = load(exported, device="cpu").predict([r["path"] for r in rows], top_k=2, tta=True)
    for row, top in zip(rows, expected):
        assert (row["prediction"], row["prediction_2"]) == (top[0]["label"], top[1]["label"])
        assert float(row["probability"]) == pytest.approx(top[0]["prob"], abs=1e-6)


def test_cli_predict_of_a_missing_path_is_one_error(exported, tmp_path, capsys):
    from finetune import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", str(exported), str(tmp_path / "nope")])
    assert exit_.value.code == 2 and "no such file or folder" in capsys.readouterr().err
