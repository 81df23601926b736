"""The regional C-FIND (``serving.query_region``) matches as the local one does.

A real Orthanc (DICOMweb plugin, its own network namespace) is the region, reached directly
(``prefetch.dicomweb_url``); the viewer is DCMTK findscu. Each test names the answer it
expects from PS3.4 C.2.2.2 and C.4.1: the region's studies of a list key (``CT\\MR``, several
UIDs) are listed (they were sent to the region with their backslash and matched none of its
studies, the answer ending Success as if complete); a key the region's rows are not checked
on is answered 0xFF01, not 0xFF00; a study held partly on site is answered once, with the
region's counts, NEARLINE; a study held only at the region has its series and instances
listed (SERIES and IMAGE levels asked none).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset

from tests.support.cleanup import started
from tests.support.findscu import find
from tests.support.objects import tiny_ct
from tests.support.peers import Orthanc, PasProcess, storescu

pytestmark = pytest.mark.root

SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage


def _object(name: str, study: str | None = None, *, modality: str = "CT", **attrs: str
            ) -> Dataset:
    ds = tiny_ct(study, None, **attrs)
    if modality != "CT":
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SC
        ds.Modality = modality
    return ds


class Setup:
    """The region (Orthanc) and PAS, with:

    - L: a study of PID9 whose secondary capture is on site and at the region, and whose CT
      series only the region holds (held partly here);
    - H: a study of PID9 held whole here and at the region;
    - R1, R2: CT studies of PID9 only at the region;
    - M (MR), C (CT), U (US): studies of PIDM only at the region;
    - A1 (AccessionNumber "A,1") and A (AccessionNumber "A"): studies of PIDC only there.
    """

    def __init__(self, root: Path):
        data = root / "data"
        data.mkdir(parents=True)
        objects: dict[str, Dataset] = {}

        def add(name: str, study: str | None = None, **attrs: str) -> Dataset:
            ds = _object(name, study, **attrs)
            objects[name] = ds
            ds.save_as(data / f"{name}.dcm", enforce_file_format=True)
            return ds

        add("L", modality="OT", PatientID="PID9", PatientName="ROE^JANE",
            StudyDate="20240101", AccessionNumber="ACCL")
        add("L_ct", objects["L"].StudyInstanceUID, PatientID="PID9", PatientName="ROE^JANE",
            StudyDate="20240101", AccessionNumber="ACCL")
        add("H", PatientID="PID9", PatientName="ROE^JANE", StudyDate="20210101",
            AccessionNumber="ACCH")
        add("R1", PatientID="PID9", PatientName="ROE^JANE", StudyDate="20230101",
            AccessionNumber="ACCR1")
        add("R2", PatientID="PID9", PatientName="ROE^JANE", StudyDate="20220101",
            AccessionNumber="ACCR2")
        for name, modality in (("M", "MR"), ("C", "CT"), ("U", "US")):
            add(name, modality=modality, PatientID="PIDM", PatientName="DOE^JOHN",
                StudyDate="20200101", AccessionNumber=f"ACC{name}")
        add("A1", PatientID="PIDC", PatientName="ROE^RICHARD", AccessionNumber="A,1")
        add("A", PatientID="PIDC", PatientName="ROE^RICHARD", AccessionNumber="A")
        self.uid = {name: str(ds.StudyInstanceUID) for name, ds in objects.items()}
        self.series = {name: str(ds.SeriesInstanceUID) for name, ds in objects.items()}
        self.sop = {name: str(ds.SOPInstanceUID) for name, ds in objects.items()}
        with contextlib.ExitStack() as stack:
            self.region = started(stack, Orthanc(root / "region"))
            storescu(sorted(data.glob("*.dcm")), self.region.dicom_port,
                     host=self.region.host, called="ORTHANC")
            self.pas = started(stack, PasProcess(root / "pas", {
                "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                "PAS_PREFETCH__ENABLED": "false",
                "PAS_PREFETCH__DICOMWEB_URL": self.region.dicomweb,
                "PAS_PREFETCH__ALLOW_CLEARTEXT": "true",
                "PAS_SERVING__QUERY_REGION": "true",
                "PAS_SERVING__REGION_QUERY_TIMEOUT_S": "10",
            }))
            storescu([data / "L.dcm", data / "H.dcm"], self.pas.port)
            stack.pop_all()

    def stop(self) -> None:
        self.pas.stop()
        self.region.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("region-lists"))
    try:
        yield s
    finally:
        s.stop()


def _find(setup: Setup, level: str, keys: list[str], out: Path
          ) -> tuple[list[tuple[int, Dataset]], int]:
    """findscu (Study Root) against PAS: ([(Pending status, identifier)...], final status)."""
    return find(setup.pas.port, "-S", level, keys, out)


def _by_study(answers: list[tuple[int, Dataset]]) -> dict[str, tuple[int, Dataset]]:
    found = {str(ds.StudyInstanceUID): (status, ds) for status, ds in answers}
    assert len(found) == len(answers), "a study answered twice"
    return found


def test_a_modality_list_finds_the_regions_studies(setup: Setup, tmp_path: Path) -> None:
    answers, final = _find(setup, "STUDY", [
        "PatientID=PIDM", "StudyInstanceUID", "ModalitiesInStudy=CT\\MR",
        "InstanceAvailability"], tmp_path / "find")
    assert final == 0x0000
    found = _by_study(answers)
    assert set(found) == {setup.uid["M"], setup.uid["C"]}  # not U (US)
    assert all(s == 0xFF00 and ds.InstanceAvailability == "NEARLINE"
               for s, ds in found.values())


def test_a_list_of_study_uids_finds_the_regions_and_the_local_ones(setup: Setup,
                                                                    tmp_path: Path) -> None:
    answers, final = _find(setup, "STUDY", [
        f"StudyInstanceUID={setup.uid['R1']}\\{setup.uid['H']}", "InstanceAvailability",
        "NumberOfStudyRelatedInstances"], tmp_path / "find")
    assert final == 0x0000
    found = _by_study(answers)
    assert set(found) == {setup.uid["R1"], setup.uid["H"]}
    assert found[setup.uid["R1"]][1].InstanceAvailability == "NEARLINE"
    assert found[setup.uid["H"]][1].InstanceAvailability == "ONLINE"
    assert found[setup.uid["H"]][1].NumberOfStudyRelatedInstances == 1
    assert {s for s, _ in found.values()} == {0xFF00}


def test_a_value_with_a_comma_is_matched_as_it_is(setup: Setup, tmp_path: Path) -> None:
    """A comma is a list separator to the region (Orthanc reads one so): the value is not
    sent as it is (it matched the study of accession "A"), it is checked here."""
    answers, _ = _find(setup, "STUDY", ["PatientID=PIDC", "AccessionNumber=A,1",
                                         "StudyInstanceUID"], tmp_path / "find")
    found = _by_study(answers)
    assert set(found) == {setup.uid["A1"]}
    assert found[setup.uid["A1"]][0] == 0xFF00
    assert found[setup.uid["A1"]][1].AccessionNumber == "A,1"


def test_the_regions_studies_not_checked_on_sop_classes_are_answered_ff01(
        setup: Setup, tmp_path: Path) -> None:
    """SOPClassesInStudy is matched here; the region (Orthanc) neither matches nor returns
    it: its studies are answered 0xFF01 (the key not applied to them), the local match
    0xFF00."""
    answers, final = _find(setup, "STUDY", [
        "PatientID=PID9", f"SOPClassesInStudy={SC}", "StudyInstanceUID",
        "InstanceAvailability"], tmp_path / "find")
    assert final == 0x0000
    found = _by_study(answers)
    assert found[setup.uid["L"]][0] == 0xFF00  # matched here: it holds a secondary capture
    assert setup.uid["H"] not in found          # held whole here, a CT only: not a match
    for name in ("R1", "R2"):
        status, ds = found[setup.uid[name]]
        assert status == 0xFF01
        assert ds.InstanceAvailability == "NEARLINE"


def test_a_study_held_partly_is_answered_once_with_the_regions_counts(
        setup: Setup, tmp_path: Path) -> None:
    keys = ["ModalitiesInStudy", "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances", "InstanceAvailability"]
    by_uid, _ = _find(setup, "STUDY", [f"StudyInstanceUID={setup.uid['L']}", *keys],
                      tmp_path / "uid")
    by_ct, _ = _find(setup, "STUDY", ["PatientID=PID9", "StudyInstanceUID",
                                      "ModalitiesInStudy=CT", *keys[1:]], tmp_path / "ct")
    (status, ds), = by_uid
    assert status == 0xFF00
    assert ds.InstanceAvailability == "NEARLINE"  # its CT series is fetched on retrieve
    assert list(ds.ModalitiesInStudy) == ["CT", "OT"]
    assert ds.NumberOfStudyRelatedSeries == 2
    assert ds.NumberOfStudyRelatedInstances == 2
    other = _by_study(by_ct)[setup.uid["L"]][1]
    assert other.InstanceAvailability == "NEARLINE"
    assert other.NumberOfStudyRelatedInstances == 2
    # A study held whole stays ONLINE with its own counts.
    held_answers, _ = _find(setup, "STUDY", [f"StudyInstanceUID={setup.uid['H']}", *keys],
                            tmp_path / "held")
    assert len(held_answers) == 1, [(hex(s), ds.StudyInstanceUID, ds.InstanceAvailability)
                                    for s, ds in held_answers]
    (_, held), = held_answers
    assert held.InstanceAvailability == "ONLINE"
    assert held.NumberOfStudyRelatedInstances == 1


def test_a_regional_study_has_its_series_and_instances_listed(setup: Setup,
                                                              tmp_path: Path) -> None:
    series, final = _find(setup, "SERIES", [
        f"StudyInstanceUID={setup.uid['R1']}", "SeriesInstanceUID", "Modality",
        "NumberOfSeriesRelatedInstances", "InstanceAvailability"], tmp_path / "series")
    assert final == 0x0000
    (status, ds), = series
    assert status == 0xFF00
    assert ds.SeriesInstanceUID == setup.series["R1"]
    assert ds.Modality == "CT"
    assert ds.NumberOfSeriesRelatedInstances == 1
    assert ds.InstanceAvailability == "NEARLINE"
    images, final = _find(setup, "IMAGE", [
        f"StudyInstanceUID={setup.uid['R1']}", f"SeriesInstanceUID={setup.series['R1']}",
        "SOPInstanceUID", "SOPClassUID", "InstanceAvailability"], tmp_path / "images")
    assert final == 0x0000
    (status, ds), = images
    assert (status, ds.SOPInstanceUID, ds.SOPClassUID) == (0xFF00, setup.sop["R1"], CT)
    assert ds.InstanceAvailability == "NEARLINE"
    # The keys still match: a modality the study does not hold, a patient it is not of.
    none, _ = _find(setup, "SERIES", [f"StudyInstanceUID={setup.uid['R1']}", "Modality=MR",
                                      "SeriesInstanceUID"], tmp_path / "mr")
    assert none == []
    none, _ = _find(setup, "SERIES", [f"StudyInstanceUID={setup.uid['R1']}",
                                      "PatientID=PIDM", "SeriesInstanceUID"],
                    tmp_path / "other")
    assert none == []
