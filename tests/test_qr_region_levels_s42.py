"""The regional C-FIND (``serving.query_region``) at PATIENT level, and at SERIES and IMAGE
level for a study held partly on site (s42).

The region is a real Orthanc (DICOMweb plugin, its own network namespace) reached directly
(``prefetch.dicomweb_url``), holding what ``tests/test_serving_region_lists.py``'s Setup
stores (imported, not copied), and one more image of study L's secondary-capture series that
only the region holds. The viewer is DCMTK findscu (TCP_NODELAY=1).

Before s42 a PATIENT-level C-FIND never asked the region: a patient whose studies are all at
the region (evicted, or never received here) was not found, while a STUDY-level query found
them NEARLINE. SERIES and IMAGE asked the region only when nothing here matched: for a study
held in part the series (and images) only the region holds were not listed.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from tests.support.objects import tiny_ct
from tests.support.peers import DCMTK_ENV, PasProcess, audit_rows, closed_port, storescu
from tests.test_serving_region_lists import SC, Setup

pytestmark = pytest.mark.root


class Region(Setup):
    """The region and PAS of ``test_serving_region_lists.Setup`` (PID9: L held here in part,
    H held whole, R1 and R2 at the region only; PIDM's M, C, U and PIDC's A1, A at the
    region only), with a second image of L's secondary-capture series (``L_more``) that only
    the region holds."""

    def __init__(self, root: Path):
        super().__init__(root)
        more = tiny_ct(self.uid["L"], self.series["L"], PatientID="PID9",
                       PatientName="ROE^JANE", StudyDate="20240101", AccessionNumber="ACCL",
                       Modality="OT", InstanceNumber=2)
        more.SOPClassUID = more.file_meta.MediaStorageSOPClassUID = SC
        path = root / "L_more.dcm"
        more.save_as(path, enforce_file_format=True)
        storescu([path], self.region.dicom_port, host=self.region.host, called="ORTHANC")
        self.sop["L_more"] = str(more.SOPInstanceUID)


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    s = Region(tmp_path_factory.mktemp("region-levels"))
    try:
        yield s
    finally:
        s.stop()


def _find(port: int, model: str, level: str, keys: list[str], out: Path
          ) -> tuple[list[tuple[int, Dataset]], int]:
    """findscu (``-P`` Patient Root, ``-S`` Study Root) against PAS: ([(Pending status,
    identifier)...], final status)."""
    out.mkdir(parents=True)
    args = ["findscu", "-d", model, "-aet", "VIEWER", "-aec", "PAS", "-X", "-od", str(out),
            "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([*args, "127.0.0.1", str(port)], env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = [int(s, 16) for s in
                re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", result.stderr)]
    answers = [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    assert len(statuses) == len(answers) + 1, result.stderr[-3000:]
    return list(zip(statuses, answers, strict=False)), statuses[-1]


def _by(keyword: str, answers: list[tuple[int, Dataset]]) -> dict[str, tuple[int, Dataset]]:
    found = {str(ds[keyword].value): (status, ds) for status, ds in answers}
    assert len(found) == len(answers), [str(ds[keyword].value) for _, ds in answers]
    return found


PATIENT_KEYS = ["PatientID", "IssuerOfPatientID", "PatientName", "NumberOfPatientRelatedStudies",
                "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances",
                "InstanceAvailability"]


def _counts(ds: Dataset) -> tuple[int, int, int]:
    return (int(ds.NumberOfPatientRelatedStudies), int(ds.NumberOfPatientRelatedSeries),
            int(ds.NumberOfPatientRelatedInstances))


def test_a_patient_held_only_at_the_region_is_found(region: Region, tmp_path: Path) -> None:
    """PIDM's three studies (MR, CT, US) are only at the region: found by PatientID and by
    name, NEARLINE, with the region's counts."""
    for name, key in (("id", "PatientID=PIDM"), ("name", "PatientName=DOE*")):
        answers, final = _find(region.pas.port, "-P", "PATIENT",
                               [key, *(k for k in PATIENT_KEYS if k != key.split("=")[0])],
                               tmp_path / name)
        assert final == 0x0000
        (status, ds), = answers
        assert status == 0xFF00
        assert (ds.PatientID, str(ds.PatientName)) == ("PIDM", "DOE^JOHN")
        assert _counts(ds) == (3, 3, 3)
        assert ds.InstanceAvailability == "NEARLINE"


