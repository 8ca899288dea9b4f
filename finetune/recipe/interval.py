"""train.checkpoint_every: how often a run writes a checkpoint inside an epoch, as a number of optimizer
updates (500) or a duration ("15min", "90s", "2h"); null: only at the end of each epoch."""

from __future__ import annotations

import math
import re

MAX_UPDATES = 10_000_000  # beyond any fine-tune's length: only a typo trips it
UNITS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|min|m|h)\s*$")


def checkpoint_interval(value: int | str | None) -> tuple[int | None, float | None]:
    """(updates, seconds) between checkpoints, one of them None (both for null). Raises ValueError with
    what is accepted when `value` is neither."""
    if value is None:
        return None, None
    if type(value) is int:
        if not 1 <= value <= MAX_UPDATES:
            raise ValueError(f"{value} updates: give 1 to {MAX_UPDATES:,}")
        return value, None
    match = DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is neither a number of updates (e.g. 500) nor a duration such as 15min, 90s or 2h")
    seconds = float(match.group(1)) * UNITS[match.group(2)]
    if not (math.isfinite(seconds) and 1 <= seconds <= 7 * 24 * 3600):
        raise ValueError(f"{value!r}: give a duration between 1s and a week (168h)")
    return None, seconds
