"""Manifests: a .csv (header row) or .jsonl (one object per line) file listing one image per row with its
label, read into rows whose problems are errors naming the file and the line.

What a row may hold is the same in both formats: an image path (text, relative to the manifest's folder
or absolute) and a label, which is a class name or an integer class id, so that `3` in JSONL and "3" in
a CSV cell name the same class. A label that names no class (JSON's true, 2.5 or an object) is refused
rather than turned into a class "True"; a CSV row with more fields than its header (an unquoted comma)
is refused rather than read with a shifted label. How labels become classes, one per image or a set per
image, is sources.py's and multilabel.py's.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import FinetuneError
from ..recipe.schema import DataConfig
from ..recipe.typed import shown, shown_text
from ..recipe.userfiles import open_regular

# Column names tried, in order, when data.image_column / data.label_column are not given.
IMAGE_COLUMNS = ("image", "img", "path", "file", "filename", "filepath", "image_path", "file_name")
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "class_name")
_EXAMPLE = 'give one object per line, such as {"image": "a.png", "label": "cat"}'


def read_manifest_rows(path: Path) -> tuple[list[dict], list[int]]:
    """The rows of a .csv (header row) or .jsonl (one object per line) manifest as parsed, and the line each
    one ends on, for errors. A CSV row with more fields than its header, or a JSONL line that is not an
    object, is an error naming its line."""
    try:
        with open_regular(path) as f:  # a FIFO in its place would hang the run
            text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FinetuneError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save the manifest as "
                            "UTF-8.") from None
    except OSError as e:
        raise FinetuneError(f"{path} cannot be read: {e.strerror or e}.") from None
    return _csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text)


def _csv_rows(path: Path, text: str) -> tuple[list[dict], list[int]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, lines = [], []
    try:
        for row in reader:
            if None in row:  # DictReader's key for the fields beyond the header
                extra = len(row[None])
                raise FinetuneError(f"{path}, line {reader.line_num} has {extra} more field{'s' * (extra > 1)} than "
                                    f"its header ({shown(reader.fieldnames)}); a comma inside a path or a label must "
                                    'be quoted ("a,b.png"), or the header must name the extra column.')
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise FinetuneError(f"{path}, line {reader.line_num} is not readable CSV: {e}.") from None
    return rows, lines


def _jsonl_rows(path: Path, text: str) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:  # not JSON, or an integer of over 4,300 digits
            why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise FinetuneError(f"{path}, line {number} is not JSON that finetune reads ({why}); {_EXAMPLE}.") \
                from None
        except RecursionError:
            raise FinetuneError(f"{path}, line {number} is nested too deeply to read; {_EXAMPLE}.") from None
        if not isinstance(row, dict):
            raise FinetuneError(f"{path}, line {number} holds {as_json(row)}, not an object; {_EXAMPLE}.")
        rows.append(row)
        lines.append(number)
    return rows, lines


def manifest_columns(path: Path, cfg: DataConfig, label: str) -> tuple[list[dict], list[int], str, str]:
    """A manifest's rows, the line of each, its image column and its label column (`label`: what a row's
    label is, for the error when it lists nothing)."""
    rows, lines = read_manifest_rows(path)
    if not rows:
        raise FinetuneError(f"{path} lists no images; give one row per image with an image path and {label}.")
    columns = list(rows[0])
    return (rows, lines, pick_column(cfg.image_column, IMAGE_COLUMNS, columns, "image_column", path),
            pick_column(cfg.label_column, LABEL_COLUMNS, columns, "label_column", path))


def pick_column(asked: str | None, candidates: Sequence[str], columns: list[str], key: str, where: Any) -> str:
    """data.image_column / label_column when given (it must exist), else the first conventional name present."""
    if asked is not None:
        if asked not in columns:
            raise FinetuneError(f"data.{key}={asked!r}: {where} has no such column; its columns: {shown(columns)}.")
        return asked
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise FinetuneError(f"{where}: cannot tell which column holds the {key.split('_')[0]}s (columns: "
                        f"{shown(columns)}); name it with data.{key}=COLUMN.")


def manifest_paths(path: Path, rows: list[dict], lines: list[int], column: str) -> list[str]:
    """Each row's image path, relative to the manifest's folder or absolute; a row without one is an error."""
    paths = []
    for row, line in zip(rows, lines):
        value = row.get(column)
        if value is None or isinstance(value, str) and not value.strip():
            raise FinetuneError(f"{path}, line {line} has no image path ({column!r}); give every row the path of "
                                "its image.")
        if not isinstance(value, str):
            raise FinetuneError(f"{path}, line {line} has image path {as_json(value)} in {column!r}, which is not "
                                'text; write it as a string, such as "images/1.png".')
        paths.append(str(path.parent / value.strip()))
    return paths


def manifest_label(value: Any, where: str, column: str) -> str | None:
    """A manifest's label as the class name it gives: text (stripped), or an integer class id as its digits,
    as a CSV cell reads; None for none (null, blank). Anything else (true, 2.5, an object) names no class:
    an error beginning with `where` (the manifest and the line)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise FinetuneError(f"{where} has label {as_json(value)} in {column!r}, which names no class: a label is a class "
                        f"name (text) or an integer class id. If a class is named so, quote it: "
                        f"{as_json(as_json(value))}.")


def as_json(value: Any) -> str:
    """A JSON value as JSON writes it (true, null, {"a": 1}), shortened for a message."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return shown_text(text) if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"
