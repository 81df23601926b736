"""C-FIND after corrections and purges: what a viewer lists is what it can retrieve.

A modality that corrects an image re-sends it with the same SOP Instance UID; when the
correction moves it to another series or study, the old series (or study) keeps only older
versions. A purged study leaves its patient with no study (and no row: it is deleted with
its last study). Such an entity has no current instance: a retrieve of it sends nothing, so
C-FIND must neither list it nor count it (it was listed with 0 instances, counted in
NumberOfStudyRelatedSeries and NumberOfPatientRelated*, and its modality stayed in
ModalitiesInStudy). findscu as the viewer, a real ``pas run``.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support.cleanup import started
from tests.support.objects import tiny_ct
from tests.support.peers import DCMTK_ENV, PasProcess, read_rows, storescu

pytestmark = pytest.mark.root

STUDY_A, STUDY_B, STUDY_C = generate_uid(), generate_uid(), generate_uid()
SERIES_OT, SERIES_CT, SERIES_FIXED = generate_uid(), generate_uid(), generate_uid()
SERIES_B, SERIES_C = generate_uid(), generate_uid()


class Site:
    """PAS holding, after corrections: patient P1 with study A (series CT and FIXED, the
    OT series emptied by a correction that made its image CT), study B emptied by a
    correction filing its image under study A's patient in study A; patient P2 whose only
    study C was purged."""

    def __init__(self, root: Path):
        self.root = root
        with contextlib.ExitStack() as stack:  # a step that raises stops the daemon
            self.pas = started(stack, PasProcess(root / "pas", {
                "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false"}))
            moved = tiny_ct(STUDY_A, SERIES_OT, PatientID="P1", Modality="OT", SeriesNumber=1)
            kept = tiny_ct(STUDY_A, SERIES_CT, PatientID="P1", SeriesNumber=2)
            other = tiny_ct(STUDY_B, SERIES_B, PatientID="P1", SeriesNumber=1)
            purged = tiny_ct(STUDY_C, SERIES_C, PatientID="P2", SeriesNumber=1)
            self._send("first", [moved, kept, other, purged])
            moved.SeriesInstanceUID, moved.Modality, moved.SeriesNumber = SERIES_FIXED, "CT", 3
            other.StudyInstanceUID, other.SeriesInstanceUID = STUDY_A, SERIES_CT
            other.InstanceNumber = 2
            self._send("corrections", [moved, other])
            self.pas.cli("cache", "purge", STUDY_C, "--force")
            stack.pop_all()  # set up: the fixture stops it from now on
        self.finds = 0

    def _send(self, name: str, datasets: list[Dataset]) -> None:
        send(self.root / name, self.pas, datasets)

    def findscu(self, model: str, level: str, keys: list[str]) -> list[Dataset]:
        self.finds += 1
        return findscu(self.pas, self.root / f"find{self.finds}", model, level, keys)


def send(root: Path, pas: PasProcess, datasets: list[Dataset]) -> None:
    """Each dataset saved to a file of its own in the new folder ``root``, sent by storescu."""
    root.mkdir()
    for n, ds in enumerate(datasets):
        ds.save_as(root / f"{n}.dcm", enforce_file_format=True)
    storescu(root, pas.port)


def findscu(pas: PasProcess, out: Path, model: str, level: str,
            keys: list[str]) -> list[Dataset]:
    """DCMTK findscu as the viewer: the answers, written to the new folder ``out``."""
    out.mkdir()
    args = ["findscu", "-v", model, "-X", "-od", str(out), "-aet", "VIEWER", "-aec", "PAS",
            "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([*args, "127.0.0.1", str(pas.port)], env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Final Find Response (Success)" in result.stderr, result.stderr[-2000:]
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    site = Site(tmp_path_factory.mktemp("versions"))
    try:
        yield site
    finally:
        site.pas.stop()


def test_a_series_emptied_by_a_correction_is_not_listed(site: Site) -> None:
    series = site.findscu("-S", "SERIES", [f"StudyInstanceUID={STUDY_A}", "SeriesInstanceUID",
                                           "Modality", "NumberOfSeriesRelatedInstances"])
    assert {(str(ds.SeriesInstanceUID), ds.Modality, int(ds.NumberOfSeriesRelatedInstances))
            for ds in series} == {(SERIES_CT, "CT", 2), (SERIES_FIXED, "CT", 1)}


def test_study_counts_and_modalities_leave_out_what_holds_no_current_image(
        site: Site) -> None:
    [study] = site.findscu("-S", "STUDY", [f"StudyInstanceUID={STUDY_A}",
                                           "NumberOfStudyRelatedSeries",
                                           "NumberOfStudyRelatedInstances", "ModalitiesInStudy"])
    assert int(study.NumberOfStudyRelatedSeries) == 2
    assert int(study.NumberOfStudyRelatedInstances) == 3
    assert study.ModalitiesInStudy == "CT"
    # The OT series exists only in older versions: a search for OT studies finds none.
    assert site.findscu("-S", "STUDY", ["ModalitiesInStudy=OT", "StudyInstanceUID"]) == []


def test_a_study_emptied_by_a_correction_is_not_listed(site: Site) -> None:
    studies = site.findscu("-P", "STUDY", ["PatientID=P1", "StudyInstanceUID"])
    assert [str(ds.StudyInstanceUID) for ds in studies] == [STUDY_A]


def test_patient_level_lists_and_counts_only_what_can_be_retrieved(site: Site) -> None:
    patients = site.findscu("-P", "PATIENT", ["PatientID", "NumberOfPatientRelatedStudies",
                                              "NumberOfPatientRelatedSeries",
                                              "NumberOfPatientRelatedInstances"])
    # P2's only study was purged: nothing of P2 is held any more.
    assert [(str(ds.PatientID), int(ds.NumberOfPatientRelatedStudies),
             int(ds.NumberOfPatientRelatedSeries), int(ds.NumberOfPatientRelatedInstances))
            for ds in patients] == [("P1", 1, 2, 3)]
    # Nor its row: the name and birth date of a patient no study is filed under any more.
    assert [r["patient_id"] for r in read_rows(site.pas.home / "pas.sqlite",
                                                "SELECT patient_id FROM patients")] == ["P1"]
