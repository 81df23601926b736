"""The newest disk alert and the newest backup are found without reading the audit trail
(schema migration 19; appliance/store/cache.py ``health``, appliance/ops/backup.py
``last_backup``).

The status page, ``/api/status``, ``pas status``, ``pas doctor`` and the heartbeat ask both
on every refresh. Before the migration each look-up read the trail backwards until it met
such a row: all of it on an appliance that never had an alert (0.2 s for 2 million rows,
measured). What is counted here is SQLite's own work (its virtual machine's instructions,
through a progress handler), not time: it does not depend on the machine's load.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from appliance.ops.backup import AUDIT_DETAIL, last_backup
from appliance.store import audit
from appliance.store.cache import health
from appliance.store.db import Database
from appliance.store.schema import MIGRATIONS

ROWS = 100_000
# A look-up through an index costs a few hundred instructions; reading 100 000 rows costs
# millions.
MOST_INSTRUCTIONS = 20_000


def _fill(db: Database, rows: int, first_at: float) -> None:
    """``rows`` store and query rows, as a busy day of associations writes them."""
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO audit (at, event, actor, source, target, outcome, detail) "
            "VALUES (?, ?, 'CT1', '10.0.0.5', '1.2.826.0.1.3680043.8.498.1', 'success', "
            "'5 instances')",
            ((first_at + n, "store" if n % 3 else "query") for n in range(rows)))


def _disk_alert_raised(db: Database, percent: int) -> None:
    """A disk alert raised (outcome failure), as the cache policy records one: its detail is
    what ``health`` returns while the alert lasts."""
    audit.record(db, "alert", actor="system", outcome=f"failure: disk {percent} % full",
                 detail=f"spool at {percent} %, above 90 %")


def _disk_alert_ended(db: Database) -> None:
    """The alert cleared: the newest alert row's outcome is success."""
    audit.record(db, "alert", actor="system", outcome="success",
                 detail="spool at 70 %, below 85 %")


def _backup_recorded(db: Database, folder: str, instances: int) -> None:
    """A backup's export row (``last_backup`` knows it by its detail) for a backup into
    ``/var/backups/pas/<folder>``."""
    audit.record(db, "export", actor="root", target=f"/var/backups/pas/{folder}",
                 detail=AUDIT_DETAIL + f"the index ({instances} instances)")


def _instructions(db: Database, look_up) -> tuple[int, object]:  # type: ignore[no-untyped-def]
    """How many SQLite instructions ``look_up(db)`` ran (to the nearest hundred), and what
    it returned."""
    conn = db.connection()
    steps = [0]

    def count() -> int:
        steps[0] += 100
        return 0  # go on

    conn.set_progress_handler(count, 100)
    try:
        found = look_up(db)
    finally:
        conn.set_progress_handler(None, 0)
    return steps[0], found


