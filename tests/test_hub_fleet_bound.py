"""The fleet's history bounded per site (appliance/store/fleet.py, hub migration 10).

The hub took every heartbeat with a new ``sent_at``: an enrolled site posting in a loop (a bug,
or its certificate in other hands) added a history row for each, kept 8 days, and its site
page read them all.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from appliance.store import fleet as fleet_store
from appliance.store.fleet import HISTORY_EVERY_S
from appliance.store.hub import open_hub_db
from tests.support.sqlite_steps import counted


def _beat(site: str, sent_at: float, studies: int = 3, version: str = "loop") -> dict[str, Any]:
    return {"site": site, "sent_at": sent_at, "version": version, "uptime_s": 5,
            "backlog": {"studies": studies, "bytes": 1000, "oldest_age_s": 60.0,
                        "urgent_oldest_age_s": 0.0, "routine_oldest_age_s": 60.0},
            "jobs": {"pending": 3, "running": 0, "failed": 0},
            "disk": {"used_percent": 40.0, "free_bytes": 10},
            "received": {"instances": 7, "bytes": 7000}, "confirmed_instances": 0,
            "cert_days_left": 200.0, "errors": []}


def test_the_history_window_and_the_site_page_read_stay_bounded(tmp_path: Path) -> None:
    """The store alone: 200 heartbeats in a row fold into one history row (every one
    counted, a copy of the latest or of a row's first changes nothing), and the site page's
    read costs SQLite the same work with 20,000 or 200,000 rows of the site in the day (a
    table an older hub filled, a row per heartbeat): it read them all (91 ms a page at
    200,000 rows, measured through a real hub; 10 times the instructions of 20,000)."""
    db = open_hub_db(tmp_path / "hub.sqlite")
    try:
        began = time.time()
        first = _beat("FAST", began)
        assert fleet_store.record_heartbeat(db, "FAST", first, HISTORY_EVERY_S)
        for n in range(1, 200):
            assert fleet_store.record_heartbeat(db, "FAST", _beat("FAST", began + n / 1000, n),
                                                HISTORY_EVERY_S)
        last = _beat("FAST", began + 199 / 1000)
        assert not fleet_store.record_heartbeat(db, "FAST", last, HISTORY_EVERY_S)
        assert not fleet_store.record_heartbeat(db, "FAST", first, HISTORY_EVERY_S)
        assert fleet_store.history_rows(db, "FAST") <= 1 + (time.time() - began) // 15
        assert fleet_store.heartbeat_count(db, "FAST") == 200
        points, beats = fleet_store.history_by_slot(db, "FAST", time.time() - 86400, 60.0)
        assert beats == 200 and max(p["backlog_studies"] for p in points) == 199

        def fill(site: str, rows: int) -> None:
            start = time.time() - 86400 + 120
            step = (86400 - 240) / rows
            with db.transaction() as conn:
                conn.executemany(
                    "INSERT INTO fleet_heartbeats (site, sent_at, received_at, "
                    "backlog_studies, backlog_oldest_s, disk_used_percent, received_bytes, "
                    "received_instances, failed_jobs) VALUES (?, ?, ?, 1, 1.0, 50.0, ?, ?, 0)",
                    ((site, start + i * step, start + i * step, i, i) for i in range(rows)))

        work = {}
        for site, rows in (("SMALL", 20_000), ("LARGE", 200_000)):
            fill(site, rows)
            work[site], (points, beats) = counted(db, lambda s=site: fleet_store.history_by_slot(
                db, s, time.time() - 86400, 60.0), every=100)
            assert 1430 <= len(points) <= 1441
            assert beats <= 1441 * fleet_store.SLOT_ROWS
    finally:
        db.close()
    assert work["LARGE"] <= 1.1 * work["SMALL"], work
