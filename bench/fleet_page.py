"""The fleet's site page with one site holding ROWS heartbeat rows of the last 24 h.

A real `pas hub run`; the rows are written straight into its database before it starts (as
an older hub, which kept every beat, would have left them). The page's time over 15 requests
is printed; it reads a bounded number of rows whatever the table holds (docs/benchmarks.md,
"The fleet's site page with a flooded history").

    make bench-hub-loop   (or .venv/bin/python bench/fleet_page.py [ROWS])
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, as bench/hub.py

from appliance.store import fleet as fleet_store
from appliance.store.hub import open_hub_db
from tests.support.hub import HubProcess

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000


def beat(sent_at: float) -> dict:
    return {"site": "SITE-X", "sent_at": sent_at, "version": "0.1.0", "uptime_s": 5,
            "backlog": {"studies": 3, "bytes": 1000, "oldest_age_s": 600.0,
                        "urgent_oldest_age_s": 0.0, "routine_oldest_age_s": 590.0},
            "jobs": {"pending": 3, "running": 0, "failed": 1},
            "disk": {"used_percent": 50.0, "free_bytes": 10},
            "received": {"instances": 7, "bytes": 7000}, "confirmed_instances": 0,
            "cert_days_left": 200.0, "errors": []}


with tempfile.TemporaryDirectory(prefix="fleetbound-") as tmp:
    hub = HubProcess(Path(tmp) / "hub", {"PAS_HUB_LOG_LEVEL": "warning"}).init()
    db = open_hub_db(hub.home / "hub.sqlite")
    fleet_store.record_heartbeat(db, "SITE-X", beat(time.time()))
    start = time.time() - 86400 + 120
    step = (86400 - 240) / ROWS
    with db.transaction() as conn:
        conn.executemany(
            "INSERT OR IGNORE INTO fleet_heartbeats (site, sent_at, received_at, "
            "backlog_studies, backlog_oldest_s, disk_used_percent, received_bytes, "
            "received_instances, failed_jobs) VALUES ('SITE-X', ?, ?, ?, 1.0, 50.0, ?, ?, 0)",
            [(start + i * step, start + i * step, i % 50, i * 1000, i) for i in range(ROWS)])
    print("rows for SITE-X:", db.query_one(
        "SELECT count(*) AS n FROM fleet_heartbeats WHERE site='SITE-X'")["n"])
    db.close()
    hub.start()
    try:
        with httpx.Client(base_url=hub.url, verify=hub.anonymous_context(), timeout=60) as v:
            v.get("/fleet/sites/SITE-X")  # warm
            times = []
            for _ in range(15):
                t0 = time.perf_counter()
                page = v.get("/fleet/sites/SITE-X")
                times.append(time.perf_counter() - t0)
                assert page.status_code == 200
        facts = page.text[page.text.index("<p id=facts>"):][:400]
        print(f"site page: median {statistics.median(times)*1000:.1f} ms, "
              f"min {min(times)*1000:.1f} ms, max {max(times)*1000:.1f} ms, "
              f"{len(page.content)} bytes")
        print(facts[facts.index("received ·"):facts.index("</p>")])
    finally:
        hub.stop()
