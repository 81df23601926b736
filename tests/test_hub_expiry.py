"""Abandoned uploads on a real hub (``pas hub run``, embedded archive, real sealed buckets):
a transfer a site started and never committed nor touched again for
``transfers.abandoned_after_days`` loses its staging (sealed bucket files, rebuild work files)
to a periodic sweep and to the sweep at start; a committed transfer and a transfer still
being sent keep theirs, and a site that comes back after the expiry still gets its receipt.

The expiry is set to a few seconds; each test awaits the condition (the files gone, the clock
past the deadline), it does not sleep.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.transfer.enrolment import Enrolment
from tests.support.hub import HubProcess, Shipment, client, enroll, pack_items, ship
from tests.support.old_schema import undo_hub_migration_15
from tests.support.peers import MR_DIR, wait_for

EXPIRY_S = 3.0


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path / "hub", {
        "PAS_HUB_TRANSFERS__ABANDONED_AFTER_DAYS": str(EXPIRY_S / 86400),
        "PAS_HUB_TRANSFERS__EXPIRY_CHECK_INTERVAL_S": "0.2"}).init()
    process.start()
    yield process
    process.stop()


@pytest.fixture
def site(hub: HubProcess, tmp_path: Path) -> Enrolment:
    return enroll(hub, tmp_path / "site", "CHU-NORD")


def _shipment(site: Enrolment, first: int, count: int) -> Shipment:
    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[first:first + count]
    return ship(pack_items(files), site.hub_transfer_key, target_bytes=256 * 1024,
                study_uid=f"1.2.826.0.1.3680043.8.498.77{first}")


def _start(http: httpx.Client, shipment: Shipment, buckets: int) -> None:
    assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
    for index in range(buckets):
        answer = http.put(shipment.bucket_url(index), content=shipment.buckets[index])
        assert answer.status_code == 201, answer.text


def _row(hub: HubProcess, transfer_id: str) -> sqlite3.Row:
    conn = sqlite3.connect(f"file:{hub.home / 'hub.sqlite'}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT *, (SELECT count(*) FROM buckets b WHERE b.transfer_id = "
                            "t.id) AS held FROM transfers t WHERE id = ?",
                            (transfer_id,)).fetchone()
    finally:
        conn.close()


def _staged(hub: HubProcess, transfer_id: str) -> bool:
    return (hub.home / "buckets" / transfer_id).exists() or (
        hub.home / "work" / transfer_id).exists()


def test_abandoned_staging_is_swept_and_only_that(hub: HubProcess, site: Enrolment) -> None:
    abandoned = _shipment(site, 0, 20)
    active = _shipment(site, 20, 20)
    committed = _shipment(site, 40, 10)
    assert len(abandoned.buckets) >= 3 and len(active.buckets) >= 2
    with client(site) as http:
        _start(http, abandoned, len(abandoned.buckets) - 1)  # the last one never comes
        _start(http, active, 1)
        _start(http, committed, len(committed.buckets))
        assert http.post(committed.url + "/commit").status_code == 200
        # Rebuild work files exist for the abandoned transfer (archived ahead).
        wait_for(lambda: (hub.home / "work" / abandoned.transfer_id).exists(), 30,
                 what="the abandoned transfer's work files")

        def active_site_still_sending() -> bool:
            # The active site sends again (an already held bucket counts as activity): it
            # must outlive the abandoned one, however long the sweep takes to come.
            again = http.put(active.bucket_url(0), content=active.buckets[0])
            assert again.status_code == 200, again.text
            return not _staged(hub, abandoned.transfer_id)

        wait_for(active_site_still_sending, 60, interval=0.5,
                 what="the abandoned transfer's staging swept")
        row = _row(hub, abandoned.transfer_id)
        assert row["expired_at"] is not None and row["held"] == 0 and row["receipt"] is None
        assert http.get(abandoned.url + "/buckets").json()["held"] == []
        # The active transfer keeps its bucket, the committed one its receipt.
        assert (hub.home / "buckets" / active.transfer_id).is_dir()
        assert http.get(active.url + "/buckets").json()["held"] == [0]
        assert _row(hub, active.transfer_id)["expired_at"] is None
        assert http.get(committed.url + "/receipt").status_code == 200
        assert _row(hub, committed.transfer_id)["expired_at"] is None
        # The sweep logs after it removed the staging (hub/expiry.py): awaited.
        wait_for(lambda: "abandoned transfers expired: 1" in hub.log(), 10,
                 what="the sweep's line")
        log = hub.log()
        assert (f"transfer {abandoned.transfer_id} of site CHU-NORD abandoned" in log), log[-3000:]

        # The site comes back after all: manifest again, held list, every bucket, receipt.
        assert http.post("/api/v1/transfers", json=abandoned.manifest).status_code == 200
        assert http.get(abandoned.url + "/buckets").json()["held"] == []
        assert abandoned.put_all(http) == [201] * len(abandoned.buckets)
        receipt = http.post(abandoned.url + "/commit")
        assert receipt.status_code == 200, receipt.text
        assert {(i["sop_instance_uid"], i["sha256"]) for i in receipt.json()["instances"]} == \
            set(abandoned.originals.items())
    assert _row(hub, abandoned.transfer_id)["expired_at"] is None


def test_staging_abandoned_while_the_hub_was_down_goes_at_start(
        hub: HubProcess, site: Enrolment) -> None:
    """With the periodic sweep set to an hour, only the sweep at start can remove it: it is
    gone as soon as the port opens (the sweep runs before), and the archiver does not resume
    the transfer."""
    abandoned = _shipment(site, 60, 20)
    with client(site) as http:
        _start(http, abandoned, 2)
    created = _row(hub, abandoned.transfer_id)["created_at"]
    hub.stop()
    assert (hub.home / "buckets" / abandoned.transfer_id).is_dir()
    wait_for(lambda: time.time() > created + EXPIRY_S + 0.5, 30,
             what="the transfer to be idle past the expiry")
    hub.env["PAS_HUB_TRANSFERS__EXPIRY_CHECK_INTERVAL_S"] = "3600"
    hub.start()
    assert not _staged(hub, abandoned.transfer_id)
    assert _row(hub, abandoned.transfer_id)["expired_at"] is not None
    assert "abandoned transfers expired: 1" in hub.log()


def test_an_upgraded_hub_counts_idleness_from_the_last_bucket_not_the_creation(
        tmp_path: Path) -> None:
    """Migration 4 adds ``last_activity_at`` NULL to every transfer already there, and idleness
    was counted from ``created_at`` for them: the first start after the upgrade expired the
    staging of a transfer begun 40 days before whose site had sent buckets 5 days ago (a slow
    site, a long outage), though the expiry is at 30 days. The buckets held say when the
    site was last heard of: the transfer is kept.

    The hub's database is taken back to schema 3 as a hub before the upgrade held it (the two
    columns and the index dropped, and what later migrations added, user_version 3), dated
    so, and the upgraded hub starts."""
    hub = HubProcess(tmp_path / "hub", {"PAS_HUB_TRANSFERS__ABANDONED_AFTER_DAYS": "30"})
    hub.init()
    hub.start()
    try:
        site = enroll(hub, tmp_path / "site", "CHU-NORD")
        slow = _shipment(site, 0, 20)
        with client(site) as http:
            _start(http, slow, 2)
    finally:
        hub.stop()
    day = 86400.0
    conn = sqlite3.connect(hub.home / "hub.sqlite")
    try:
        with conn:
            conn.execute("DROP INDEX transfers_open")
            conn.execute("DROP INDEX transfers_study")  # migration 8's (6's it replaced)
            conn.execute("DROP TABLE hub_backup")  # migration 7's
            conn.execute("DROP INDEX fleet_heartbeats_site_received")  # migration 10's
            conn.execute("ALTER TABLE fleet_heartbeats DROP COLUMN beats")
            conn.execute("ALTER TABLE enrol_tokens DROP COLUMN expires_at")  # migration 9's
            conn.execute("ALTER TABLE enrol_tokens DROP COLUMN voided_at")  # migration 11's
            conn.execute("ALTER TABLE certificates DROP COLUMN superseded_by")  # 12's
            conn.execute("DROP TABLE archived_by_site")  # migration 14's
            undo_hub_migration_15(conn)
            conn.execute("ALTER TABLE transfers DROP COLUMN last_activity_at")
            conn.execute("ALTER TABLE transfers DROP COLUMN expired_at")
            conn.execute("UPDATE transfers SET created_at = ? WHERE id = ?",
                         (time.time() - 40 * day, slow.transfer_id))
            conn.execute("UPDATE buckets SET received_at = ? - idx WHERE transfer_id = ?",
                         (time.time() - 5 * day, slow.transfer_id))
        conn.execute("PRAGMA user_version = 3")
    finally:
        conn.close()
    hub.start()  # migration 4, then the sweep at start, before the port opens
    try:
        assert (hub.home / "buckets" / slow.transfer_id).is_dir()
        row = _row(hub, slow.transfer_id)
        assert row["expired_at"] is None and row["held"] == 2
        assert "abandoned" not in hub.log()
        with client(site) as http:  # the site resumes where it was
            assert http.get(slow.url + "/buckets").json()["held"] == [0, 1]
    finally:
        hub.stop()
