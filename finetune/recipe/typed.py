"""Plain YAML values to typed, frozen dataclasses, strictly: each value is converted by its declared type
(YAML reads `1e-4` as a string, a command line gives every value as text), an unknown key gets a "did you
mean", and every problem is collected instead of raised, so that one error can list them all.
Generic: it knows type hints, not recipes (schema.py owns the recipe schema).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union


def build_dataclass(cls: type, raw: Any, prefix: str, errors: list[str], bad: set[str],
                    required: dict[str, str]) -> Any:
    """Build a dataclass from a dict, converting each value by its annotation; collect every error in
    `errors` and every key that failed in `bad`. `required` maps dotted keys that must be set to what they
    hold, for the message."""
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping of keys, got {raw!r}")
        raw = {}
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            errors.append(_unknown_key(prefix, str(key), known))
            continue
        hint = hints[key]
        if not dataclasses.is_dataclass(hint):
            ok, converted = _convert(value, hint)
            if ok:
                kwargs[key] = converted
            else:
                errors.append(f"{prefix}{key}: got {value!r}, expected {_describe(hint)}")
                bad.add(f"{prefix}{key}")
    for name in known:  # sections absent from the recipe are built from {} so their required keys are checked
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build_dataclass(hints[name], raw.get(name, {}), f"{prefix}{name}.", errors, bad, required)
        elif f"{prefix}{name}" in required and not kwargs.get(name):
            errors.append(f"{prefix}{name} is required ({required[prefix + name]})")
            bad.add(f"{prefix}{name}")
    return cls(**kwargs)


def _unknown_key(prefix: str, key: str, known: list[str]) -> str:
    what = "section" if not prefix else "key"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return f"{prefix}{key}: unknown {what}{hint} (known in {prefix.rstrip('.') or 'a recipe'}: {', '.join(known)})"


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """Convert a YAML or command-line value to the declared type. Returns (ok, value)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None:
            return (type(None) in args), None
        for arg in args:
            if arg is not type(None):
                ok, converted = _convert(value, arg)
                if ok:
                    return True, converted
        return False, None
    if origin is Literal:
        return (value in args), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return False, None
        items = [_convert(v, a) for v, a in zip(value, args)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, None
        items = [_convert(v, args[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict:
        if not isinstance(value, dict):
            return False, None
        keys = {k: _convert(k, args[0]) for k in value}
        items = {k: _convert(v, args[1]) for k, v in value.items()}
        ok = all(ok for ok, _ in keys.values()) and all(ok for ok, _ in items.values())
        return ok, {keys[k][1]: v for k, (_, v) in items.items()}
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return True, value.lower() == "true"
        return isinstance(value, bool), value
    if hint is int:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        try:
            return isinstance(value, (int, str)), int(value)
        except ValueError:
            return False, None
    if hint is float:
        if isinstance(value, bool):
            return False, None
        try:
            return isinstance(value, (int, float, str)), float(value)
        except ValueError:
            return False, None
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return isinstance(value, str), value
    return False, None


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
