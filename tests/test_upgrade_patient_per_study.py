"""Migration 28 on an index of schema 27: each study gets patient attributes of its own.

Schema 27 kept one patients row per (PatientID, issuer), written by the last instance
received, and answered every study of the patient with it (review s40, finding 1): after A
(2020, "Müller^Hans"), F (2023, "Schmidt^Anna") and G (2015, "Müller^Hans", received last),
the row said "Müller^Hans" and F was listed so. The migration gives each study the row's
values at once (the best known without reading a file), then the header backfill reads the
files filed before and gives each study its own instances' values; a real ``pas run``
then answers F as "Schmidt^Anna" at every level and the PATIENT level with its newest
study's values.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.uid import generate_uid

from appliance.ingest.reading import read_record
from appliance.store import header_backfill
from appliance.store.db import Database
from appliance.store.schema import MIGRATIONS
from appliance.store.spool import Spool
from tests.support.objects import tiny_ct
from tests.support.old_schema import record_before_28
from tests.support.peers import DCMTK_ENV, PasProcess, read_rows, wait_for

STUDIES = [("A", "20200301", "Müller^Hans", "19800101", "M"),
           ("F", "20230301", "Schmidt^Anna", "19800102", "F"),
           ("G", "20150301", "Müller^Hans", "19800101", "M")]


def _findscu(pas: PasProcess, out: Path, keys: list[str], root: str) -> list[tuple[str, ...]]:
    """(StudyInstanceUID or PatientID, PatientName, PatientBirthDate, PatientSex) of each
    answer of a findscu in UTF-8 (``root``: -S Study Root, -P Patient Root)."""
    out.mkdir(parents=True)
    args = ["findscu", root, "-v", "-X", "-od", str(out), "-aet", "VIEWER", "-aec", "PAS",
            "-k", "SpecificCharacterSet=ISO_IR 192", "-k", "PatientName",
            "-k", "PatientBirthDate", "-k", "PatientSex"]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([*args, "127.0.0.1", str(pas.port)], env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=60)
    assert "Received Final Find Response (Success)" in result.stdout + result.stderr, \
        (result.stdout + result.stderr)[-2000:]
    answers = [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return sorted((str(ds.get("StudyInstanceUID") or ds.PatientID), str(ds.PatientName),
                   str(ds.PatientBirthDate), str(ds.PatientSex)) for ds in answers)


def test_a_schema_27_index_gives_each_study_its_own_patient_attributes(
        tmp_path: Path) -> None:
    home = tmp_path / "pas"
    path = home / "pas.sqlite"
    old = Database(path, migrations=MIGRATIONS[:27])
    spool = Spool(home / "spool")
    uids = {key: generate_uid() for key, *_ in STUDIES}
    for key, date, name, birth, sex in STUDIES:  # A, F, then the prior G
        ds = tiny_ct(uids[key], PatientID="PID1", IssuerOfPatientID="HOSP_A",
                     PatientName=name, PatientBirthDate=birth, PatientSex=sex,
                     StudyDate=date, SpecificCharacterSet="ISO_IR 192")
        file = tmp_path / f"{key}.dcm"
        ds.save_as(file, enforce_file_format=True)
        data = file.read_bytes()
        stored, _ = spool.write([data])
        record_before_28(old, read_record(data), stored, calling_ae="CT1")
    with old.transaction() as conn:  # as schema 27 filed it: the last instance's word (G's)
        conn.execute("UPDATE patients SET name = 'Müller^Hans', birth_date = '19800101', "
                     "sex = 'M'")
    old.close()

    new = Database(path)  # what pas run does first: the migrations run
    assert new.schema_version() == len(MIGRATIONS) >= 28
    rows = new.query("SELECT study_uid, patient_name, patient_birth_date, patient_sex "
                     "FROM studies ORDER BY id")
    # At once: the patient row's values, for every study (the best known without a file).
    assert [tuple(r) for r in rows] == [(uids[key], "Müller^Hans", "19800101", "M")
                                        for key, *_ in STUDIES]
    assert header_backfill.progress(new) == header_backfill.Progress(0, 3, False)
    indexes = {r["name"] for r in new.query("PRAGMA index_list(studies)")}
    assert {"studies_patient_name", "studies_patient_name_separated",
            "studies_patient_name_folding"} <= indexes
    new.close()

    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                            "PAS_PREFETCH__ENABLED": "false"}).start()
    try:
        wait_for(lambda: "header backfill finished: 3 instances read" in pas.log(), 30,
                 what="the header backfill")
        own = sorted((uids[key], name, birth, sex) for key, _, name, birth, sex in STUDIES)
        for level in ("STUDY", "SERIES", "IMAGE"):
            assert _findscu(pas, tmp_path / level, [
                f"QueryRetrieveLevel={level}", "PatientID=PID1", "StudyInstanceUID"],
                "-S") == own, level
        assert _findscu(pas, tmp_path / "schmidt", [
            "QueryRetrieveLevel=STUDY", "PatientName=Schmidt*", "StudyInstanceUID"],
            "-S") == [(uids["F"], "Schmidt^Anna", "19800102", "F")]
        # PATIENT level: the newest study's values (F's, by StudyDate), found by either name.
        for name in ("Schmidt*", "Müller*"):
            assert _findscu(pas, tmp_path / f"patient{name[0]}", [
                "QueryRetrieveLevel=PATIENT", "PatientID=PID1", f"PatientName={name}"],
                "-P") == [
                ("PID1", "Schmidt^Anna", "19800102", "F")]
        response = httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies",
                             params={"PatientName": "Schmidt*"}, timeout=30)
        assert [item["0020000D"]["Value"][0] for item in response.json()] == [uids["F"]]
        [row] = read_rows(path, "SELECT name, birth_date, sex FROM patients")
        assert tuple(row) == ("Schmidt^Anna", "19800102", "F")
    finally:
        pas.stop()


def test_the_backfill_leaves_a_study_filed_after_the_upgrade_as_ingest_filed_it(
        tmp_path: Path) -> None:
    """A study that receives an instance after the upgrade, before the backfill reaches its
    older files: ingest gave it the new instance's values, which the older files must not
    overwrite. The other study gets its own from its file; the patient row its newest
    study's (by StudyDate: F, whatever the order of receipt)."""
    from appliance.ops.backfill import HeaderBackfill
    from appliance.store import index

    path = tmp_path / "pas.sqlite"
    old = Database(path, migrations=MIGRATIONS[:27])
    spool = Spool(tmp_path / "spool", fsync=False)
    uids = {key: generate_uid() for key, *_ in STUDIES}

    def stored_file(key: str, name: str, n: int) -> tuple[object, object]:
        _, date, _, birth, sex = next(s for s in STUDIES if s[0] == key)
        ds = tiny_ct(uids[key], PatientID="PID1", PatientName=name, PatientBirthDate=birth,
                     PatientSex=sex, StudyDate=date, SpecificCharacterSet="ISO_IR 192")
        file = tmp_path / f"{key}{n}.dcm"
        ds.save_as(file, enforce_file_format=True)
        data = file.read_bytes()
        return read_record(data), spool.write([data])[0]

    for key, _, name, *_ in STUDIES:
        record_before_28(old, *stored_file(key, name, 1))  # type: ignore[arg-type]
    with old.transaction() as conn:
        conn.execute("UPDATE patients SET name = 'Müller^Hans'")
    old.close()
    new = Database(path)
    try:
        # After the upgrade, before the backfill: G is corrected by a new instance.
        index.record_instance(new, *stored_file("G", "Müller-Schmidt^Hans", 2))  # type: ignore[arg-type]
        backfill = HeaderBackfill(new, spool, batch=2, pause_s=0)
        while backfill.step():
            pass
        names = {r["study_uid"]: r["patient_name"]
                 for r in new.query("SELECT study_uid, patient_name FROM studies")}
        assert names == {uids["A"]: "Müller^Hans", uids["F"]: "Schmidt^Anna",
                         uids["G"]: "Müller-Schmidt^Hans"}
        assert new.query_one("SELECT name FROM patients")["name"] == "Schmidt^Anna"
    finally:
        new.close()


