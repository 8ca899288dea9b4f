"""Bad image files during a run: what counts as one, how a batch survives it, and where it is recorded.

A file that cannot be decoded (truncated, zero bytes, not an image at all) must not end a run that may
be hours in. Decoding happens inside DataLoader worker processes, so a skipped file is recorded by
appending one JSON line to a per-process log file (appends of one short line are atomic on POSIX); the
main process reads every log into `data_report.json`. Logs live in the run directory so that a resumed
run keeps what the interrupted one found.

A bad sample keeps the batch shape: training takes the next readable sample in its place (the class mix
barely moves, and a batch never ends up empty); evaluation takes the next readable image too but labels
it IGNORE_LABEL (samples.py), so the metrics skip it instead of counting a sample twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from ..atomic import write_atomic
from .images import ImageTooLarge, image_too_large

# What a broken or non-image file raises while decoding: PIL's UnidentifiedImageError and "image file is
# truncated" are OSErrors; bad headers raise ValueError/SyntaxError/EOFError; a file with more pixels than PIL
# decodes raises ImageTooLarge from images.open_image, or DecompressionBombError where PIL decodes it directly
# (a Hugging Face dataset's Image feature).
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, ImageTooLarge, Image.DecompressionBombError)
MAX_BAD_IN_A_ROW = 64  # more consecutive unreadable samples than this means the data, not a file, is broken
LOG_GLOB = ".skipped-*.jsonl"
DATA_REPORT_NAME = "data_report.json"


def describe_error(error: BaseException) -> str:
    """The reason recorded for a bad image: the error's type and first line; for a too large image
    "image too large (N pixels > LIMIT)" whichever of the two errors said so."""
    if isinstance(error, Image.DecompressionBombError):
        error = image_too_large(error)
    if isinstance(error, ImageTooLarge):
        return str(error)
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class SkipLog:
    """An append-only JSON-lines log of skipped files, safe to write from several loader workers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def for_process(cls, folder: Path, process_index: int) -> "SkipLog":
        return cls(folder / LOG_GLOB.replace("*", str(process_index)))

    def record(self, split: str, name: str, reason: str) -> None:
        line = json.dumps({"split": split, "file": name, "reason": reason}) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


def read_skip_logs(folder: Path) -> list[dict]:
    """Every skipped file in `folder`'s logs, once per (split, file), in the order first seen."""
    seen: dict[tuple[str, str], dict] = {}
    for path in sorted(folder.glob(LOG_GLOB)):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            seen.setdefault((entry["split"], entry["file"]), entry)
    return list(seen.values())


def remove_skip_logs(folder: Path) -> None:
    for path in folder.glob(LOG_GLOB):
        path.unlink(missing_ok=True)


def save_data_report(folder: Path, on_bad_image: str, sizes: dict[str, int | None], final: bool = False) -> int:
    """data_report.json in `folder` from every process's skip log (main process only): images per split and
    every skipped file with its reason. `final` also removes the logs. Returns the skipped count."""
    skipped = read_skip_logs(folder)
    write_atomic(folder / DATA_REPORT_NAME, json.dumps({"on_bad_image": on_bad_image, "images": sizes,
                                                        "skipped_count": len(skipped), "skipped": skipped}, indent=2))
    if final:
        remove_skip_logs(folder)
    return len(skipped)
