"""Reading files that finetune did not just write itself: a recipe and its `base:` chain, a run folder's
recipe.yaml (runs are shared and downloaded), a `key=value` override, an image a manifest lists.

Such a file is opened only when it is a regular file: a FIFO in its place would hang the read, and a
device such as /dev/zero would stream without end. YAML becomes plain data only (PyYAML's safe loader,
never a Python object), and is bounded: at most MAX_YAML_BYTES of text (PyYAML parses about 4 s per MB,
so a 50 MB file took minutes), no alias (`*name`: ten short lines of nested aliases expand to a billion
items, "billion laughs", as soon as anything walks the data; recipes share settings with `base:`), and
no key given twice in one mapping (PyYAML would silently keep the last one).
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from ..errors import FinetuneError
from .typed import shown, shown_text

MAX_YAML_BYTES = 1_000_000  # a recipe with every key written out is about 3 KB
# What the parser raises for text that is not YAML: its own errors, an integer of over 4,300 digits
# (ValueError) and nesting deeper than Python's stack (RecursionError).
YAML_SYNTAX_ERRORS = (yaml.YAMLError, ValueError, RecursionError)
_KINDS = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


class NotRegularFile(OSError):
    """A path that names a folder, FIFO, device or socket where a file's contents are wanted. An OSError,
    so training skips such an image as a bad file with this as the reason."""


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for binary reading when it is a regular file (or a link to one), else NotRegularFile.
    Checked before opening, so a device is never opened, and again on the open file, in case the path was
    swapped in between; the open itself does not wait for a FIFO's writer."""
    _require_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        _require_regular(os.fstat(fd).st_mode)
    except NotRegularFile:
        os.close(fd)
        raise
    raw = io.FileIO(fd, "rb")
    raw.name = os.fspath(path)  # what messages show, as for open(path): not the descriptor's number
    return io.BufferedReader(raw)


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS.items() if test(mode)), "no file")
        raise NotRegularFile(f"{kind}, not a regular file")


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(f"key {shown(key)} appears twice in one mapping (lines {first_line} and {line})")
        self.key, self.first_line, self.line = key, first_line, line


class AliasError(yaml.YAMLError):
    def __init__(self, anchor: str, line: int):
        super().__init__(f"line {line} uses the YAML alias *{anchor}")
        self.anchor, self.line = anchor, line


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing an alias to an anchor and a key given twice in one mapping. Merge
    keys (`<<: {...}`) keep their YAML meaning; they can only repeat a mapping through an alias."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        # An alias of an anchor never defined stays PyYAML's own error: an override such as `*.png` is text.
        if self.check_event(yaml.AliasEvent) and self.peek_event().anchor in self.anchors:
            event = self.peek_event()
            raise AliasError(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> Any:
    """Plain data from YAML `text`; `where` begins its errors ("recipe PATH", "override KEY=..."). Text over
    MAX_YAML_BYTES, an alias and a repeated key are FinetuneErrors; text the parser refuses raises one of
    YAML_SYNTAX_ERRORS, for the caller to report (a file) or to take as text (an override)."""
    if len(text) > MAX_YAML_BYTES:
        raise FinetuneError(f"{where} holds {len(text):,} characters, more than the {MAX_YAML_BYTES:,} finetune reads "
                            "(a whole recipe is a few KB); give the value that was meant.")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data only, never code
    except DuplicateKeyError as e:
        raise FinetuneError(f"{where}, line {e.line}: key {shown(e.key)} is given twice in one mapping (first on "
                            f"line {e.first_line}); YAML would silently keep the last one. Keep one of them.") from None
    except AliasError as e:
        raise FinetuneError(f"{where}, line {e.line}: the YAML alias *{shown_text(e.anchor)} is refused (aliases can "
                            "expand a small file into billions of values); write the value out, or share settings "
                            "between recipes with `base:`.") from None


def read_yaml_file(path: str | Path, what: str = "recipe") -> Any:
    """Plain data from the YAML file at `path`, read as parse_yaml reads text; `what` names it in errors.
    A FinetuneError for a file that is not a regular file, cannot be read, is over MAX_YAML_BYTES (no more
    than that is read), is not UTF-8 or is not YAML."""
    where = f"{what} {shown_text(path)}"
    try:
        with open_regular(path) as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except NotRegularFile as e:
        raise FinetuneError(f"{where} is {e}; give a YAML file.") from None
    except OSError as e:
        raise FinetuneError(f"{where} cannot be read: {e.strerror or e}.") from None
    if len(data) > MAX_YAML_BYTES:
        raise FinetuneError(f"{where} is over {MAX_YAML_BYTES:,} bytes, more than finetune reads; a recipe is a "
                            "few KB, so give the file that was meant.")
    try:
        return parse_yaml(data.decode("utf-8"), where)
    except UnicodeDecodeError as e:
        raise FinetuneError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start}); give a YAML file.") from None
    except YAML_SYNTAX_ERRORS as e:
        raise FinetuneError(f"{where} is not valid YAML: {_one_paragraph(e)}") from None


def _one_paragraph(error: Exception) -> str:
    """PyYAML's message (which points at the line over several lines) on one line."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())[:500]
