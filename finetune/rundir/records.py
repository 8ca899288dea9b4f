"""metrics.jsonl, a run's epoch records: one JSON object per finished epoch, appended by the loop, read
back by the run directory on resume, by `finetune runs` and by the model card.

The file is rewritten whole at every append (a few lines per epoch), so a kill never leaves half a line;
a line that is no record all the same (cut off by a full disk, or an incomplete copy of the folder) is
skipped by every reader, and set aside into metrics.jsonl.damaged when a run resumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..atomic import write_atomic

METRICS_NAME = "metrics.jsonl"
DAMAGED_METRICS_NAME = "metrics.jsonl.damaged"  # lines of metrics.jsonl that could not be read, set aside


def read_metrics_file(path: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """metrics.jsonl's epoch records, and the lines that are none (number, text)."""
    records, bad = [], []
    for number, line in enumerate(path.read_text().splitlines() if path.is_file() else [], 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and type(record.get("epoch")) is int:
            records.append(record)
        elif line.strip():
            bad.append((number, line))
    return records, bad


def append_record(folder: Path, record: dict) -> None:
    path = folder / METRICS_NAME
    before = path.read_text() if path.is_file() else ""
    write_atomic(path, before + json.dumps(record) + "\n")


def keep_records_through(folder: Path, epoch: int, log: Callable[[str], None] = print) -> list[dict]:
    """On resume: drop records of epochs after the checkpoint (an epoch that finished logging but was
    killed before its checkpoint is trained again, so it must not appear twice). Lines that are no
    record are moved to metrics.jsonl.damaged, and said so."""
    records, bad = read_metrics_file(folder / METRICS_NAME)
    if bad:
        damaged = folder / DAMAGED_METRICS_NAME
        before = damaged.read_text() if damaged.is_file() else ""
        write_atomic(damaged, before + "".join(line + "\n" for _, line in bad))
        log(f"note: {METRICS_NAME} line{'s' * (len(bad) > 1)} {', '.join(str(n) for n, _ in bad)}: not a "
            f"complete record (cut off by a full disk or an incomplete copy); moved to {damaged}.")
    kept = [r for r in records if r["epoch"] <= epoch]
    write_atomic(folder / METRICS_NAME, "".join(json.dumps(r) + "\n" for r in kept))
    missing = sorted(set(range(1, epoch + 1)) - {r["epoch"] for r in kept})
    if missing:
        log(f"note: {METRICS_NAME} has no record of epoch(s) {', '.join(map(str, missing))}; the curves skip them.")
    return kept