def test_no_alert_and_no_backup_are_known_without_reading_the_trail(tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    try:
        _fill(db, ROWS, 1_000.0)
        spent, found = _instructions(db, health)
        assert found == {"integrity_issues": {}, "disk_alert": None, "disk_alert_since": None}
        assert spent < MOST_INSTRUCTIONS, spent
        spent, found = _instructions(db, last_backup)
        assert found is None
        assert spent < MOST_INSTRUCTIONS, spent
    finally:
        db.close()


def test_the_newest_alert_and_backup_are_found_under_a_day_of_rows(tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    try:
        _backup_recorded(db, "pas-backup-old", 3)
        _disk_alert_raised(db, 91)
        _fill(db, ROWS, 2_000.0)
        # Another export (not a backup: its detail says otherwise), then the newest backup.
        audit.record(db, "export", actor="root", target="/tmp/study.zip",
                     detail="study 1.2.3 written to a folder")
        _backup_recorded(db, "pas-backup-new", 5)
        _fill(db, ROWS // 10, 3_000_000.0)

        spent, found = _instructions(db, health)
        assert found["disk_alert"] == "spool at 91 %, above 90 %"  # type: ignore[index]
        assert spent < MOST_INSTRUCTIONS, spent
        spent, found = _instructions(db, last_backup)
        assert found is not None and found[1] == Path("/var/backups/pas/pas-backup-new")
        assert spent < MOST_INSTRUCTIONS, spent

        # The alert ends: the newest alert row says so, and the page shows none.
        _disk_alert_ended(db)
        assert health(db)["disk_alert"] is None
    finally:
        db.close()


def test_the_upgrade_adds_the_indexes_to_a_trail_written_before(tmp_path: Path) -> None:
    """An index at schema 18 with its trail: migration 19 indexes the rows already there."""
    path = tmp_path / "pas.sqlite"
    db = Database(path)
    _disk_alert_raised(db, 95)
    _fill(db, ROWS, 1_000.0)
    db.close()
    conn = sqlite3.connect(path)
    conn.executescript("DROP INDEX audit_alerts; DROP INDEX audit_exports; "
                       "DROP TABLE study_readers; DROP INDEX audit_deletes; "
                       "DROP TABLE restored_backups; DROP TABLE awaiting_hub; "
                       "DROP INDEX integrity_issues_settled_evictions; "
                       "DROP TRIGGER instances_leave_awaiting_hub; "
                       "DROP INDEX prefetch_requests_finished; "  # 25
                       "DROP INDEX prefetch_messages_request; "
                       "DROP INDEX prefetch_messages_received; "
                       "DROP INDEX job_instances_instance; "  # 27
                       "DROP INDEX studies_patient_name; "  # 28
                       "DROP INDEX studies_patient_name_separated; "
                       "DROP INDEX studies_patient_name_folding; "
                       "ALTER TABLE studies DROP COLUMN patient_name; "
                       "ALTER TABLE studies DROP COLUMN patient_birth_date; "
                       "ALTER TABLE studies DROP COLUMN patient_sex; "
                       "ALTER TABLE studies DROP COLUMN patient_values_provisional; "  # 29
                       "ALTER TABLE audit DROP COLUMN chain; "  # 30
                       "PRAGMA user_version = 18;")
    conn.close()

    db = Database(path)
    try:
        assert db.schema_version() == len(MIGRATIONS)
        spent, found = _instructions(db, health)
        assert found["disk_alert"] == "spool at 95 %, above 90 %"  # type: ignore[index]
        assert spent < MOST_INSTRUCTIONS, spent
    finally:
        db.close()


def test_pas_audit_of_one_event_reads_its_index_not_the_trail(tmp_path: Path) -> None:
    """``pas audit --event alert`` (or ``export``): the filter was ``event IN (?)``, which
    SQLite does not match against a partial index's ``WHERE event = 'alert'``: the rows and
    their count each read the whole trail (0.34 s for 2 million rows) beside an index of the
    few rows asked for."""
    db = Database(tmp_path / "pas.sqlite")
    try:
        _disk_alert_raised(db, 91)
        _fill(db, ROWS, 1_000.0)
        _disk_alert_ended(db)
        _backup_recorded(db, "pas-backup-1", 5)

        spent, found = _instructions(
            db, lambda d: audit.search(d, audit.AuditFilter(events=("alert",)), 50))
        rows, matched = found  # type: ignore[misc]
        assert [r["detail"] for r in rows] == ["spool at 70 %, below 85 %",
                                               "spool at 91 %, above 90 %"]
        assert matched == 2
        assert spent < MOST_INSTRUCTIONS, spent
        spent, found = _instructions(
            db, lambda d: audit.search(d, audit.AuditFilter(events=("export",)), 50))
        assert [r["target"] for r in found[0]] == ["/var/backups/pas/pas-backup-1"]  # type: ignore[index]
        assert spent < MOST_INSTRUCTIONS, spent
        # Two events (no one partial index holds both): the same rows as before.
        rows, matched = audit.search(db, audit.AuditFilter(events=("alert", "export")), 50)
        assert [r["event"] for r in rows] == ["export", "alert", "alert"] and matched == 3
    finally:
        db.close()
