"""The hub's own backups, watched (migration 7; appliance/hub/backup.py, appliance/hub/fleet.py).

The appliances' backups are watched everywhere (``pas doctor``, heartbeats, ``PasBackupOld``);
the hub recorded nothing when ``pas hub backup`` ran, so a stopped ``pas-hub-backup.timer``
went unseen until a restore was needed. Now the live ``hub.sqlite`` records each whole backup,
and a real ``pas hub run`` says its age on ``/metrics`` (``pas_hub_backup_age_seconds``, from
when the hub began being watched if never) and on ``/fleet``.
"""

from __future__ import annotations

import html
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.ops.backup_folder import utc_stamp
from appliance.store.hub import open_hub_db
from tests.support.hub import HubProcess
from tests.support.old_schema import undo_hub_migration_15
from tests.support.peers import wait_for

DAY = 86400.0


def _gauge(text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def _record(hub: HubProcess) -> dict:
    """Migration 7's row in the live database, read as the tests' own SQL."""
    conn = sqlite3.connect(hub.home / "hub.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute("SELECT since, written_at, folder, actor FROM hub_backup")
                    .fetchone())
    finally:
        conn.close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path / "hub").init()
    yield process
    process.stop()


def _viewer(hub: HubProcess) -> httpx.Client:
    return httpx.Client(base_url=hub.url, verify=hub.anonymous_context(), timeout=30)


def _backup_into(hub: HubProcess, destination: Path) -> Path:
    """The timer's command, ``pas hub backup DESTINATION``, into a new folder: the backup
    folder it wrote (as its ``--json`` says)."""
    destination.mkdir()
    return Path(json.loads(hub.cli("backup", str(destination), "--json").stdout)["folder"])


def _recorded_just_now_by_an_operator(hub: HubProcess, folder: Path) -> dict:
    """The record after a backup run by hand just now: that folder, an operator's, this
    minute's."""
    record = _record(hub)
    assert record["folder"] == str(folder) and record["actor"].startswith("operator:")
    assert time.time() - 60 < record["written_at"] <= time.time()
    return record


def test_the_hubs_backup_age_counts_from_since_then_from_each_backup(
        hub: HubProcess, tmp_path: Path) -> None:
    db = open_hub_db(hub.home / "hub.sqlite")
    try:  # a hub watched for three days that was never backed up (its timer never ran)
        with db.transaction() as conn:
            conn.execute("UPDATE hub_backup SET since = ?", (time.time() - 3 * DAY,))
    finally:
        db.close()
    hub.start()
    with _viewer(hub) as viewer:
        scrape = viewer.get("/metrics").text
        age = _gauge(scrape, "pas_hub_backup_age_seconds")
        assert age is not None and 3 * DAY <= age < 3 * DAY + 60
        assert _gauge(scrape, "pas_hub_last_backup_timestamp_seconds") is None
        assert "<p id=hub-backup><span class=warn>hub backup: never</span></p>" in \
            viewer.get("/fleet").text

        # The timer's command, while the hub serves.
        first = _backup_into(hub, tmp_path / "backups")
        record = _recorded_just_now_by_an_operator(hub, first)
        scrape = viewer.get("/metrics").text
        assert _gauge(scrape, "pas_hub_backup_age_seconds") < 60  # type: ignore[operator]
        assert _gauge(scrape, "pas_hub_last_backup_timestamp_seconds") == record["written_at"]
        assert f"<p id=hub-backup><span>hub backup: 0 min ago, {first}</span></p>" in \
            viewer.get("/fleet").text

        # Refused backups (a destination that is a file, one that is missing) record nothing.
        a_file = tmp_path / "a-file"
        a_file.write_text("not a folder\n")
        for refused_at in (a_file, tmp_path / "nowhere"):
            refused = hub.cli("backup", str(refused_at), check=False)
            assert refused.returncode == 1 and "refused:" in refused.stderr
            assert _record(hub) == record
        assert _gauge(viewer.get("/metrics").text,
                      "pas_hub_last_backup_timestamp_seconds") == record["written_at"]

        # A second backup, elsewhere (a name the page must escape), a second later at least
        # (the folder's name is stamped to the second): it is the one recorded and shown.
        stamp = utc_stamp()
        wait_for(lambda: utc_stamp() != stamp, 5, what="the next second")
        second = _backup_into(hub, tmp_path / "share <&> x")
        moved = _record(hub)
        assert moved["folder"] == str(second) and moved["written_at"] > record["written_at"]
        assert moved["since"] == record["since"]
        assert _gauge(viewer.get("/metrics").text,
                      "pas_hub_last_backup_timestamp_seconds") == moved["written_at"]
        page = viewer.get("/fleet").text
        assert f"hub backup: 0 min ago, {html.escape(str(second))}</span>" in page
        assert "share <&>" not in page and str(first) not in page