def test_a_patient_held_here_and_there_is_answered_once(region: Region,
                                                        tmp_path: Path) -> None:
    """PID9 has L (in part) and H here, R1 and R2 at the region only: one answer, with the
    union's counts (L counted as the region counts it: 2 series, 3 images), NEARLINE. A
    broader query lists it once beside PIDC, held only at the region."""
    answers, final = _find(region.pas.port, "-P", "PATIENT", ["PatientID=PID9",
                           *PATIENT_KEYS[1:]], tmp_path / "id")
    assert final == 0x0000
    (status, ds), = answers
    assert status == 0xFF00
    assert (ds.PatientID, str(ds.PatientName)) == ("PID9", "ROE^JANE")
    assert _counts(ds) == (4, 5, 6)
    assert ds.InstanceAvailability == "NEARLINE"
    broad, final = _find(region.pas.port, "-P", "PATIENT",
                         ["PatientName=ROE*", *(k for k in PATIENT_KEYS if k != "PatientName")],
                         tmp_path / "broad")
    assert final == 0x0000
    found = _by("PatientID", broad)
    assert set(found) == {"PID9", "PIDC"}
    assert _counts(found["PID9"][1]) == (4, 5, 6)
    assert _counts(found["PIDC"][1]) == (2, 2, 2)
    assert found["PIDC"][1].InstanceAvailability == "NEARLINE"
    assert {status for status, _ in found.values()} == {0xFF00}


def test_the_series_only_the_region_holds_are_listed(region: Region, tmp_path: Path) -> None:
    """L's secondary-capture series is held here (one image of the region's two): answered
    once with the region's count, NEARLINE; its CT series only the region holds is listed
    NEARLINE. H, held whole, lists its one series ONLINE, once."""
    keys = ["SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances",
            "InstanceAvailability"]
    answers, final = _find(region.pas.port, "-S", "SERIES",
                           [f"StudyInstanceUID={region.uid['L']}", *keys], tmp_path / "L")
    assert final == 0x0000
    found = _by("SeriesInstanceUID", answers)
    assert set(found) == {region.series["L"], region.series["L_ct"]}
    status, ot = found[region.series["L"]]
    assert (status, ot.Modality, ot.NumberOfSeriesRelatedInstances,
            ot.InstanceAvailability) == (0xFF00, "OT", 2, "NEARLINE")
    status, ct = found[region.series["L_ct"]]
    assert (status, ct.Modality, ct.NumberOfSeriesRelatedInstances,
            ct.InstanceAvailability) == (0xFF00, "CT", 1, "NEARLINE")
    # The keys still match on the region's series.
    only_ct, _ = _find(region.pas.port, "-S", "SERIES",
                       [f"StudyInstanceUID={region.uid['L']}", "Modality=CT", *keys[:1]],
                       tmp_path / "ct")
    assert [str(ds.SeriesInstanceUID) for _, ds in only_ct] == [region.series["L_ct"]]
    held, _ = _find(region.pas.port, "-S", "SERIES",
                    [f"StudyInstanceUID={region.uid['H']}", *keys], tmp_path / "H")
    (status, ds), = held
    assert (status, ds.SeriesInstanceUID, ds.NumberOfSeriesRelatedInstances,
            ds.InstanceAvailability) == (0xFF00, region.series["H"], 1, "ONLINE")


