"""The background scrub and eviction side by side: no false "missing" flag.

A real ``pas run`` restarted over a spool holding two CT studies scrubs them slowly
(``cache.scrub_mb_per_s``, a batch of rows read first, then each file hashed in turn).
Meanwhile the region confirms both (the test writes ``confirmed_at``, standing in for the
uplink's receipts, as tests/faults/test_cache_policy.py does) and the daemon's eviction pass,
above its high watermark, evicts them. The scrub then meets files whose rows went with them:
that is an eviction, not damage, and no integrity issue may be raised for it (one raised
stayed open for ever: no row is left for a later scrub to find the path healthy again).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.support.peers import CT_DIR, PasProcess, storescu, wait_for


def _rows(home: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    conn = sqlite3.connect(home / "pas.sqlite", timeout=30)
    try:
        with conn:
            return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_an_eviction_under_the_scrub_raises_no_missing_file(tmp_path: Path) -> None:
    files = sorted(CT_DIR.glob("A002304_*.dcm"))  # two studies, 6 instances, ~3 MB
    home = tmp_path / "pas"
    env = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_CACHE__SCRUB_MB_PER_S": "0"}
    pas = PasProcess(home, env).start()
    try:
        storescu(files, pas.port)
    finally:
        pas.stop()
    ((count, max_id),) = _rows(home, "SELECT count(*), max(id) FROM instances")
    assert count == len(files)
    pas = PasProcess(home, {
        **env,
        # About 2 s a file: the scrub's batch (every row) is read long before it ends.
        "PAS_CACHE__SCRUB_MB_PER_S": "0.25",
        "PAS_STORAGE__QUOTA_MB": "20",
        "PAS_CACHE__HIGH_WATERMARK_PERCENT": "5",
        "PAS_CACHE__LOW_WATERMARK_PERCENT": "0",
        "PAS_CACHE__EVICT_INTERVAL_S": "0.2",
    }).start()
    try:
        _rows(home, "UPDATE instances SET confirmed_at = 1, "  # the region's receipts
              "routed_at = coalesce(routed_at, 1)")
        wait_for(lambda: _rows(home, "SELECT count(*) FROM studies") == [(0,)], 30,
                 what="both studies evicted")
        # The scrub's batch ends: its position saved, or a new pass begun.
        wait_for(lambda: _rows(home, "SELECT last_instance_id, passes FROM scrub_state")
                 in ([(max_id, 0)], [(0, 1)]), 120, what="the scrub's batch over")
        issues = _rows(home, "SELECT kind, path FROM integrity_issues "
                             "WHERE resolved_at IS NULL AND kind != 'evicting'")
        assert issues == [], issues
        assert "integrity: missing" not in pas.log()
    finally:
        pas.stop()
