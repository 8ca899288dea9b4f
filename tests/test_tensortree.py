"""finetune/training/tensortree.py: nested state round-trips through one safetensors file, and a forged
structure is refused without building anything but tensors and plain data."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from finetune.training.tensortree import TreeError, load_tree, save_tree


def test_a_forged_tree_header_is_refused_without_running_anything(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tree({"a": (1, 2.5, float("inf")), 3: [torch.ones(2), None, "x"]}, path)
    back = load_tree(path)
    assert back["a"] == (1, 2.5, float("inf")) and torch.equal(back[3][0], torch.ones(2))
    for forged in ['{"object": "os.system"}', '{"tensor": "missing"}', '{"dict": [[{"k": 1}, 2]]}', "[not json"]:
        save_file({"t0": torch.zeros(1)}, str(path), metadata={"finetune.tree": forged})
        with pytest.raises(TreeError):
            load_tree(path)
    with pytest.raises(TypeError, match="object is neither a tensor nor plain data"):
        save_tree({"x": object()}, path)
