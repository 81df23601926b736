"""Who a study belongs to in the index (appliance/store/index.py, schema migration 17).

Found in the DICOMweb review (2026-12-05): patients were unique on (PatientID, issuer), so
every study sent without a PatientID went under one patient row, which the newest such
instance renamed: FIRST^PATIENT (born 1950) and SECOND^PATIENT (born 1980), both sent
without an ID, were both listed as SECOND^PATIENT born 19800202, and a search for FIRST
found nothing. A radiologist could open the wrong patient's study under a name search.

Real PAS, DCMTK storescu as the modality, findscu and QIDO-RS as the viewers.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from pydicom.uid import generate_uid

from appliance.store import index
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, StoredFile
from appliance.store.schema import MIGRATIONS
from tests.support.objects import tiny_ct
from tests.support.old_schema import record_before_18
from tests.support.peers import PasProcess, read_rows
from tests.test_serving_qr_versions import findscu, send


def test_studies_without_a_patient_id_keep_each_their_own_patient(tmp_path: Path) -> None:
    first, second, third, fourth, known = (generate_uid() for _ in range(5))
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_PREFETCH__ENABLED": "false"}).start()
    try:
        send(tmp_path / "sent", pas, [
            tiny_ct(first, PatientID="", PatientName="FIRST^PATIENT",
                    PatientBirthDate="19500101", PatientSex="F"),
            tiny_ct(second, PatientID="", PatientName="SECOND^PATIENT",
                    PatientBirthDate="19800202", PatientSex="M"),
            # A later instance of the first study, still naming nobody: it stays where it is.
            tiny_ct(first, PatientID="", PatientName="FIRST^PATIENT"),
            # An issuer without a PatientID names nobody either (a modality set up with its
            # hospital's issuer, an emergency patient with no ID yet).
            tiny_ct(third, PatientID="", IssuerOfPatientID="HOSP-A",
                    PatientName="THIRD^PATIENT", PatientBirthDate="19600303"),
            tiny_ct(fourth, PatientID="", IssuerOfPatientID="HOSP-A",
                    PatientName="FOURTH^PATIENT", PatientBirthDate="19700404"),
            # Studies that name a patient still share it.
            tiny_ct(known, PatientID="P-77", PatientName="KNOWN^ONE"),
            tiny_ct(generate_uid(), PatientID="P-77", PatientName="KNOWN^ONE"),
        ])
        for name, uid, born in (("FIRST", first, "19500101"), ("SECOND", second, "19800202"),
                                ("THIRD", third, "19600303"), ("FOURTH", fourth, "19700404")):
            [answer] = findscu(pas, tmp_path / f"find-{name}", "-S", "STUDY",
                               [f"PatientName={name}*", "StudyInstanceUID",
                                "PatientBirthDate"])
            assert (answer.StudyInstanceUID, answer.PatientBirthDate) == (uid, born)
            found = httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies",
                              params={"PatientName": f"{name}*"}, timeout=10).json()
            assert [s["0020000D"]["Value"][0] for s in found] == [uid]
            assert found[0]["00100010"]["Value"][0]["Alphabetic"] == f"{name}^PATIENT"
        rows = read_rows(pas.home / "pas.sqlite",
                         "SELECT patient_id, count(*) AS n FROM patients GROUP BY patient_id "
                         "ORDER BY patient_id")
        assert [(r["patient_id"], r["n"]) for r in rows] == [("", 4), ("P-77", 1)]
    finally:
        pas.stop()


def test_the_upgrade_keeps_every_study_under_its_patient(tmp_path: Path) -> None:
    """Migration 17 rebuilds the patients table: every id kept, so every study keeps its
    patient, the foreign keys hold, and the name index is there again."""
    path = tmp_path / "pas.sqlite"
    old = Database(path, migrations=MIGRATIONS[:16])
    for n, (study, patient) in enumerate([("1.2.9.1", "P1"), ("1.2.9.2", "P2"),
                                          ("1.2.9.3", "")]):
        record = InstanceRecord(f"{study}.{n}", "1.2.840.10008.5.1.4.1.1.2",
                                "1.2.840.10008.1.2.1", study, f"{study}.100",
                                patient_id=patient, patient_name=f"DOE^{n}", modality="CT")
        record_before_18(old, record, StoredFile(f"aa/{n}.dcm", 100, f"{n:064d}"))
    before = [tuple(r) for r in old.query(
        "SELECT s.study_uid, p.id, p.patient_id, p.name FROM studies s "
        "JOIN patients p ON p.id = s.patient_fk ORDER BY s.study_uid")]
    old.close()
    new = Database(path)
    assert new.schema_version() == len(MIGRATIONS) >= 17
    after = [tuple(r) for r in new.query(
        "SELECT s.study_uid, p.id, p.patient_id, p.name FROM studies s "
        "JOIN patients p ON p.id = s.patient_fk ORDER BY s.study_uid")]
    assert after == before and len(after) == 3
    assert new.query("PRAGMA foreign_key_check") == []
    names = {r["name"] for r in new.query("PRAGMA index_list(patients)")}
    assert {"patients_key", "patients_name", "patients_name_separated"} <= names
    new.close()


def test_a_study_merged_before_the_upgrade_gets_its_own_patient_when_sent_again(
        tmp_path: Path) -> None:
    """Studies sent without a PatientID before migration 17 stay under their one shared
    row, which migration 17 says a re-send of one files afresh. It did not: the re-send
    renamed the shared row, so the other study was listed under the re-sent one's name
    (SECOND^PATIENT's study as FIRST^PATIENT's). The re-sent study now takes a row of its
    own and the other keeps the shared one, its name untouched."""
    path = tmp_path / "pas.sqlite"
    old = Database(path, migrations=MIGRATIONS[:16])

    def instance(study: str, n: int, patient_id: str, name: str) -> None:
        record = InstanceRecord(f"{study}.{n}", "1.2.840.10008.5.1.4.1.1.2",
                                "1.2.840.10008.1.2.1", study, f"{study}.100",
                                patient_id=patient_id, patient_name=name, modality="CT")
        if db.schema_version() < 18:
            record_before_18(db, record, StoredFile(f"aa/{n}.dcm", 100, f"{n:064d}"))
        else:
            index.record_instance(db, record, StoredFile(f"aa/{n}.dcm", 100, f"{n:064d}"))

    db = old
    instance("1.2.9.1", 1, "", "FIRST^PATIENT")
    instance("1.2.9.2", 2, "TMP", "SECOND^PATIENT")
    with old.transaction() as conn:  # as schema 16 filed it: one row, the newest's name
        conn.execute("UPDATE patients SET name = 'SECOND^PATIENT' WHERE patient_id = ''")
        conn.execute("UPDATE studies SET patient_fk = (SELECT id FROM patients "
                     "WHERE patient_id = '') WHERE study_uid = '1.2.9.2'")
        conn.execute("DELETE FROM patients WHERE patient_id = 'TMP'")
    old.close()
    db = Database(path)
    instance("1.2.9.1", 3, "", "FIRST^PATIENT")  # the first study sent again
    rows = db.query("SELECT s.study_uid, p.name FROM studies s "
                    "JOIN patients p ON p.id = s.patient_fk ORDER BY s.study_uid")
    assert [tuple(r) for r in rows] == [("1.2.9.1", "FIRST^PATIENT"),
                                        ("1.2.9.2", "SECOND^PATIENT")]
    assert db.query_one("SELECT count(*) AS n FROM audit WHERE event = 'refile'")["n"] == 0
    db.close()
