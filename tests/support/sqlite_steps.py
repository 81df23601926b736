"""SQLite's own work, counted: how many virtual-machine instructions a look-up ran.

Why: a look-up that reads a whole table instead of an index is found by the count, which does
not depend on the machine's load as a time would (tests/test_store_index_lookups.py,
tests/test_store_hub_lookups.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from appliance.store.db import Database

T = TypeVar("T")


def counted(db: Database, look_up: Callable[[], T], every: int = 1) -> tuple[int, T]:
    """How many SQLite instructions ``look_up()`` ran on ``db``'s connection, and what it
    returned. ``every`` > 1 counts in steps of that many (each statement rounded down to
    them): cheaper on look-ups that run millions."""
    conn = db.connection()
    steps = [0]

    def count() -> int:
        steps[0] += every
        return 0  # go on

    conn.set_progress_handler(count, every)
    try:
        result = look_up()
    finally:
        conn.set_progress_handler(None, 0)
    return steps[0], result


