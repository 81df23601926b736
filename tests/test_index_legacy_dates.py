"""Dates and times in the legacy forms PS3.5 6.2 asks a reader to accept (DA yyyy.mm.dd, TM
hh:mm:ss.frac) are indexed as yyyymmdd and hhmmss.frac, by both ingest paths and, for rows
filed before, by the schema migration; the stored file keeps its bytes.

Found in review (s38): StudyDate 2020.01.15 and StudyTime 10:30:00 were indexed as received
and missed by every date query (StudyDate=20200115, 20200101-20200131, 20200101-,
StudyTime=103000), which compare yyyymmdd and hhmmss.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from pydicom import dcmread

from appliance.ingest.attributes import instance_record, record_from_raw
from appliance.ingest.header import read_header
from appliance.store import index, query
from appliance.store.db import Database
from appliance.store.index import StoredFile
from appliance.store.schema import MIGRATIONS
from tests.support.objects import tiny_ct
from tests.support.peers import read_rows, storescu

LEGACY = {"StudyDate": "2020.01.15", "StudyTime": "10:30:00.25",
          "PatientBirthDate": "1950.03.04"}
INDEXED = {"study_date": "20200115", "study_time": "103000.25", "birth_date": "19500304"}
# Each key a viewer might send, and whether the study must be among its matches.
QUERIES = [("StudyDate", "20200115"), ("StudyDate", "20200101-20200131"),
           ("StudyDate", "20200101-"), ("StudyDate", "-20200115"),
           ("StudyTime", "103000"), ("StudyTime", "1000-1100"), ("StudyTime", "1030-"),
           ("PatientBirthDate", "19500304"), ("PatientBirthDate", "19500101-19501231")]

# pydicom warns when these values are written; writing them is the point.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")


def _legacy_file(tmp_path: Path) -> Path:
    path = tmp_path / "legacy.dcm"
    tiny_ct(PatientID="OLDDATES", **LEGACY).save_as(path, enforce_file_format=True)
    return path


def _dataset_bytes(content: bytes) -> bytes:
    """The dataset after a Part 10 file's preamble and file meta (explicit VR LE)."""
    return content[144 + int.from_bytes(content[140:144], "little"):]


def test_both_ingest_paths_index_legacy_dates_in_the_form_queries_match(
        tmp_path: Path) -> None:
    """record_from_raw (the raw-header path) and instance_record (pydicom's) agree, and a
    query by date, date range, time range or birth date finds the study. Before: the values
    were indexed as received and only StudyTime=1000-1100 matched (as text)."""
    path = _legacy_file(tmp_path)
    ds = dcmread(path)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    header = read_header(_dataset_bytes(path.read_bytes()), implicit_vr=False,
                         little_endian=True)
    assert header is not None
    records = [instance_record(ds, syntax), record_from_raw(header.dataset, syntax)]
    for record in records:
        assert {name: getattr(record, name) for name in INDEXED} == INDEXED
    db = Database(tmp_path / "pas.sqlite")
    index.record_instance(db, records[1], StoredFile("ab/legacy.dcm", 100, "ab" * 32))
    for keyword, value in QUERIES:
        found = [r["StudyInstanceUID"] for r in query.find(
            db, "STUDY", {keyword: value, "StudyInstanceUID": ""})]
        assert found == [ds.StudyInstanceUID], (keyword, value)


@pytest.mark.parametrize(("value", "indexed"), [
    ("20200115", "20200115"), ("2020.1.15", "2020.1.15"), ("2020-01-15", "2020-01-15"),
])
def test_only_the_legacy_date_form_is_rewritten(value: str, indexed: str) -> None:
    """Anything not exactly yyyy.mm.dd is indexed as read (a query names it as invalid or
    misses it, as before): the rewrite never guesses."""
    ds = tiny_ct(StudyDate=value)
    assert instance_record(ds, "1.2.840.10008.1.2.1").study_date == indexed


def test_a_c_store_with_legacy_dates_is_indexed_normalised_and_stored_bit_exact(
        pas_factory, tmp_path: Path) -> None:
    """Through the daemon (storescu, the default receive path): the index holds the
    normalised values, the spool file the bytes sent."""
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false"})
    path = _legacy_file(tmp_path)
    storescu([path], pas.port)
    rows = read_rows(pas.home / "pas.sqlite",
                     "SELECT s.study_date, s.study_time, p.birth_date, i.path FROM instances i "
                     "JOIN studies s ON s.id = i.study_fk JOIN patients p ON p.id = s.patient_fk")
    assert len(rows) == 1
    row = rows[0]
    assert (row["study_date"], row["study_time"], row["birth_date"]) == (
        INDEXED["study_date"], INDEXED["study_time"], INDEXED["birth_date"])
    stored = (pas.home / "spool" / row["path"]).read_bytes()
    sent = _dataset_bytes(path.read_bytes())
    assert hashlib.sha256(_dataset_bytes(stored)).digest() == hashlib.sha256(sent).digest()
    assert b"2020.01.15" in stored and b"10:30:00.25" in stored


def test_the_migration_rewrites_legacy_dates_filed_before(tmp_path: Path) -> None:
    """Rows an earlier version filed as received are rewritten by the migration that adds
    job_instances(instance_fk); every other value is left as it was."""
    number = next(n for n, script in enumerate(MIGRATIONS)
                  if "job_instances_instance" in script)
    path = tmp_path / "pas.sqlite"
    Database(path, MIGRATIONS[:number]).close()
    rows = [  # (birth date, study date, study time) -> as after the migration
        (("1950.03.04", "2020.01.15", "10:30:00.25"), ("19500304", "20200115", "103000.25")),
        (("19500304", "20200115", "103000"), ("19500304", "20200115", "103000")),
        ((None, None, None), (None, None, None)),
        (("1950.3.4", "2020.01.1", "10:30"), ("1950.3.4", "2020.01.1", "1030")),
        (("", "", "10:30:00"), ("", "", "103000")),
        (("x", "2020/01/15", "10:30:00.1234567"), ("x", "2020/01/15", "10:30:00.1234567")),
        (("1950.03.04 ", "2020.01.15.", "10:30:0a"), ("1950.03.04 ", "2020.01.15.", "10:30:0a")),
    ]
    conn = sqlite3.connect(path)
    with conn:
        for n, ((birth, date, time), _) in enumerate(rows, 1):
            conn.execute("INSERT INTO patients (id, patient_id, birth_date) VALUES (?, ?, ?)",
                         (n, f"P{n}", birth))
            conn.execute("INSERT INTO studies (id, study_uid, patient_fk, study_date, "
                         "study_time, first_received_at, last_received_at) "
                         "VALUES (?, ?, ?, ?, ?, 0, 0)", (n, f"1.{n}", n, date, time))
    conn.close()
    db = Database(path)
    assert db.schema_version() == len(MIGRATIONS)
    after = db.query("SELECT p.birth_date, s.study_date, s.study_time FROM studies s "
                     "JOIN patients p ON p.id = s.patient_fk ORDER BY s.id")
    assert [tuple(row) for row in after] == [expected for _, expected in rows]