def test_the_backfill_fills_what_an_instance_filed_after_the_upgrade_did_not_carry(
        tmp_path: Path) -> None:
    """Migration 29 (review s40/2a): the backfill skipped the whole of a study an instance
    reached after the upgrade. That instance (a key object, a secondary capture) had the
    name but an empty PatientBirthDate and PatientSex (Type 2): F kept migration 28's copy
    of the patient row for them, G's 19800101 and M, and so did the patient row. Now the
    backfill fills each attribute the newer instance did not carry, and leaves the one it
    did; when it ends no study is left provisional."""
    from appliance.ops.backfill import HeaderBackfill
    from appliance.store import index

    path = tmp_path / "pas.sqlite"
    old = Database(path, migrations=MIGRATIONS[:27])
    spool = Spool(tmp_path / "spool", fsync=False)
    uids = {key: generate_uid() for key, *_ in STUDIES}

    def stored_file(key: str, n: int, **attrs: str) -> tuple[object, object]:
        file = tmp_path / f"{key}{n}.dcm"
        tiny_ct(uids[key], PatientID="PID1", SpecificCharacterSet="ISO_IR 192",
                **attrs).save_as(file, enforce_file_format=True)
        data = file.read_bytes()
        return read_record(data), spool.write([data])[0]

    for key, date, name, birth, sex in STUDIES:
        record_before_28(old, *stored_file(key, 1, PatientName=name, PatientBirthDate=birth,  # type: ignore[arg-type]
                                           PatientSex=sex, StudyDate=date))
    with old.transaction() as conn:  # schema 27: the last instance's word (G's)
        conn.execute("UPDATE patients SET name = 'Müller^Hans', birth_date = '19800101', "
                     "sex = 'M'")
    old.close()
    new = Database(path)
    try:
        index.record_instance(new, *stored_file(  # type: ignore[arg-type]
            "F", 2, PatientName="Schmidt^Anna-Maria", StudyDate="20230301",
            PatientBirthDate="", PatientSex=""))
        backfill = HeaderBackfill(new, spool, batch=10, pause_s=0)
        while backfill.step():
            pass
        rows = {r["study_uid"]: tuple(r)[1:] for r in new.query(
            "SELECT study_uid, patient_name, patient_birth_date, patient_sex, "
            "patient_values_provisional FROM studies")}
        # The name is the newer instance's; birth date and sex F's own file's.
        assert rows[uids["F"]] == ("Schmidt^Anna-Maria", "19800102", "F", 0)
        assert rows[uids["G"]] == ("Müller^Hans", "19800101", "M", 0)
        patient = new.query_one("SELECT name, birth_date, sex FROM patients")
        assert tuple(patient) == ("Schmidt^Anna-Maria", "19800102", "F")
    finally:
        new.close()