def test_an_upgraded_hub_is_watched_from_its_upgrade(hub: HubProcess, tmp_path: Path) -> None:
    """A hub of schema 6 (before migration 7): its first start adds the row, ``since`` that
    start, and the age counts from there; its first backup is recorded."""
    with sqlite3.connect(hub.home / "hub.sqlite") as conn:
        conn.execute("DROP TABLE hub_backup")
        conn.execute("DROP INDEX fleet_heartbeats_site_received")  # migration 10's
        conn.execute("ALTER TABLE fleet_heartbeats DROP COLUMN beats")
        conn.execute("ALTER TABLE enrol_tokens DROP COLUMN expires_at")  # migration 9's
        conn.execute("ALTER TABLE enrol_tokens DROP COLUMN voided_at")  # migration 11's
        conn.execute("ALTER TABLE certificates DROP COLUMN superseded_by")  # migration 12's
        conn.execute("DROP TABLE archived_by_site")  # migration 14's
        undo_hub_migration_15(conn)
        conn.execute("DROP INDEX transfers_study")  # migration 8's, and 6's index back
        conn.execute("CREATE INDEX transfers_committed_study ON transfers (site, study_uid) "
                     "WHERE receipt IS NOT NULL")
    conn.close()
    with sqlite3.connect(hub.home / "hub.sqlite") as conn:
        conn.execute("PRAGMA user_version = 6")
    conn.close()
    before = time.time()
    hub.start()
    after = time.time()
    record = _record(hub)
    assert before - 1 <= record["since"] <= after + 1
    assert (record["written_at"], record["folder"], record["actor"]) == (None, None, None)
    with _viewer(hub) as viewer:
        age = _gauge(viewer.get("/metrics").text, "pas_hub_backup_age_seconds")
        assert age is not None and 0 <= age <= time.time() - before + 1
        # Not yet a warning: the timer has not had its two days.
        assert "<p id=hub-backup><span>hub backup: none yet</span></p>" in \
            viewer.get("/fleet").text
    made = _backup_into(hub, tmp_path / "backups")
    assert _record(hub)["folder"] == str(made)


def test_a_backup_the_live_database_cannot_record_fails_loudly(
        hub: HubProcess, tmp_path: Path) -> None:
    """The folder is whole but the live ``hub.sqlite`` refuses the write: the command fails
    (the unit fails, ``systemctl --failed`` shows it) naming both, and the record is as it
    was."""
    before = _record(hub)
    destination = tmp_path / "backups"
    destination.mkdir()
    database = hub.home / "hub.sqlite"
    subprocess.run(["chattr", "+i", str(database)], check=True)  # not even root writes it
    try:
        failed = hub.cli("backup", str(destination), check=False)
    finally:
        subprocess.run(["chattr", "-i", str(database)], check=True)
    assert failed.returncode == 1, failed.stdout
    said = " ".join(failed.stderr.split())
    [folder] = list(destination.iterdir())
    assert f"not recorded: hub backup written to {folder}, but {database} could not record " \
        "it" in said, failed.stderr
    assert (folder / "MANIFEST.json").is_file()
    assert _record(hub) == before


def test_a_backup_recorded_while_the_clock_ran_ahead_does_not_hide_the_next(
        hub: HubProcess, tmp_path: Path) -> None:
    """The hub's clock ran a month ahead when its timer's last backup was recorded, and was
    set back since (NTP): the record "only moves forward", so every later backup was left
    unrecorded until the clock caught up with it a month later, and the age read 0 all that
    time (a timer stopped meanwhile unseen). A record dated in the future gives way."""
    ahead = time.time() + 30 * DAY
    db = open_hub_db(hub.home / "hub.sqlite")
    try:
        with db.transaction() as conn:
            conn.execute("UPDATE hub_backup SET written_at = ?, folder = ?, actor = ?",
                         (ahead, str(tmp_path / f"pas-hub-backup-{utc_stamp(ahead)}"),
                          "system:pas-hub-backup.timer"))
    finally:
        db.close()
    made = _backup_into(hub, tmp_path / "backups")
    record = _recorded_just_now_by_an_operator(hub, made)
    hub.start()
    with _viewer(hub) as viewer:
        assert _gauge(viewer.get("/metrics").text,
                      "pas_hub_last_backup_timestamp_seconds") == record["written_at"]
        assert f"hub backup: 0 min ago, {made}</span>" in viewer.get("/fleet").text


def test_a_missing_record_row_does_not_take_the_fleet_metrics_with_it(
        hub: HubProcess, tmp_path: Path) -> None:
    """Migration 7's one row gone (the database edited by hand): every scrape of ``/metrics``
    failed (500: the sites' families lost with the hub's, so every fleet alert went quiet),
    ``/fleet`` too, and no later backup was recorded (an UPDATE of no
    row). The page says the record is missing; the next backup writes it again."""
    db = open_hub_db(hub.home / "hub.sqlite")
    try:
        with db.transaction() as conn:
            conn.execute("DELETE FROM hub_backup")
    finally:
        db.close()
    hub.start()
    with _viewer(hub) as viewer:
        scrape = viewer.get("/metrics")
        assert scrape.status_code == 200
        assert _gauge(scrape.text, "pas_fleet_sites") == 0
        assert _gauge(scrape.text, "pas_hub_backup_age_seconds") is None
        page = viewer.get("/fleet")
        assert page.status_code == 200
        assert ("<p id=hub-backup><span class=warn>hub backup: unknown (no record in "
                "hub.sqlite: the next pas hub backup writes it)</span></p>") in page.text

        made = _backup_into(hub, tmp_path / "backups")
        record = _record(hub)
        assert record["folder"] == str(made) and record["since"] == record["written_at"]
        assert _gauge(viewer.get("/metrics").text, "pas_hub_backup_age_seconds") < 60  # type: ignore[operator]
