"""Upgrades: an old database, the new version, migrations run, nothing lost."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.store import index
from appliance.store import jobs as job_store
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, StoredFile
from appliance.store.schema import MIGRATIONS
from tests.support.peers import PasProcess


def test_a_version_1_database_is_migrated_with_nothing_lost(tmp_path: Path) -> None:
    home = tmp_path / "pas"
    old = Database(home / "pas.sqlite", migrations=MIGRATIONS[:1])  # the first release
    ids = []
    for n in range(5):
        record = InstanceRecord(f"1.2.9.{n}", "1.2.840.10008.5.1.4.1.1.2",
                                "1.2.840.10008.1.2.1", "1.2.9", "1.2.9.100", patient_id="P1",
                                patient_name="DOE^JANE", modality="CT")
        ids.append(index.record_instance(old, record, StoredFile(f"aa/{n}.dcm", 100,
                                                                 f"{n:064d}")).instance_id)
    job_store.route_study(old, 1, ids, [job_store.NewJob("dicom", "pacs", 0, "r", ids)])
    job_store.confirm_instances(old, [("1.2.9.0", f"{0:064d}")])
    # What the first release's totals read: sums over the rows (the new version reads a row
    # its triggers keep, which the migration must start from these very sums).
    before = dict(old.query_one(
        """SELECT (SELECT count(*) FROM studies) AS studies,
                  (SELECT count(*) FROM patients) AS patients,
                  coalesce(sum(is_current), 0) AS instances, coalesce(sum(size), 0) AS bytes,
                  coalesce(sum(confirmed_at IS NOT NULL AND is_current = 1), 0)
                      AS confirmed_instances
           FROM instances"""))
    assert before["instances"] == 5 and before["confirmed_instances"] == 1
    old.close()
    assert len(MIGRATIONS) > 1, "nothing to migrate: this test needs a later migration"

    pas = PasProcess(home, {"PAS_HTTP__ENABLED": "false"})
    # pas status only reads: it says the schema is old and leaves it to pas run.
    old_schema = pas.cli("status", check=False)
    assert old_schema.returncode == 1 and "is older than this software's" in old_schema.stderr
    Database(home / "pas.sqlite").close()  # what pas run does first: migrations run
    status = pas.status()
    new = Database(home / "pas.sqlite")
    assert new.schema_version() == len(MIGRATIONS)
    for key in ("instances", "studies", "patients", "bytes", "confirmed_instances"):
        assert status[key] == before[key], key
    assert status["jobs"] == {"pending": 1}
    # The metric counters (migration 7) start from what the rows held, not from zero.
    from appliance.store import ops as ops_store

    assert ops_store.received_by_calling_ae(new) == [
        {"calling_ae": "", "instances": 5, "bytes": before["bytes"]}]
    assert [r["sop_instance_uid"] for r in job_store.job_files(new, 1)] == [
        f"1.2.9.{n}" for n in range(5)]
    new.close()


def test_the_upgrade_forgets_patients_left_without_a_study(tmp_path: Path) -> None:
    """Earlier versions kept a patient's row after its last study was evicted or purged."""
    path = tmp_path / "pas.sqlite"
    old = Database(path, migrations=MIGRATIONS[:11])
    for n, patient in enumerate(("KEPT", "EVICTED")):
        record = InstanceRecord(f"1.2.9.{n}", "1.2.840.10008.5.1.4.1.1.2",
                                "1.2.840.10008.1.2.1", f"1.2.9.{n}.1", f"1.2.9.{n}.2",
                                patient_id=patient, patient_name=f"{patient}^X")
        index.record_instance(old, record, StoredFile(f"aa/{n}.dcm", 100, f"{n:064d}"))
    with old.transaction() as conn:  # what the old eviction left: the patient row alone
        conn.execute("DELETE FROM instances WHERE sop_instance_uid = '1.2.9.1'")
        conn.execute("DELETE FROM series WHERE series_uid = '1.2.9.1.2'")
        conn.execute("DELETE FROM studies WHERE study_uid = '1.2.9.1.1'")
    old.close()
    new = Database(path)
    assert [r["patient_id"] for r in new.query("SELECT patient_id FROM patients")] == ["KEPT"]
    new.close()


def test_an_older_version_refuses_a_newer_database(tmp_path: Path) -> None:
    path = tmp_path / "pas.sqlite"
    Database(path).close()
    with pytest.raises(RuntimeError, match="newer than this software knows"):
        Database(path, migrations=MIGRATIONS[:1])
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()