def test_the_images_only_the_region_holds_are_listed(region: Region, tmp_path: Path) -> None:
    """L's secondary-capture series: its image held here ONLINE, the one only the region
    holds NEARLINE, each once (Patient Root too)."""
    for model, keys in (("-S", []), ("-P", ["PatientID=PID9"])):
        answers, final = _find(region.pas.port, model, "IMAGE", [
            *keys, f"StudyInstanceUID={region.uid['L']}",
            f"SeriesInstanceUID={region.series['L']}", "SOPInstanceUID", "SOPClassUID",
            "InstanceNumber", "InstanceAvailability"], tmp_path / model)
        assert final == 0x0000
        found = _by("SOPInstanceUID", answers)
        assert set(found) == {region.sop["L"], region.sop["L_more"]}
        assert found[region.sop["L"]][1].InstanceAvailability == "ONLINE"
        status, more = found[region.sop["L_more"]]
        assert (status, more.SOPClassUID, more.InstanceNumber,
                more.InstanceAvailability) == (0xFF00, SC, 2, "NEARLINE")


def test_with_the_region_down_the_local_answers_still_come(tmp_path: Path) -> None:
    """Nothing listens at the region's address: the PATIENT and SERIES answers are the local
    ones, ONLINE, ending Success, and the audit row says "region not asked"."""
    down = closed_port()
    ds = tiny_ct(PatientID="PIDL", PatientName="LOCAL^ONLY")
    ds.save_as(tmp_path / "local.dcm", enforce_file_format=True)
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true",
        "PAS_PREFETCH__ENABLED": "false",
        "PAS_PREFETCH__DICOMWEB_URL": f"http://127.0.0.1:{down.getsockname()[1]}/dicom-web",
        "PAS_PREFETCH__ALLOW_CLEARTEXT": "true",
        "PAS_SERVING__QUERY_REGION": "true",
    })
    try:
        pas.start()
        storescu([tmp_path / "local.dcm"], pas.port)
        patients, final = _find(pas.port, "-P", "PATIENT", ["PatientID=PIDL", *PATIENT_KEYS[1:]],
                                tmp_path / "patient")
        assert final == 0x0000
        (status, answer), = patients
        assert (status, _counts(answer), answer.InstanceAvailability) == (
            0xFF00, (1, 1, 1), "ONLINE")
        series, final = _find(pas.port, "-S", "SERIES", [
            f"StudyInstanceUID={ds.StudyInstanceUID}", "SeriesInstanceUID",
            "InstanceAvailability"], tmp_path / "series")
        assert final == 0x0000
        assert [(s, str(a.SeriesInstanceUID), a.InstanceAvailability) for s, a in series] == [
            (0xFF00, str(ds.SeriesInstanceUID), "ONLINE")]
        queries = audit_rows(pas.home, "query")[-2:]
        assert all("region not asked" in (row["detail"] or "") for row in queries), queries
    finally:
        pas.stop()
        down.close()


def test_a_patient_search_cut_by_the_regions_limit_says_so(region: Region,
                                                          tmp_path: Path) -> None:
    """With ``max_results`` = 2 the region is asked ``limit=3`` studies: PIDM's three fill it
    (more patients, or more of PIDM's studies, could be past them), so the answer ends
    Success with what is known and the audit row says "truncated"; PIDC's two do not."""
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true",
        "PAS_PREFETCH__ENABLED": "false",
        "PAS_PREFETCH__DICOMWEB_URL": region.region.dicomweb,
        "PAS_PREFETCH__ALLOW_CLEARTEXT": "true",
        "PAS_SERVING__QUERY_REGION": "true",
        "PAS_SERVING__REGION_QUERY_TIMEOUT_S": "10",
        "PAS_SERVING__MAX_RESULTS": "2",
    })
    try:
        pas.start()
        for patient, studies in (("PIDM", 3), ("PIDC", 2)):
            answers, final = _find(pas.port, "-P", "PATIENT", [f"PatientID={patient}",
                                   *PATIENT_KEYS[1:]], tmp_path / patient)
            assert final == 0x0000
            (status, ds), = answers
            assert (status, ds.PatientID, _counts(ds)[0], ds.InstanceAvailability) == (
                0xFF00, patient, studies, "NEARLINE")
            detail = audit_rows(pas.home, "query")[-1]["detail"] or ""
            assert ("truncated: the region answered 3 studies" in detail) == (studies == 3), \
                detail
    finally:
        pas.stop()
