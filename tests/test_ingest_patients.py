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
from tests.support.peers import PasProcess, read_rows
from tests.test_serving_qr_versions import findscu, send


def test_studies_without_a_patient_id_keep_each_their_own_patient(tmp_path: Path) -> None:
    first, second, known = generate_uid(), generate_uid(), generate_uid()
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
            # Studies that name a patient still share it.
            tiny_ct(known, PatientID="P-77", PatientName="KNOWN^ONE"),
            tiny_ct(generate_uid(), PatientID="P-77", PatientName="KNOWN^ONE"),
        ])
        for name, uid, born in (("FIRST", first, "19500101"), ("SECOND", second, "19800202")):
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
        assert [(r["patient_id"], r["n"]) for r in rows] == [("", 2), ("P-77", 1)]
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
        index.record_instance(old, record, StoredFile(f"aa/{n}.dcm", 100, f"{n:064d}"))
    before = [tuple(r) for r in old.query(
        "SELECT s.study_uid, p.id, p.patient_id, p.name FROM studies s "
        "JOIN patients p ON p.id = s.patient_fk ORDER BY s.study_uid")]
    old.close()
    new = Database(path)
    assert new.schema_version() == len(MIGRATIONS) == 17
    after = [tuple(r) for r in new.query(
        "SELECT s.study_uid, p.id, p.patient_id, p.name FROM studies s "
        "JOIN patients p ON p.id = s.patient_fk ORDER BY s.study_uid")]
    assert after == before and len(after) == 3
    assert new.query("PRAGMA foreign_key_check") == []
    names = {r["name"] for r in new.query("PRAGMA index_list(patients)")}
    assert {"patients_key", "patients_name", "patients_name_separated"} <= names
    new.close()
