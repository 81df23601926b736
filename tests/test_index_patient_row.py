"""The patient row's name, birth date and sex are its newest study's (by StudyDate, then by
the study's first receipt) after any sequence of instances, on a real SQLite index.

Schema 28 made each study keep its own patient attributes; ``refresh_patient`` gives the
patient row its newest study's. It ran for every instance filed (six look-ups, +30-60 us of
each C-STORE's index write, bench/record_path.py); it now runs only when an instance changes
what its study says of the patient, its date, or its patient. These tests check the row
against the rule recomputed from the studies, so a skipped refresh that should have run
shows."""

from __future__ import annotations

import hashlib
from pathlib import Path

from appliance.store import index
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, StoredFile

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_1, STUDY_2 = "1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.102"


def _file(db: Database, sop: str, study: str, **attributes: object) -> None:
    record = InstanceRecord(**{  # type: ignore[arg-type]
        "sop_instance_uid": sop, "sop_class_uid": CT_IMAGE,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1", "study_uid": study,
        "series_uid": study + ".1", "patient_id": "P-1", "modality": "CT", **attributes})
    sha = hashlib.sha256(sop.encode()).hexdigest()
    index.record_instance(db, record, StoredFile(f"{sha[:2]}/{sha}.dcm", 100, sha))


def _row(db: Database) -> tuple[str | None, str | None, str | None]:
    row = db.query_one("SELECT name, birth_date, sex FROM patients WHERE patient_id = 'P-1'")
    assert row is not None
    return row["name"], row["birth_date"], row["sex"]


def test_the_row_follows_the_newest_study_whatever_the_order_of_instances(
        tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    _file(db, "1.1", STUDY_1, patient_name="OLD^NAME", birth_date="19700101", sex="F",
          study_date="20200101")
    assert _row(db) == ("OLD^NAME", "19700101", "F")
    _file(db, "2.1", STUDY_2, patient_name="NEW^NAME", study_date="20230101")
    assert _row(db) == ("NEW^NAME", "19700101", "F")  # the newer study has no birth date
    _file(db, "1.2", STUDY_1, patient_name="OLD^NAME", study_date="20200101")
    assert _row(db) == ("NEW^NAME", "19700101", "F")  # more of the older study: no change
    # A correction of the newer study's name, in an instance of it: the row follows.
    _file(db, "2.2", STUDY_2, patient_name="NEW^CORRECTED")
    assert _row(db) == ("NEW^CORRECTED", "19700101", "F")
    # The older study's date corrected to a later one makes it the newest.
    _file(db, "1.3", STUDY_1, study_date="20240101")
    assert _row(db) == ("OLD^NAME", "19700101", "F")


def test_same_date_studies_are_ordered_by_first_receipt_not_by_the_last_instance(
        tmp_path: Path) -> None:
    """Two studies of one date: the one first received later is the newest, and more
    instances of the other do not make it the newest (the last receipt moves with every
    instance; the row would flip with the order in which a modality sends series)."""
    db = Database(tmp_path / "pas.sqlite")
    _file(db, "1.1", STUDY_1, patient_name="FIRST^NAME", study_date="20230101")
    _file(db, "2.1", STUDY_2, patient_name="SECOND^NAME", study_date="20230101")
    assert _row(db) == ("SECOND^NAME", None, None)
    _file(db, "1.2", STUDY_1, patient_name="FIRST^NAME", study_date="20230101")
    assert _row(db) == ("SECOND^NAME", None, None)
