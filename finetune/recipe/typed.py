"""Plain data (YAML read by userfiles.py) to typed, frozen dataclasses, strictly: each value is converted by
its declared type (YAML reads `1e-4` as a string, a command line gives every value as text), an unknown key
gets a "did you mean" (the first LISTED of them; the rest are counted), and every problem is collected
instead of raised, so that one error can list them all.
Generic: it knows type hints, not recipes (schema.py owns the recipe schema).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from typing import Any, Literal, Union

# Values in messages are shortened: a 5,000-character path or a deeply nested list must not bury the message.
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2
# Unknown keys named per mapping: a million of them must not take minutes of "did you mean" and print 300 MB.
LISTED = 10


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
    names = set(known)
    unknown = [key for key in raw if key not in names]
    errors += [_unknown_key(prefix, key if isinstance(key, str) else shown(key), known) for key in unknown[:LISTED]]
    if len(unknown) > LISTED:
        errors.append(f"... and {len(unknown) - LISTED:,} more unknown {'keys' if prefix else 'sections'} in {where}")
    for key, value in raw.items():
        if key not in names:
            continue
        hint = hints[key]
        section = optional_dataclass(hint)
        if section is not None:  # a sub-section that may be null (off): built like a section when given
            kwargs[key] = None if value is None else build_dataclass(section, value, f"{prefix}{key}.", errors, bad,
                                                                     required)
        elif not dataclasses.is_dataclass(hint):
            ok, converted = _convert(value, hint)
            if ok:
                kwargs[key] = converted
            else:
                errors.append(f"{prefix}{key}: got {shown(value)}, expected {_describe(hint)}")
                bad.add(f"{prefix}{key}")
    for name in known:  # sections absent from the recipe are built from {} so their required keys are checked
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build_dataclass(hints[name], raw.get(name, {}), f"{prefix}{name}.", errors, bad, required)
        elif f"{prefix}{name}" in required and not kwargs.get(name):
            errors.append(f"{prefix}{name} is required ({required[prefix + name]})")
            bad.add(f"{prefix}{name}")
    return cls(**kwargs)


def optional_dataclass(hint: Any) -> type | None:
    """The dataclass of a `Section | None` hint (a sub-section that null turns off), else None."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else ()
    sections = [a for a in args if dataclasses.is_dataclass(a)]
    return sections[0] if len(args) == 2 and type(None) in args and sections else None


def shown(value: Any) -> str:
    """`repr(value)` for a message, shortened: long strings keep their ends and say their length."""
    if isinstance(value, str) and len(value) > 60:
        return f"{value[:24]!r}...{value[-12:]!r} ({len(value)} characters)"
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int of more than 4,300 digits has no repr
        return f"an integer of {value.bit_length()} bits"


def shown_text(text: object) -> str:
    """A user's text (a path, a name) as it is when it prints on one short line, else as `shown` gives it:
    a control character or a 5,000-character path must not break or bury the message."""
    text = str(text)
    return text if text.isprintable() and len(text) <= 120 else shown(text)


def _unknown_key(prefix: str, key: str, known: list[str]) -> str:
    what = "section" if not prefix else "key"
    key = shown_text(key) if len(key) <= 60 else f"{shown(key[:40])}... ({len(key)} characters)"
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
    if hint is int:  # a float only when whole (4.0); text only when it spells an integer ("3")
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if isinstance(value, float):
            return (True, int(value)) if value.is_integer() else (False, None)  # inf and nan are not
        if isinstance(value, str):
            try:
                return True, int(value)
            except ValueError:  # not a number, or more than 4,300 digits
                return False, None
        return False, None
    if hint is float:  # finite only: inf and nan make every later comparison and the loss meaningless
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return False, None
        try:
            number = float(value)
        except (ValueError, OverflowError):  # not a number; an int beyond a float's range
            return False, None
        return math.isfinite(number), number
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return True, str(value)
            except ValueError:  # an int of more than 4,300 digits
                return False, None
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
    return {bool: "true or false", int: "an integer", float: "a number (not inf or nan)", str: "a string"}.get(
        hint, str(hint))
