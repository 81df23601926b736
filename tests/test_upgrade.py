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
from tests.support.old_schema import record_before_18, record_before_28
from tests.support.peers import PasProcess


def test_a_version_1_database_is_migrated_with_nothing_lost(tmp_path: Path) -> None:
    home = tmp_path / "pas"
    old = Database(home / "pas.sqlite", migrations=MIGRATIONS[:1])  # the first release
    ids = []
    for n in range(5):
        record = InstanceRecord(f"1.2.9.{n}", "1.2.840.10008.5.1.4.1.1.2",
                                "1.2.840.10008.1.2.1", "1.2.9", "1.2.9.100", patient_id="P1",
                                patient_name="DOE^JANE", modality="CT")
        ids.append(record_before_18(old, record, StoredFile(f"aa/{n}.dcm", 100,
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
        record_before_18(old, record, StoredFile(f"aa/{n}.dcm", 100, f"{n:064d}"))
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
    record_before_18(old, record, StoredFile("aa/1.dcm", 100, f"{1:064d}"))
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


IMAGE_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "NumberOfFrames")
IMAGE_COLUMNS = ("image_rows", "image_columns", "bits_allocated", "number_of_frames")


def test_a_version_17_index_keeps_every_row_and_the_backfill_reads_their_headers(
        tmp_path: Path) -> None:
    """Migration 18 adds Rows, Columns, BitsAllocated and NumberOfFrames to the instances:
    every row of a version-17 index is kept as it was, with those NULL; the header backfill
    then reads each row's file (real CT and MR, multi-frame explicit and implicit VR,
    deflated, a structured report), a batch at a time, and a restart goes on after the last
    batch written. A missing file leaves its row without them; a row filed after the upgrade
    has them from ingest and is not read again."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from appliance.ingest.reading import read_record
    from appliance.ops.backfill import HeaderBackfill
    from appliance.store import header_backfill
    from appliance.store.spool import Spool
    from tests.support.peers import CT_DIR, MR_DIR

    path = tmp_path / "pas.sqlite"
    spool = Spool(tmp_path / "spool", fsync=False)
    files = [*sorted(CT_DIR.glob("*.dcm"))[:2], *sorted(MR_DIR.glob("*.dcm"))[:2],
             *(Path(get_testdata_file(name)) for name in (  # type: ignore[arg-type]
                 "emri_small.dcm", "rtdose.dcm", "image_dfl.dcm", "test-SR.dcm",
                 "MR_small_implicit.dcm", "CT_small.dcm"))]
    old = Database(path, migrations=MIGRATIONS[:17])
    expected: dict[str, tuple[int | None, ...]] = {}
    for file in files:
        data = file.read_bytes()
        stored, _ = spool.write([data])
        outcome = record_before_18(old, read_record(data), stored, calling_ae="CT1")
        ds = dcmread(file, stop_before_pixels=True)
        expected[stored.path] = tuple(None if ds.get(k) in (None, "") else int(ds.get(k))
                                      for k in IMAGE_KEYWORDS)
    (spool.path(stored.path)).unlink()  # the last file went missing (CT_small)
    expected[stored.path] = (None, None, None, None)
    before = [dict(row) for row in old.query("SELECT * FROM instances ORDER BY id")]
    counts = {table: old.query_one(f"SELECT count(*) AS n FROM {table}")["n"]
              for table in ("patients", "studies", "series", "audit")}
    assert len(before) == len(files) == outcome.instance_id
    old.close()

    new = Database(path)
    assert new.schema_version() == len(MIGRATIONS) >= 18
    after = [dict(row) for row in new.query("SELECT * FROM instances ORDER BY id")]
    assert [{k: row[k] for k in before[0]} for row in after] == before  # every row, as it was
    assert all(row[column] is None for row in after for column in IMAGE_COLUMNS)
    assert counts == {table: new.query_one(f"SELECT count(*) AS n FROM {table}")["n"]
                      for table in counts}
    assert header_backfill.progress(new) == header_backfill.Progress(0, len(files), False)
    # Filed after the upgrade (a new version of the Enhanced MR, big endian: pydicom's
    # path): its values come from ingest, and the backfill never reads it.
    later = Path(get_testdata_file("emri_small_big_endian.dcm"))  # type: ignore[arg-type]
    data = later.read_bytes()
    stored, _ = spool.write([data])
    index.record_instance(new, read_record(data), stored)
    expected[stored.path] = (64, 64, 16, 10)

    first = HeaderBackfill(new, spool, batch=4, pause_s=0)
    assert first.step() == 4
    assert header_backfill.progress(new).after_id == 4
    new.close()
    new = Database(path)  # a restart: it goes on after the rows written
    backfill = HeaderBackfill(new, spool, batch=4, pause_s=0)
    steps = []
    while step := backfill.step():
        steps.append(step)
    assert steps == [4, 2]  # the rows up to the upgrade's last, never the later one
    assert (backfill.read, backfill.unreadable) == (5, 1)  # the missing file
    assert header_backfill.progress(new).finished and backfill.step() == 0
    filled = {row["path"]: tuple(row[column] for column in IMAGE_COLUMNS)
              for row in new.query("SELECT * FROM instances")}
    assert filled == expected
    new.close()


def test_the_daemon_backfills_an_upgraded_index_and_qido_then_gives_the_frames(
        tmp_path: Path) -> None:
    """``pas run`` on a home whose index is of version 17: it serves at once, the backfill
    runs in the background, and an instance search then gives the multi-frame instance's
    NumberOfFrames (until the backfill has read its file, the attribute is left out)."""
    import httpx
    from pydicom.data import get_testdata_file

    from appliance.ingest.reading import read_record
    from appliance.store.spool import Spool
    from tests.support.peers import wait_for

    home = tmp_path / "pas"
    old = Database(home / "pas.sqlite", migrations=MIGRATIONS[:17])
    spool = Spool(home / "spool")
    data = Path(get_testdata_file("emri_small.dcm")).read_bytes()  # type: ignore[arg-type]
    stored, _ = spool.write([data])
    record = read_record(data)
    record_before_18(old, record, stored)
    old.close()
    pas = PasProcess(home, {"PAS_PREFETCH__ENABLED": "false"}).start()
    try:
        url = (f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{record.study_uid}"
               "/instances")

        def frames() -> object:
            [item] = httpx.get(url, timeout=10).json()
            return item.get("00280008")

        wait_for(lambda: frames() is not None, 10, what="the backfill")
        assert frames() == {"vr": "IS", "Value": [10]}
        # The batch's rows are written, then the backfill pauses before the step that finds
        # nothing left and says so: the frames can be seen before the line is written (a CI
        # run asserted in that pause).
        wait_for(lambda: "header backfill finished: 1 instance read" in pas.log(), 10,
                 what="the backfill's last line")
    finally:
        pas.stop()


def test_the_hub_backfills_its_embedded_archive_after_the_upgrade(tmp_path: Path) -> None:
    """The hub's embedded archive keeps the appliance's index (schema 18 too): its instances
    archived before the upgrade get the image attributes from the same backfill, for the
    region's QIDO-RS (they stayed NULL: no backfill ran on the hub)."""
    from pydicom.data import get_testdata_file

    from appliance.ingest.reading import read_record
    from appliance.store.spool import Spool
    from tests.support.hub import HubProcess
    from tests.support.peers import read_rows, wait_for

    hub = HubProcess(tmp_path / "hub").init()
    archive = hub.home / "archive"
    old = Database(archive / "pas.sqlite", migrations=MIGRATIONS[:17])
    data = Path(get_testdata_file("rtdose.dcm")).read_bytes()  # type: ignore[arg-type]
    stored, _ = Spool(archive / "spool").write([data])
    record_before_18(old, read_record(data), stored, origin="regional", source_address="SITE1")
    old.close()
    hub.start()
    try:
        def values() -> tuple[object, ...]:
            [row] = read_rows(archive / "pas.sqlite", "SELECT image_rows, image_columns, "
                              "bits_allocated, number_of_frames FROM instances")
            return tuple(row)

        wait_for(lambda: values() != (None, None, None, None), 10, what="the hub's backfill")
        assert values() == (10, 10, 32, 15)
    finally:
        hub.stop()


def test_instances_routed_nowhere_before_the_upgrade_wait_for_the_hub(tmp_path: Path) -> None:
    """Migration 22: an appliance of the version before, not enrolled, marked the instances
    no rule sent anywhere routed, with no job: enrolled later, it never sent them. The
    migration files them for the hub; those routed to a destination, confirmed, superseded
    or a prior's are left as they were."""
    path = tmp_path / "pas.sqlite"
    old = Database(path, migrations=MIGRATIONS[:21])

    def filed(n: int, study: str) -> int:
        record = InstanceRecord(f"1.2.9.{n}", "1.2.840.10008.5.1.4.1.1.2",
                                "1.2.840.10008.1.2.1", study, f"{study}.1", patient_id="P1",
                                modality="CT")
        return record_before_28(old, record, StoredFile(f"aa/{n}.dcm", 100,
                                                        f"{n:064d}")).instance_id

    nowhere = [filed(n, "1.2.9.100") for n in range(3)]   # routed, no job: waits for the hub
    to_pacs = [filed(n, "1.2.9.200") for n in range(3, 5)]  # routed to a local PACS
    confirmed = filed(5, "1.2.9.300")                     # routed nowhere, confirmed since
    prior = filed(6, "1.2.9.400")                         # a prior fetched from the region
    unrouted = filed(7, "1.2.9.500")                      # not routed yet: routing's own
    job_store.route_study(old, 1, nowhere, [])
    job_store.route_study(old, 2, to_pacs, [job_store.NewJob("dicom", "pacs", 2, "r", to_pacs)])
    job_store.route_study(old, 3, [confirmed], [])
    job_store.route_study(old, 4, [prior], [])
    job_store.confirm_instances(old, [("1.2.9.5", f"{5:064d}")])
    with old.transaction() as conn:
        conn.execute("UPDATE studies SET origin = 'regional' WHERE study_uid = '1.2.9.400'")
    assert old.query_one("SELECT count(*) AS n FROM sqlite_master "
                         "WHERE name = 'awaiting_hub'")["n"] == 0
    old.close()
    new = Database(path)
    assert [r["instance_fk"] for r in new.query(
        "SELECT instance_fk FROM awaiting_hub ORDER BY instance_fk")] == nowhere
    assert unrouted not in nowhere
    from appliance.store import awaiting_hub

    assert awaiting_hub.waiting(new) == (3, 1)
    assert awaiting_hub.release(new) == (3, 1)
    assert [r["id"] for r in new.query(
        "SELECT id FROM instances WHERE routed_at IS NULL ORDER BY id")] == [*nowhere, unrouted]
    assert awaiting_hub.waiting(new) == (0, 0) and awaiting_hub.release(new) == (0, 0)
    new.close()
