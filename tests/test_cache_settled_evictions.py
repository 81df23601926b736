"""An eviction's settled ``evicting`` rows are forgotten after 30 days (appliance schema 23).

Each evicted file leaves an ``integrity_issues`` row (the intent start-up recovery finishes
an eviction from after a crash), settled once the file is gone. They stayed for ever: a full
cache evicting at its intake rate of 5,000 files a day kept ~9 million rows in five years,
in every backup too. The cache loop of ``pas run`` now forgets those settled over
``SETTLED_EVICTIONS_KEPT_DAYS`` ago, at its first pass and then hourly, a batch per
transaction; open rows, recent ones and integrity issues of other kinds stay.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from appliance.store.db import Database
from appliance.store.eviction import PRUNE_ROWS_PER_TRANSACTION, SETTLED_EVICTIONS_KEPT_DAYS
from appliance.store.schema import MIGRATIONS
from tests.support.peers import PasProcess, wait_for

DAY = 86400.0


def test_settled_eviction_rows_over_30_days_old_are_forgotten_and_no_other(
        pas_factory: Callable[..., PasProcess], tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    old_count = 2 * PRUNE_ROWS_PER_TRANSACTION + 500  # three transactions
    at = time.time()
    long_ago = at - (SETTLED_EVICTIONS_KEPT_DAYS + 10) * DAY
    lately = at - (SETTLED_EVICTIONS_KEPT_DAYS - 1) * DAY
    db = Database(home / "pas.sqlite", MIGRATIONS)
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO integrity_issues (found_at, kind, path, detail, resolved_at, "
            "resolution) VALUES (?, 'evicting', ?, 'study 2.25.1', ?, 'deleted')",
            [(long_ago, f"old/{n}.dcm", long_ago) for n in range(old_count)])
        kept = [
            (lately, "evicting", "recent/1.dcm", lately, "deleted"),
            (lately, "evicting", "recent/2.dcm", lately, "kept"),
            (long_ago, "missing", "lost/1.dcm", long_ago, "re-fetched"),  # another kind
            (long_ago, "mismatch", "bad/1.dcm", None, None),  # open: never pruned
        ]
        conn.executemany("INSERT INTO integrity_issues (found_at, kind, path, resolved_at, "
                         "resolution) VALUES (?, ?, ?, ?, ?)", kept)
    db.close()

    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true"}, home=home)
    said = wait_for(lambda: re.search(r"forgot ([\d,]+) evicted file's rows? settled over "
                                      rf"{SETTLED_EVICTIONS_KEPT_DAYS} days ago", pas.log()),
                    30, what="the settled eviction rows forgotten")
    assert int(said.group(1).replace(",", "")) == old_count
    conn = sqlite3.connect(home / "pas.sqlite")
    try:
        left = sorted(conn.execute("SELECT path FROM integrity_issues").fetchall())
    finally:
        conn.close()
    assert left == sorted((row[2],) for row in kept)
    assert pas.proc.poll() is None  # and the daemon serves on
    assert pas.status()["instances"] == 0
