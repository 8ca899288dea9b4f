"""Nested training state (an optimizer's state dict, RNG states, a GradScaler's numbers) as one safetensors
file that loads without unpickling.

`torch.save` pickles, and unpickling a file runs whatever code the file names: a run folder someone shared
could execute anything on `--resume`. Here every tensor is stored as a safetensors tensor and everything else
as JSON in the file's header, in a closed vocabulary: None, bools, ints, floats (inf and nan too), strings,
lists, tuples and dicts whose keys are those scalars. Anything else is refused when saving, so a state this
cannot describe is found when the first checkpoint is written, not when a resume needs it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TREE_KEY = "finetune.tree"  # the header entry holding the JSON structure
_SCALARS = (type(None), bool, int, float, str)


class TreeError(ValueError):
    """A file's structure is not one `save_tree` writes (damaged, or not written by finetune)."""


def save_tree(tree: Any, path: Path) -> None:
    """Write `tree` to `path` (a .safetensors file). Raises TypeError for a value outside the vocabulary."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, tensors, "")
    save_file(tensors, str(path), metadata={TREE_KEY: json.dumps(structure, allow_nan=False)})


def load_tree(path: Path, device: str | torch.device = "cpu") -> Any:
    """The tree `save_tree` wrote to `path`. Raises TreeError when the file holds no such tree."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        header = (f.metadata() or {}).get(TREE_KEY)
        if header is None:
            raise TreeError(f"{path.name} has no {TREE_KEY} entry")
        try:
            structure = json.loads(header)
        except ValueError as e:
            raise TreeError(f"{path.name}: its structure is not valid JSON ({e})") from None
        return _decode(structure, f, set(f.keys()))


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        # A copy of its own: safetensors refuses tensors that share memory, and a view would save its base.
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": name}
    if type(value) in _SCALARS:
        return {"float": repr(value)} if type(value) is float and not math.isfinite(value) else value
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    if isinstance(value, dict):
        bad = [k for k in value if type(k) not in _SCALARS]
        if bad:
            raise TypeError(f"cannot save {where or 'the state'}: key {bad[0]!r} is a {type(bad[0]).__name__}")
        return {"dict": [[k, _encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()]}
    raise TypeError(f"cannot save {where or 'the state'}: a {type(value).__name__} is neither a tensor nor plain data")


def _decode(node: Any, f, names: set[str]) -> Any:
    if node is None or type(node) in (bool, int, float, str):
        return node
    if not isinstance(node, dict) or len(node) != 1:
        raise TreeError(f"unexpected node {str(node)[:80]!r}")
    (kind, body), = node.items()
    if kind == "tensor" and body in names:
        return f.get_tensor(body)
    if kind == "float" and body in ("inf", "-inf", "nan"):
        return float(body)
    if kind in ("list", "tuple") and isinstance(body, list):
        items = [_decode(v, f, names) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "dict" and isinstance(body, list) and all(
            isinstance(p, list) and len(p) == 2 and type(p[0]) in _SCALARS for p in body):
        return {k: _decode(v, f, names) for k, v in body}
    raise TreeError(f"unexpected node {str(node)[:80]!r}")
