"""Look-ups by PatientID go through an index, however many patients are held: filing an
instance (appliance/store/index.py ``_upsert_patient``), C-FIND and QIDO-RS, C-MOVE, C-GET
and WADO-RS by PatientID (appliance/store/query.py, retrieve.py), ``pas studies --patient``
(index.py ``list_studies``), the priors an HL7 order finds on site (appliance/store/prefetch.py
``held_by_patient``) and ``pas audit --patient`` (appliance/store/audit.py).

Found while timing the test suite (2026-12-05): schema migration 17 made ``patients_key``
partial (``WHERE patient_id != ''``), and every query ``WHERE patient_id = ?`` could no longer
use it: SQLite takes a partial index only when the query's own WHERE implies the index's. Each
instance a modality sent read every patient row: filling an index of 30,000 studies (10,000
patients, bench/qr.py ``synthesize``, which four test files use) cost 0.42 ms of CPU an
instance, against 0.15 ms at 3,000. The other look-ups read every patient, every study or
every instance (20,000 of each: 60,000 to 640,000 SQLite instructions), and the audit search
every patient for each audit row (120,000 instructions a row).
What is counted here is SQLite's own work (its virtual machine's instructions, through a
progress handler), not time: it does not depend on the machine's load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from appliance.store import audit, index, prefetch, query, retrieve
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, StoredFile
from tests.support.sqlite_steps import counted

PATIENTS = 20_000
# Filing one instance through the indexes costs a few hundred instructions (measured: 100 to
# 500); reading the 20,000 patient rows cost 60,000. A look-up by PatientID through
# patients_key costs under 300 (most statements under 100).
MOST_INSTRUCTIONS = 10_000
AUDIT_ROWS = 200


def _record(patient_id: str, name: str, n: int | None = None) -> InstanceRecord:
    """One CT instance of a study of its own (UIDs from ``n`` if given: 2.25.1<n>.1/2/3)."""
    study, series, sop = ((generate_uid(), generate_uid(), generate_uid()) if n is None else
                          (f"2.25.1{n:09d}.1", f"2.25.1{n:09d}.2", f"2.25.1{n:09d}.3"))
    return InstanceRecord(
        sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", study_uid=study, series_uid=series,
        patient_id=patient_id, patient_name=name, birth_date="19600101", sex="F",
        study_date="20260101", study_time="101500", accession_number="ACC1",
        study_description="CT", series_number=1, modality="CT", instance_number=1)


def _counted(db: Database, look_up: Callable[[], Any]) -> tuple[int, Any]:
    """SQLite instructions in steps of a hundred (each statement rounded down): the
    look-ups before their fix ran millions."""
    return counted(db, look_up, every=100)


def _instructions(db: Database, record: InstanceRecord) -> int:
    """How many SQLite instructions filing ``record`` ran."""
    spent, _ = _counted(db, lambda: index.record_instance(
        db, record, StoredFile(f"{record.sop_instance_uid}.dcm", 1, "0" * 64)))
    return spent


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


# --- the look-ups by PatientID of a held index ---------------------------------------------

WANTED = PATIENTS // 2  # P0010000: study 2.25.1000010000.1
UNNAMED = PATIENTS      # the one study sent without a PatientID


def _study_uid(n: int) -> str:
    return f"2.25.1{n:09d}.1"


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """An index of 20,000 patients with one single-instance study each, one study sent
    without a PatientID, and an audit trail of ``AUDIT_ROWS`` store rows written before
    rows named their patient (schema migration 8), one of them about the wanted patient's
    study. Nothing here changes it."""
    db = Database(tmp_path_factory.mktemp("held") / "pas.sqlite")
    with db.transaction():  # one commit: record_instance joins it
        for n in range(PATIENTS):
            index.record_instance(db, _record(f"P{n:07d}", f"PATIENT^{n}", n),
                                  StoredFile(f"{n}.dcm", 1, "0" * 64))
        index.record_instance(db, _record("", "NOBODY^KNOWN", UNNAMED),
                              StoredFile("unnamed.dcm", 1, "0" * 64))
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO audit (at, event, actor, target, outcome) "
            "VALUES (?, 'store', 'CT1', ?, 'success')",
            ((float(k), _study_uid(k * 7)) for k in range(AUDIT_ROWS - 1)))
        conn.execute("INSERT INTO audit (at, event, actor, target, outcome) "
                     "VALUES (1e6, 'store', 'CT1', ?, 'success')", (_study_uid(WANTED),))
    yield db
    db.close()


@pytest.mark.parametrize("level", query.LEVELS)
def test_a_query_by_patient_id_reads_that_patient_only(held: Database, level: str) -> None:
    """C-FIND and QIDO-RS at each level (before: 60,000 instructions at PATIENT level,
    220,000 to 360,000 below it)."""
    keys = {"PatientID": f"P{WANTED:07d}", "StudyInstanceUID": "", "PatientName": ""}
    spent, found = _counted(held, lambda: list(query.find(held, level, keys)))
    assert spent < MOST_INSTRUCTIONS, spent
    assert [(r["PatientID"], r["PatientName"]) for r in found] == \
        [(f"P{WANTED:07d}", f"PATIENT^{WANTED}")]
    if level != "PATIENT":
        assert found[0]["StudyInstanceUID"] == _study_uid(WANTED)


def test_a_list_of_patient_ids_reads_those_patients_only(held: Database) -> None:
    """``P0010000\\P0000001`` (before: 340,000 instructions)."""
    spent, found = _counted(held, lambda: list(query.find(
        held, "STUDY", {"PatientID": "P0010000\\P0000001", "StudyInstanceUID": ""})))
    assert spent < MOST_INSTRUCTIONS, spent
    assert sorted(r["StudyInstanceUID"] for r in found) == [_study_uid(1), _study_uid(WANTED)]


def test_patient_id_keys_that_may_match_an_empty_id_keep_their_answers(held: Database) -> None:
    """Empty and ``*`` are universal matching (every patient, the unnamed one too),
    wildcards match as they did (still without patients_key: a prefix P00* taken over the
    name index read every patient here), and a list with an empty value matches the study
    sent without a PatientID, as before the look-ups used patients_key."""
    for universal in ("", "*", "**"):
        found = list(query.find(held, "PATIENT", {"PatientID": universal}))
        assert len(found) == PATIENTS + 1, universal
    found = list(query.find(held, "STUDY", {"PatientID": "P001000*", "StudyInstanceUID": ""}))
    assert sorted(r["StudyInstanceUID"] for r in found) == \
        [_study_uid(n) for n in range(10000, 10010)]
    spent, found = _counted(held, lambda: list(query.find(
        held, "STUDY", {"PatientID": "P00*", "PatientName": "PATIENT^1000*"})))
    assert spent < MOST_INSTRUCTIONS, spent  # the name index, not every P00 patient
    assert len(found) == 11
    found = list(query.find(held, "STUDY", {"PatientID": "P00100?0", "StudyInstanceUID": ""}))
    assert sorted(r["StudyInstanceUID"] for r in found) == \
        [_study_uid(n) for n in range(10000, 10100, 10)]
    found = list(query.find(held, "STUDY", {"PatientID": "P0010000\\", "StudyInstanceUID": ""}))
    assert sorted(r["StudyInstanceUID"] for r in found) == \
        [_study_uid(WANTED), _study_uid(UNNAMED)]
    assert [r["study_uid"] for r in index.list_studies(held, "")] == [_study_uid(UNNAMED)]


@pytest.mark.parametrize(("name", "case_sensitive"), [
    ("PATIENT^10000", False), ("patient^10000^^^", False), ("PATIENT^10000^^==", True),
    ("PATIENT^10000^*", False), ("PATIENT^10000^*", True)])
def test_a_person_name_is_found_through_the_name_index(
        held: Database, name: str, case_sensitive: bool) -> None:
    """Trailing empty components do not count (``PATIENT^10000^^^`` is ``PATIENT^10000``,
    tests/test_serving_person_names.py); the stored names are compared without theirs and
    the name index still bounds the look-up (a query's 0 to 100 instructions, as before; a
    scan of every name 200,000)."""
    spent, found = _counted(held, lambda: list(query.find(
        held, "STUDY", {"PatientName": name, "PatientID": ""},
        pn_case_sensitive=case_sensitive)))
    assert spent < MOST_INSTRUCTIONS, spent
    assert [r["PatientID"] for r in found] == [f"P{WANTED:07d}"]
    assert list(query.find(held, "STUDY", {"PatientName": "patient^10000"},
                           pn_case_sensitive=True)) == []


def test_a_retrieve_by_patient_id_reads_that_patient_only(held: Database) -> None:
    """C-MOVE, C-GET and WADO-RS of a patient (before: 640,000 instructions)."""
    spent, plan = _counted(held, lambda: retrieve.retrieve_plan(
        held, "PATIENT", {"PatientID": f"P{WANTED:07d}"}))
    assert spent < MOST_INSTRUCTIONS, spent
    assert plan.study_uids == [_study_uid(WANTED)]
    assert len(plan.instance_ids) == 1


def test_pas_studies_for_a_patient_reads_that_patient_only(held: Database) -> None:
    """``pas studies --patient`` (before: 120,100 instructions, every study newest first)."""
    spent, rows = _counted(held, lambda: index.list_studies(held, f"P{WANTED:07d}"))
    assert spent < MOST_INSTRUCTIONS, spent
    assert [(r["study_uid"], r["patient_id"], r["instances"]) for r in rows] == \
        [(_study_uid(WANTED), f"P{WANTED:07d}", 1)]


def test_the_priors_of_an_order_are_found_through_the_patient(held: Database) -> None:
    """The instances an HL7 order's patient already has on site (before: 180,000
    instructions, every current instance)."""
    spent, found = _counted(held, lambda: prefetch.held_by_patient(
        held, f"P{WANTED:07d}", 1000))
    assert spent < MOST_INSTRUCTIONS, spent
    assert found == {_study_uid(WANTED): [f"2.25.1{WANTED:09d}.3"]}


def test_pas_audit_for_a_patient_reads_each_row_once_not_every_patient(held: Database) -> None:
    """``pas audit --patient`` over rows without a patient recorded: each is kept if it
    names one of the patient's studies (before: 120,000 instructions a row, 24 million for
    these 200; now about 100 a row)."""
    spent, (rows, matched) = _counted(held, lambda: audit.search(
        held, audit.AuditFilter(patient=f"P{WANTED:07d}"), 100))
    assert spent < 500 * AUDIT_ROWS, spent
    assert matched == 1
    assert [r["target"] for r in rows] == [_study_uid(WANTED)]
