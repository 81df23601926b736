"""Filing an instance finds its patient through an index, however many patients are held
(appliance/store/index.py ``_upsert_patient``).

Found while timing the test suite (2026-12-05): schema migration 17 made ``patients_key``
partial (``WHERE patient_id != ''``), and the look-up of the patient row after its upsert
(``WHERE patient_id = ? AND issuer = ?``) could no longer use it: SQLite takes a partial index
only when the query's own WHERE implies the index's. Each instance a modality sent read every
patient row: filling an index of 30,000 studies (10,000 patients, bench/qr.py ``synthesize``,
which four test files use) cost 0.42 ms of CPU an instance, against 0.15 ms at 3,000.
What is counted here is SQLite's own work (its virtual machine's instructions, through a
progress handler), not time: it does not depend on the machine's load.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid

from appliance.store import index
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, StoredFile

PATIENTS = 20_000
# Filing one instance through the indexes costs a few hundred instructions (measured: 100 to
# 500); reading the 20,000 patient rows cost 60,000.
MOST_INSTRUCTIONS = 10_000


def _record(patient_id: str, name: str) -> InstanceRecord:
    study, series = generate_uid(), generate_uid()
    return InstanceRecord(
        sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", study_uid=study, series_uid=series,
        patient_id=patient_id, patient_name=name, birth_date="19600101", sex="F",
        study_date="20260101", study_time="101500", accession_number="ACC1",
        study_description="CT", series_number=1, modality="CT", instance_number=1)


def _instructions(db: Database, record: InstanceRecord) -> int:
    """How many SQLite instructions filing ``record`` ran (to the nearest hundred)."""
    conn = db.connection()
    steps = [0]

    def count() -> int:
        steps[0] += 100
        return 0  # go on

    conn.set_progress_handler(count, 100)
    try:
        index.record_instance(db, record, StoredFile(f"{record.sop_instance_uid}.dcm", 1,
                                                     "0" * 64))
    finally:
        conn.set_progress_handler(None, 0)
    return steps[0]


def _patient_of(db: Database, study_uid: str) -> tuple[str, str]:
    [row] = db.query("SELECT p.patient_id, p.name FROM studies s JOIN patients p "
                     "ON p.id = s.patient_fk WHERE s.study_uid = ?", (study_uid,))
    return row["patient_id"], row["name"]


def test_an_instance_finds_its_patient_among_many_through_the_index(tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    try:
        with db.transaction() as conn:
            conn.executemany(
                "INSERT INTO patients (patient_id, issuer, name) VALUES (?, '', ?)",
                ((f"P{n:07d}", f"PATIENT^{n}") for n in range(PATIENTS)))
        known = _record(f"P{PATIENTS // 2:07d}", f"PATIENT^{PATIENTS // 2}")
        spent = _instructions(db, known)
        assert spent < MOST_INSTRUCTIONS, spent
        assert _patient_of(db, known.study_uid) == (known.patient_id, known.patient_name)
        newcomer = _record("P-NEW", "NEW^PATIENT")
        spent = _instructions(db, newcomer)
        assert spent < MOST_INSTRUCTIONS, spent
        assert _patient_of(db, newcomer.study_uid) == ("P-NEW", "NEW^PATIENT")
        assert db.query("SELECT count(*) AS n FROM patients")[0]["n"] == PATIENTS + 1
    finally:
        db.close()
