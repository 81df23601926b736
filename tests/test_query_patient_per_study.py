"""Patient attributes per study: a name change, then a prior received last (review s40).

Finding 1 (high): the index kept one patients row per (PatientID, issuer), its name, birth
date and sex written by the last instance received, and every study of the patient was
matched and answered with them. The usual prefetch order (the current study first, its
priors after) then put a prior's old name on the current study: after A (2020,
"Müller^Hans"), F (2023, "Schmidt^Anna", the name changed) and G (2015, "Müller^Hans", a
prior received last), ``PatientName=Schmidt*`` found nothing, and F was answered with a
name none of its instances carries. PS3.4 C.2.2.2: a study is matched and answered on its
own values (Orthanc does so). Each study now keeps its own (schema 28); the PATIENT level
answers its newest study's (by StudyDate) and matches a name any of its studies carries.

Finding 6 (low): an ASCII key went through SQLite's NOCASE and LIKE, which fold ASCII
letters only: ``strasse^anna`` missed a stored ``Straße^Anna`` that ``straße^anna`` found.

Real peers: ``pas run``, DCMTK storescu and findscu, QIDO-RS over httpx.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.objects import tiny_ct
from tests.support.peers import DCMTK_ENV, PasProcess, storescu

# The studies of PID1 (issuer HOSP_A), in the order received: (key, StudyDate, name, birth
# date, sex). F corrected the birth date and the sex as well as the name.
STUDIES = [("A", "20200301", "Müller^Hans", "19800101", "M"),
           ("F", "20230301", "Schmidt^Anna", "19800102", "F"),
           ("G", "20150301", "Müller^Hans", "19800101", "M")]
UIDS = {key: generate_uid() for key, *_ in STUDIES}
# Finding 6: one patient's name with a letter that case folding turns into two ASCII ones.
STRASSE = ("PID6", generate_uid(), "Straße^Anna")


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasProcess]:
    home = tmp_path_factory.mktemp("per_study") / "pas"
    home.mkdir()
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                            "PAS_PREFETCH__ENABLED": "false"}).start()
    try:
        for key, date, name, birth, sex in STUDIES:  # one association each, in this order
            path = home / f"{key}.dcm"
            tiny_ct(UIDS[key], PatientID="PID1", IssuerOfPatientID="HOSP_A", PatientName=name,
                    PatientBirthDate=birth, PatientSex=sex, StudyDate=date,
                    SpecificCharacterSet="ISO_IR 192").save_as(path, enforce_file_format=True)
            storescu(path, pas.port)
        patient_id, study_uid, name = STRASSE
        path = home / "strasse.dcm"
        tiny_ct(study_uid, PatientID=patient_id, PatientName=name, StudyDate="20240101",
                SpecificCharacterSet="ISO_IR 100").save_as(path, enforce_file_format=True)
        storescu(path, pas.port)
        yield pas
    finally:
        pas.stop()


def findscu(pas: PasProcess, out: Path, keys: list[str], *, root: str = "-S") -> list[Any]:
    """DCMTK findscu (``root``: -S Study Root, -P Patient Root) in UTF-8 with ``keys``: the
    answers, the final status checked to be Success."""
    out.mkdir(parents=True)
    args = ["findscu", root, "-v", "-X", "-od", str(out), "-aet", "VIEWER", "-aec", "PAS",
            "-k", "SpecificCharacterSet=ISO_IR 192"]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([*args, "127.0.0.1", str(pas.port)], env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=60)
    log = result.stdout + result.stderr
    assert "Received Final Find Response (Success)" in log, log[-2000:]
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _by_study(answers: list[Any]) -> dict[str, tuple[str, str, str]]:
    names = {uid: key for key, uid in UIDS.items()}
    return {names[str(ds.StudyInstanceUID)]: (str(ds.PatientName),
                                               str(ds.get("PatientBirthDate", "")),
                                               str(ds.get("PatientSex", "")))
            for ds in answers if str(ds.StudyInstanceUID) in names}


OWN = {key: (name, birth, sex) for key, _, name, birth, sex in STUDIES}


@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
def test_c_find_answers_each_study_with_its_own_patient_attributes(
        pas: PasProcess, tmp_path: Path, level: str) -> None:
    """Every study, its series and its images carry the name, birth date and sex of the
    study's own instances, not those of the instance received last (G's)."""
    answers = findscu(pas, tmp_path / "all", [
        f"QueryRetrieveLevel={level}", "PatientID=PID1", "IssuerOfPatientID=HOSP_A",
        "StudyInstanceUID", "PatientName", "PatientBirthDate", "PatientSex",
        *(["SeriesInstanceUID"] if level != "STUDY" else []),
        *(["SOPInstanceUID"] if level == "IMAGE" else [])])
    assert len(answers) == 3
    assert _by_study(answers) == OWN


@pytest.mark.parametrize(("level", "name", "studies"), [
    ("STUDY", "Schmidt*", {"F"}),
    ("STUDY", "SCHMIDT^ANNA", {"F"}),
    ("STUDY", "Müller^Hans", {"A", "G"}),
    ("SERIES", "Schmidt*", {"F"}),
    ("IMAGE", "schmidt^anna", {"F"}),
    ("IMAGE", "müller*", {"A", "G"}),
])
def test_c_find_matches_each_study_on_its_own_name(
        pas: PasProcess, tmp_path: Path, level: str, name: str, studies: set[str]) -> None:
    answers = findscu(pas, tmp_path / "find", [
        f"QueryRetrieveLevel={level}", f"PatientName={name}", "PatientID=PID1",
        "StudyInstanceUID"])
    assert set(_by_study(answers)) == studies


def test_qido_rs_matches_and_answers_each_study_on_its_own_values(pas: PasProcess) -> None:
    base = f"http://127.0.0.1:{pas.http_port}/dicom-web"
    fields = {"includefield": "PatientName,PatientBirthDate,PatientSex"}

    def values(items: list[dict[str, Any]]) -> dict[str, tuple[str, str, str]]:
        names = {uid: key for key, uid in UIDS.items()}
        return {names[item["0020000D"]["Value"][0]]: (
            item["00100010"]["Value"][0]["Alphabetic"], item["00100030"]["Value"][0],
            item["00100040"]["Value"][0]) for item in items}

    for path in ("studies", "series", "instances"):
        response = httpx.get(f"{base}/{path}", params={"PatientID": "PID1", **fields},
                             timeout=30)
        assert response.status_code == 200, response.text
        assert values(response.json()) == OWN, path
        found = httpx.get(f"{base}/{path}", params={"PatientName": "Schmidt*", **fields},
                          timeout=30)
        assert found.status_code == 200, found.text
        assert values(found.json()) == {"F": OWN["F"]}, path
    # A corrected birth date is the study's own too.
    response = httpx.get(f"{base}/studies", params={"PatientBirthDate": "19800101"},
                         timeout=30)
    assert {item["0020000D"]["Value"][0] for item in response.json()} == {
        UIDS["A"], UIDS["G"]}


@pytest.mark.parametrize("name", ["", "Schmidt*", "Müller^Hans", "müller*"])
def test_the_patient_level_answers_the_newest_study_and_matches_every_name(
        pas: PasProcess, tmp_path: Path, name: str) -> None:
    """Patient Root, PATIENT level: one patient, answered with the values of its newest
    study by StudyDate (F, received before G), found by either name."""
    answers = findscu(pas, tmp_path / "patient", [
        "QueryRetrieveLevel=PATIENT", "PatientID=PID1", "IssuerOfPatientID",
        f"PatientName={name}", "PatientBirthDate", "PatientSex",
        "NumberOfPatientRelatedStudies"], root="-P")
    assert [(str(ds.PatientID), str(ds.PatientName), str(ds.PatientBirthDate),
             str(ds.PatientSex), int(ds.NumberOfPatientRelatedStudies)) for ds in answers] == [
        ("PID1", "Schmidt^Anna", "19800102", "F", 3)]


def test_the_patient_level_matches_the_keys_on_one_study(
        pas: PasProcess, tmp_path: Path) -> None:
    """The new name with the old birth date: no study of PID1 holds both."""
    answers = findscu(pas, tmp_path / "patient", [
        "QueryRetrieveLevel=PATIENT", "PatientID=PID1", "PatientName=Schmidt*",
        "PatientBirthDate=19800101"], root="-P")
    assert answers == []


@pytest.mark.parametrize("name", ["strasse^anna", "STRASSE*", "straße^anna", "Straße^Anna",
                                  "stras?e^anna"])
def test_a_name_holding_a_letter_that_folds_to_ascii_ones_is_found_by_an_ascii_key(
        pas: PasProcess, tmp_path: Path, name: str) -> None:
    """Finding 6: the answer no longer depends on how the key spells ß."""
    response = httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies",
                         params={"PatientName": name}, timeout=30)
    assert response.status_code == 200, response.text
    assert [item["0020000D"]["Value"][0] for item in response.json()] == [STRASSE[1]]
    answers = findscu(pas, tmp_path / "find", [
        "QueryRetrieveLevel=STUDY", f"PatientName={name}", "StudyInstanceUID"])
    assert [str(ds.StudyInstanceUID) for ds in answers] == [STRASSE[1]]


def test_the_letters_that_fold_to_ascii_ones_are_every_such_letter() -> None:
    """The partial index of migration 28 and the query's test name the same letters, every
    one whose Unicode case folding is ASCII (a Python upgrade adding one fails here)."""
    from appliance.store.person_names import FOLDING, FOLDS_TO_ASCII
    from appliance.store.schema import MIGRATIONS

    every = "".join(c for c in map(chr, range(0x80, 0x110000)) if c.casefold().isascii())
    assert every == FOLDS_TO_ASCII
    assert FOLDING.format(column="patient_name") in MIGRATIONS[27]
