"""A study re-sent under the right patient: the index files it there (``store/index.py``).

The modality (or the RIS, through a re-send) corrects a wrongly identified study by sending
it again, same Study Instance UID, under the right PatientID and with corrected attributes:
new bytes, so new versions of each instance. The study used to stay filed under the first,
wrong patient, with its first StudyDescription and SeriesDescription: a viewer's C-FIND for
the right patient found nothing, and one for the wrong patient found the study. storescu as
the modality, findscu as the viewer, a real ``pas run``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.support.objects import tiny_ct
from tests.support.peers import PasProcess, read_rows
from tests.test_serving_qr_versions import findscu, send

pytestmark = pytest.mark.root


def test_a_study_re_sent_under_another_patient_is_filed_under_it(pas: PasProcess,
                                                                 tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    images = [tiny_ct(study, series, PatientID="WRONG-1", PatientName="WRONG^PATIENT",
                      StudyDescription="CT HEAD", SeriesDescription="AX", InstanceNumber=n)
              for n in (1, 2, 3)]
    send(tmp_path / "first", pas, images)
    for ds in images:
        ds.PatientID, ds.PatientName = "RIGHT-2", "RIGHT^PATIENT"
        ds.StudyDescription, ds.SeriesDescription = "CT HEAD W/O", "AXIAL 5MM"
    send(tmp_path / "corrected", pas, images)
    # An image without any PatientID added later names nobody: the study stays where it is.
    anonymous = tiny_ct(study, series, InstanceNumber=4)
    send(tmp_path / "anonymous", pas, [anonymous])

    def find(name: str, level: str, keys: list[str]) -> list:
        return findscu(pas, tmp_path / name, "-P", level, keys)

    found = find("right", "STUDY", ["PatientID=RIGHT-2", "StudyInstanceUID",
                                    "StudyDescription", "NumberOfStudyRelatedInstances"])
    assert [(str(ds.StudyInstanceUID), ds.StudyDescription,
             int(ds.NumberOfStudyRelatedInstances)) for ds in found] == [
        (study, "CT HEAD W/O", 4)]
    assert find("wrong", "STUDY", ["PatientID=WRONG-1", "StudyInstanceUID"]) == []
    patients = find("patients", "PATIENT", ["PatientID", "PatientName"])
    assert [(str(ds.PatientID), str(ds.PatientName)) for ds in patients] == [
        ("RIGHT-2", "RIGHT^PATIENT")]
    [listed] = find("series", "SERIES", [f"StudyInstanceUID={study}", "PatientID=RIGHT-2",
                                         "SeriesDescription"])
    assert listed.SeriesDescription == "AXIAL 5MM"
    assert [s["study_uid"] for s in json.loads(
        pas.cli("studies", "--patient", "RIGHT-2", "--json").stdout)] == [study]
    assert json.loads(pas.cli("studies", "--patient", "WRONG-1", "--json").stdout) == []
    # The wrong patient's name and birth date are not kept once no study is filed there.
    assert [r["patient_id"] for r in read_rows(pas.home / "pas.sqlite",
                                                "SELECT patient_id FROM patients")] == ["RIGHT-2"]
    assert pas.status()["patients"] == 1

    # One move, one audit row, found by either patient; the log says it once.
    [row] = json.loads(pas.cli("audit", "--event", "refile", "--json").stdout)
    assert (row["target"], row["outcome"], row["actor"]) == (study, "success", "STORESCU")
    assert set(row["patient"].split("\\")) == {"WRONG-1", "RIGHT-2"}, row
    assert "under patient 'WRONG-1' until now, under 'RIGHT-2'" in row["detail"], row
    for patient in ("WRONG-1", "RIGHT-2"):
        rows = json.loads(pas.cli("audit", "--patient", patient, "--event", "refile",
                                  "--json").stdout)
        assert [r["id"] for r in rows] == [row["id"]]
    assert pas.log().count(f"study {study} is now filed under patient 'RIGHT-2'") == 1