def test_an_order_stored_before_procedures_were_told_apart_keeps_its_request(
        tmp_path: Path) -> None:
    """Migration 15: requests are found by order and requested procedure. An order stored
    before (its procedure not recorded) is still the same order after the upgrade: its
    message resent is recognised, the order sent again with its CT chest and an MR knee
    counts its request once more and adds the MR's, and a cancel of the MR leaves the CT."""
    import time

    from appliance.prefetch import orders

    path = tmp_path / "pas.sqlite"
    old = Database(path, migrations=MIGRATIONS[:14])
    with old.transaction() as conn:  # what the version before wrote for a one-order ORM
        conn.execute(
            "INSERT INTO prefetch_requests (id, dedup_key, trigger, patient_id, issuer, "
            "accession_number, modality, due_at, next_attempt_at, created_at, updated_at) "
            "VALUES (1, 'order:PU|HOSP|ORD-U', 'hl7', 'PU', 'HOSP', 'ACC-U', 'CT', 4e9, 4e9, "
            "1.0, 1.0)")
        for control in ("U0", "U1"):  # U0 named a CT and an MR of the order: one request
            conn.execute("INSERT INTO prefetch_messages VALUES (?, 1.0, 'OMI^O23', 1, 'AA', "
                         "NULL)", (f"RIS|HOSP|{control}",))
    old.close()
    new = Database(path)

    def omi(control: str, *groups: tuple[str, str, str]) -> str:
        segments = [f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261204120000||OMI^O23|{control}|P|2.5.1",
                    "PID|1||PU^^^HOSP^MR||DOE^JANE"]
        for control_code, requested, modality in groups:
            segments += [f"ORC|{control_code}|ORD-U|||SC", "TQ1|1||||||20991231120000",
                         "OBR|1|ORD-U||X", f"IPC|ACC-U|{requested}|1.2.3|S{requested}|"
                         f"{modality}"]
        return "\r".join(segments)

    def handle(message: str) -> str:
        ack, _ = orders.handle(new, message, "test", lambda at: time.time() + 3600)
        return ack.split("\r")[1]

    def rows() -> list[tuple[str, str, int]]:
        return [(r["modality"], r["state"], r["times_requested"]) for r in new.query(
            "SELECT * FROM prefetch_requests ORDER BY id")]

    # Resends of messages recorded before: recognised, nothing changed (a resend of the
    # two-procedure message was taken for a new one reusing the control id, and counted).
    for legacy in (omi("U0", ("NW", "RP1", "CT"), ("NW", "RP2", "MR")),
                   omi("U1", ("NW", "RP1", "CT"))):
        assert handle(legacy).endswith("|duplicate message: already processed"), legacy
    assert rows() == [("CT", "pending", 1)]
    assert handle(omi("U2", ("NW", "RP1", "CT"), ("NW", "RP2", "MR"))) == "MSA|AA|U2"
    assert rows() == [("CT", "pending", 2), ("MR", "pending", 1)]
    assert handle(omi("U3", ("CA", "RP2", "MR"))) == "MSA|AA|U3"
    assert rows() == [("CT", "pending", 2), ("MR", "cancelled", 1)]
    new.close()


def test_a_version_15_database_gets_the_commitment_table_and_answers_from_its_index(
        tmp_path: Path) -> None:
    """Migration 16 (Storage Commitment): an instance filed before the upgrade is committed
    after it; one the index never held is not (0x0112)."""
    from appliance.store import commitment

    path = tmp_path / "pas.sqlite"
    old = Database(path, migrations=MIGRATIONS[:15])
    record = InstanceRecord("1.2.9.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                            "1.2.9", "1.2.9.100", patient_id="P1")
    index.record_instance(old, record, StoredFile("aa/1.dcm", 100, f"{1:064d}"))
    with pytest.raises(sqlite3.OperationalError, match="no such table: commitment_requests"):
        old.query("SELECT * FROM commitment_requests")
    old.close()
    new = Database(path)
    assert new.schema_version() == len(MIGRATIONS) >= 16
    asked = [("1.2.840.10008.5.1.4.1.1.2", "1.2.9.1"), ("1.2.840.10008.5.1.4.1.1.2", "1.2.9.2")]
    answer, created = commitment.record_request(new, "1.2.9.77", "CT1", "10.0.0.5", asked,
                                                lambda relative: relative == "aa/1.dcm", 3600)
    assert created
    assert answer.committed == [asked[0]]
    assert answer.failed == [(*asked[1], commitment.NO_SUCH_OBJECT_INSTANCE)]
    again, created = commitment.record_request(new, "1.2.9.77", "CT1", "10.0.0.5", asked,
                                               lambda relative: True, 3600)
    assert not created and (again.id, again.committed, again.failed) == (
        answer.id, answer.committed, answer.failed)
    assert new.query_one("SELECT count(*) AS n FROM commitment_requests")["n"] == 1
    new.close()
