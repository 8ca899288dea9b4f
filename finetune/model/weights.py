"""Reading a weights file safely and fitting it onto a timm model.

Files come from many places (timm, torchvision, lightning, other repos, wheels), so names rarely match
exactly. We try, in order: names as they are; names with wrapper prefixes stripped (`module.` and
`_orig_mod.` by timm's `clean_state_dict`, `model.`, `net.`) and `state_dict` nesting unwrapped; then
positions, when the tensor count and every shape agree. The classifier of the source is dropped when its
class count differs from ours. Anything else is refused with the first mismatches listed. Never unpickles
arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models import clean_state_dict
from torch import nn

from ..errors import FinetuneError

_NESTING_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "params")
_TIMM_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile: what timm's clean_state_dict removes
_WRAPPER_PREFIXES = ("model.", "net.")  # Lightning modules and other training wrappers


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a pickled checkpoint read with weights_only=True."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files and unsafe pickles both land here
        raise FinetuneError(
            f"could not read weights file {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}. If it is a "
            "full pickled object rather than a state dict, re-save it with torch.save(model.state_dict(), ...) "
            "or as .safetensors.") from None
    return _unwrap(raw, path)


def _unwrap(raw: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(raw, dict) and not any(isinstance(v, torch.Tensor) for v in raw.values()):
        nested = next((raw[k] for k in _NESTING_KEYS if isinstance(raw.get(k), dict)), None)
        if nested is None:
            break
        raw = nested
    if not isinstance(raw, dict):
        raise FinetuneError(f"weights file {path} holds a {type(raw).__name__}, not a mapping of tensors.")
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise FinetuneError(f"weights file {path} holds no tensors (top-level keys: {list(raw)[:8]}).")
    return _strip_prefixes(tensors)


def _strip_prefixes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wrapper prefixes shared by every name, as often as they nest: DDP's `module.` and torch.compile's
    `_orig_mod.` by timm's own `clean_state_dict`, a training framework's `model.`/`net.` here (timm
    leaves those). Only a prefix on every name is a wrapper: on some names it is a layer's own name."""
    while True:
        if all(k.startswith(_TIMM_PREFIXES) for k in tensors):
            tensors = clean_state_dict(tensors)
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in tensors)), None)
        if prefix is None:
            return tensors
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier that timm's get_classifier() returns."""
    head = model.get_classifier()
    prefix = next((name for name, module in model.named_modules() if module is head), None)
    if prefix is None or not prefix:
        return set()
    return {k for k in model.state_dict() if k.startswith(prefix + ".")}


def fit_state_dict(model: nn.Module, source: dict[str, torch.Tensor], origin: str, ordered: bool = True) -> str:
    """Load `source` into `model` (by name, else by position); return a one-line account of what happened.

    `ordered` says whether the file keeps the order tensors were saved in: pickled state dicts do, while
    safetensors files store tensors sorted by dtype and name, so position mapping is refused for them."""
    target = model.state_dict()
    head = head_keys(model)
    mapped, how = _match_by_name(target, _timm_filter(model, source), head)
    if mapped is None and ordered:
        mapped, how = _match_by_position(target, source, head)
    if mapped is None:
        raise FinetuneError(_mismatch_report(target, source, head, origin))
    dropped = sorted(k for k in head if k in mapped and mapped[k].shape != target[k].shape)
    source_classes = mapped[dropped[0]].shape[0] if dropped else None
    for k in dropped:
        del mapped[k]
    missing, _ = model.load_state_dict(mapped, strict=False)
    unloaded = [k for k in missing if k not in head and not k.endswith("num_batches_tracked")]
    if unloaded:  # cannot happen after a successful match; guards the matching logic itself
        raise RuntimeError(f"weights matching left tensors unloaded: {unloaded[:5]}")
    note = f"loaded {len(mapped)} tensors from {origin} {how}"
    if dropped:
        note += f"; dropped the source classifier ({source_classes} classes, ours {model.num_classes}): the head starts fresh"
    elif head and not head & set(mapped):
        note += "; the file has no classifier for us: the head starts fresh"
    return note


def _timm_filter(model: nn.Module, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's own checkpoint adapter for this architecture, when it has one: it converts original-repo
    names and resamples ViT position embeddings to our image size. Left untouched if it does not apply."""
    import sys

    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return source
    try:
        return filter_fn(dict(source), model)
    except Exception:  # written for that repo's own checkpoints; anything else is matched as it is
        return source


def _match_by_name(target, source, head):
    body = [k for k in target if k not in head and not k.endswith("num_batches_tracked")]
    if not all(k in source and source[k].shape == target[k].shape for k in body):
        return None, ""
    mapped = {k: source[k] for k in target if k in source}
    return mapped, "by name"


def _match_by_position(target, source, head):
    if len(target) != len(source):
        return None, ""
    mapped = {}
    for (t_key, t_val), s_val in zip(target.items(), source.values()):
        if t_val.shape != s_val.shape and t_key not in head:
            return None, ""
        mapped[t_key] = s_val
    first_t, first_s = next(iter(target)), next(iter(source))
    return mapped, f"by position (names differ, e.g. {first_s} -> {first_t}; all {len(target) - len(head)} body shapes agree)"


def _mismatch_report(target, source, head, origin) -> str:
    body = [k for k in target if k not in head and not k.endswith("num_batches_tracked")]
    missing = [k for k in body if k not in source][:5]
    wrong = [f"{k} {tuple(source[k].shape)} vs ours {tuple(target[k].shape)}"
             for k in body if k in source and source[k].shape != target[k].shape][:5]
    position = next((f"position {i}: {sk} {tuple(sv.shape)} vs ours {tk} {tuple(tv.shape)}"
                     for i, ((tk, tv), (sk, sv)) in enumerate(zip(target.items(), source.items()))
                     if tv.shape != sv.shape and tk not in head), "none")
    return (f"the weights in {origin} do not fit this backbone: {len(source)} tensors in the file, {len(target)} in "
            f"the model. Missing by name: {missing or 'none'}; shape mismatches by name: {wrong or 'none'}; "
            f"first mismatch by position: {position}. Check that model.backbone names the architecture these "
            "weights were trained for. (Position matching needs a .pth/.bin file: .safetensors files do not keep "
            "tensor order.)")
