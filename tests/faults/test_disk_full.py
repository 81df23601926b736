"""Disk full during ingest: 0xA700, nothing half-written, accepting again once space is back.

The spool lives on a small tmpfs the test mounts (root: CI runs as root). A filler file eats
the space; DCMTK storescu sends the real CT set. Two ways to be full are tried: the
configured floor (``storage.min_free_mb``, refused before any byte is written) and the file
system itself refusing the write (ENOSPC, floor 0).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.ops.disk_alert import NONE, REFUSING_IMAGES
from tests.faults.helpers import (
    assert_consistent,
    assert_kept_exactly,
    sop_uid_of,
    stored_successes,
)
from tests.support.peers import CT_DIR, DCMTK_ENV, PasProcess, small_disk_at, wait_for

MB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 48 MiB of its own, unmounted after the test."""
    with small_disk_at(tmp_path / "disk", 48) as disk:
        yield disk


def _send_all(port: int) -> tuple[list[str], list[str]]:
    files = sorted(str(p) for p in CT_DIR.glob("*.dcm"))
    result = subprocess.run(["storescu", "-v", "-aec", "PAS", "-aet", "CT1", "127.0.0.1",
                             str(port), *files], env=DCMTK_ENV, capture_output=True, text=True,
                            timeout=120)
    output = result.stdout + result.stderr
    statuses = re.findall(r"Received Store Response \(([^)]*)\)", output)
    return stored_successes(output), statuses


def _fill(mount: Path, leave_free: int) -> Path:
    filler = mount / "filler.bin"
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(filler, "wb") as handle:
        handle.truncate(0)
        chunk = b"\0" * MB
        for _ in range((free - leave_free) // MB):
            handle.write(chunk)
    return filler


@pytest.mark.parametrize("floor_mb,leave_free_mb,spill_above_mb",
                         [(2, 12, 32), (0, 6, 32), (0, 6, 0)],
                         ids=["floor", "enospc", "enospc-spilled"])
def test_disk_full_refuses_with_a700_then_recovers(small_disk: Path, floor_mb: int,
                                                    leave_free_mb: int,
                                                    spill_above_mb: int) -> None:
    """``spill_above_mb = 0``: every dataset is written to its temp file as it arrives, so
    the full disk is met while the C-STORE is still being read."""
    home = small_disk / "pas"
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
                            "PAS_DICOM__SPILL_ABOVE_MB": str(spill_above_mb),
                            "PAS_STORAGE__MIN_FREE_MB": str(floor_mb),
                            "PAS_CACHE__SCRUB_MB_PER_S": "0",
                            "PAS_CACHE__EVICT_INTERVAL_S": "0.2"}).start()
    try:
        filler = _fill(small_disk, leave_free_mb * MB)
        accepted, statuses = _send_all(pas.port)
        refused = [s for s in statuses if s != "Success"]
        assert accepted and refused, statuses  # some fit, the rest did not
        # storescu prints 0xA700 as "Refused: OutOfResources": whether the file or the
        # index commit (SQLITE_FULL) met the full disk first, the sender hears "out of
        # resources", never a processing failure.
        assert set(refused) == {"Refused: OutOfResources"}, set(refused)
        state = assert_consistent(home)  # no partial file, no temp file, no orphan
        assert state["rows"] == len(set(accepted))
        assert_kept_exactly(home, accepted)
        wait_for(lambda: "ALERT hard limit" in pas.log(), 15, what="the disk alert")
        if floor_mb:  # above the floor the database still takes the alert's row
            assert "hard limit" in pas.status()["cache"]["disk_alert"]
            _assert_said_beyond_the_site(home, "hard limit", REFUSING_IMAGES)

        # Space comes back: the same daemon accepts again, no restart, no operator action.
        filler.unlink()
        accepted_again, statuses_again = _send_all(pas.port)
        assert all(s == "Success" for s in statuses_again), set(statuses_again)
        state = assert_consistent(home)
        # 62 files, 60 SOP Instance UIDs: the set holds two instances twice.
        assert state["rows"] == len({sop_uid_of(p) for p in CT_DIR.glob("*.dcm")})
        assert_kept_exactly(home, accepted_again)
        assert "out of resources" in pas.log()
        try:
            wait_for(lambda: "disk alert cleared" in pas.log(), 15, what="the alert to clear")
        except TimeoutError:
            lines = [x for x in pas.log().splitlines()
                     if "prefetch" not in x and "routing" not in x]
            raise AssertionError("alert not cleared; log:\n" + "\n".join(lines[-60:])) from None
        assert pas.status()["cache"]["disk_alert"] is None
        if floor_mb:
            _assert_said_beyond_the_site(home, None, NONE)
    finally:
        pas.stop()


def _assert_said_beyond_the_site(home: Path, alert: str | None, level: int) -> None:
    """The daemon's disk alert as regional ops and a Prometheus scraping the appliance see
    it: the heartbeat's error line (the hub reads its level back for
    ``pas_fleet_site_disk_alert``) and ``pas_disk_alert``. Before, the heartbeat said only the
    file system's figure over 85 %: C-STOREs refused at the floor or a quota, with the file
    system far from full, reached neither."""
    from prometheus_client import CollectorRegistry

    from appliance.config import load_settings
    from appliance.hub.fleet import validate_heartbeat
    from appliance.ops.disk_alert import level_said
    from appliance.ops.heartbeat import build_heartbeat
    from appliance.ops.metrics import ApplianceCollector
    from appliance.store.db import Database

    settings = load_settings(environ={"PAS_HOME": str(home)})
    db = Database(settings.db_path, readonly=True)
    try:
        errors = validate_heartbeat(build_heartbeat(settings, db, 0.0))["errors"]
        registry = CollectorRegistry()
        registry.register(ApplianceCollector(settings, db))
        exported = registry.get_sample_value("pas_disk_alert")
    finally:
        db.close()
    said = [error for error in errors if error.startswith("disk alert: ")]
    if alert is None:
        assert said == [], errors
    else:
        assert len(said) == 1 and alert in said[0], errors
    assert max((level_said(error) for error in errors), default=0) == level
    assert exported == level
