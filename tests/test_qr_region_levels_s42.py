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

Review of s42: SERIES and IMAGE asked the region whenever the query named its study, so a
viewer browsing a study held whole here waited on the WAN (0.57 s a SERIES find instead of
0.05 s with the WAN down); they now ask it when nothing here matched or when the region's
STUDY answer of the last minutes counted more of the study than is here (a viewer lists the
study first). A region that failed is not asked again for 30 s (RegionFind's breaker). A
PATIENT answer built from a cut regional answer (as many studies as the limit asked) gave
counts of part of the patient's studies under 0xFF00: they are now empty, 0xFF01.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset

from tests.support.findscu import find as _find
from tests.support.objects import tiny_ct
from tests.support.peers import PasProcess, audit_rows, closed_port, storescu
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
        # E: one image at the region only, another of the same study (its own series) here
        # only: as many here as there, not the same ones (review s42b F1).
        there = tiny_ct(PatientID="PIDE", PatientName="EVEN^COUNTS", StudyDate="20240301")
        here = tiny_ct(str(there.StudyInstanceUID), PatientID="PIDE",
                       PatientName="EVEN^COUNTS", StudyDate="20240301", SeriesNumber=2)
        for name, ds in (("E_there", there), ("E_here", here)):
            ds.save_as(root / f"{name}.dcm", enforce_file_format=True)
            self.series[name] = str(ds.SeriesInstanceUID)
        storescu([root / "E_there.dcm"], self.region.dicom_port, host=self.region.host,
                 called="ORTHANC")
        storescu([root / "E_here.dcm"], self.pas.port)
        self.uid["E"] = str(there.StudyInstanceUID)


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    s = Region(tmp_path_factory.mktemp("region-levels"))
    try:
        yield s
    finally:
        s.stop()


def _asking(home: Path, region_url: str, **extra: str) -> PasProcess:
    """PAS (not started) answering C-FIND with the region at ``region_url`` asked."""
    return PasProcess(home, {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true",
        "PAS_PREFETCH__ENABLED": "false",
        "PAS_PREFETCH__DICOMWEB_URL": region_url,
        "PAS_PREFETCH__ALLOW_CLEARTEXT": "true",
        "PAS_SERVING__QUERY_REGION": "true",
        **extra,
    })


def _browse_study(port: int, study: str, out: Path) -> None:
    """A STUDY find of ``study``, as a viewer lists a study before its series."""
    answers, final = _find(port, "-S", "STUDY", [f"StudyInstanceUID={study}",
                                                 "NumberOfStudyRelatedInstances"], out)
    assert final == 0x0000 and len(answers) == 1, answers


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
    NEARLINE. H, held whole, lists its one series ONLINE, once. As a viewer does, the
    study is listed first: the region's count of it (2 here, 1 held) is what tells a SERIES
    search to ask the region."""
    _browse_study(region.pas.port, region.uid["L"], tmp_path / "study")
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
    holds NEARLINE, each once (Patient Root too), the study listed first as a viewer does."""
    _browse_study(region.pas.port, region.uid["L"], tmp_path / "study")
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
    ones, ONLINE, ending Success; the PATIENT search's audit row says "region not asked"
    (connection refused), the SERIES and STUDY searches' after it too, not asked at all:
    the region failed seconds ago (its breaker)."""
    down = closed_port()
    ds = tiny_ct(PatientID="PIDL", PatientName="LOCAL^ONLY")
    ds.save_as(tmp_path / "local.dcm", enforce_file_format=True)
    pas = _asking(tmp_path / "pas", f"http://127.0.0.1:{down.getsockname()[1]}/dicom-web")
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
        studies, final = _find(pas.port, "-S", "STUDY", [
            f"StudyInstanceUID={ds.StudyInstanceUID}", "InstanceAvailability"],
            tmp_path / "study")
        assert final == 0x0000 and [a.InstanceAvailability for _, a in studies] == ["ONLINE"]
        patient_row, series_row, study_row = audit_rows(pas.home, "query")[-3:]
        assert "region not asked" in (patient_row["detail"] or ""), patient_row
        # Not proven held whole (no regional answer said so): it would ask, but the region
        # failed seconds ago (its breaker): not asked, at once.
        assert "region not asked: it failed" in (series_row["detail"] or ""), series_row
        assert "region not asked: it failed" in (study_row["detail"] or ""), study_row
    finally:
        pas.stop()
        down.close()


class BlackHole:
    """A region that accepts connections and never answers (the WAN dropping every answer):
    each C-FIND that asks it waits out ``serving.region_query_timeout_s``. ``accepted``:
    how many connections PAS opened to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    @property
    def accepted(self) -> int:
        return len(self.held)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def black_hole(tmp_path: Path) -> Iterator[tuple[BlackHole, PasProcess, Dataset]]:
    """PAS asking a black-holed region (deadline 2 s: its wait cannot pass for local work),
    holding one study whole."""
    hole = BlackHole()
    ds = tiny_ct(PatientID="PIDW", PatientName="WHOLE^HERE")
    ds.save_as(tmp_path / "whole.dcm", enforce_file_format=True)
    pas = _asking(tmp_path / "pas", f"http://127.0.0.1:{hole.port}/dicom-web",
                  PAS_SERVING__REGION_QUERY_TIMEOUT_S="2")
    try:
        pas.start()
        storescu([tmp_path / "whole.dcm"], pas.port)
        yield hole, pas, ds
    finally:
        pas.stop()
        hole.close()


def _timed_find(port: int, model: str, level: str, keys: list[str], out: Path
                ) -> tuple[list[tuple[int, Dataset]], int, float]:
    started = time.monotonic()
    answers, final = _find(port, model, level, keys, out)
    return answers, final, time.monotonic() - started


def test_with_the_wan_down_a_browse_waits_on_the_region_once(
        black_hole: tuple[BlackHole, PasProcess, Dataset], tmp_path: Path) -> None:
    """The region black-holed, a study held here that no regional answer proved whole: the
    first SERIES find asks the region and waits out the 2 s deadline, once; the IMAGE find
    and the next SERIES find are answered from the index at once (the breaker: it failed
    seconds ago): one connection in all, every answer the local rows, Success. (Asked at
    every browse, s42's first version waited 2 s each; skipping on a count alone, its second
    answered a study held in part without the region's series: review s42b F1.)"""
    hole, pas, ds = black_hole
    series_keys = [f"StudyInstanceUID={ds.StudyInstanceUID}", "SeriesInstanceUID",
                   "InstanceAvailability"]
    series, final, first_s = _timed_find(pas.port, "-S", "SERIES", series_keys,
                                         tmp_path / "series")
    assert final == 0x0000 and [(str(a.SeriesInstanceUID), a.InstanceAvailability)
                                for _, a in series] == [(str(ds.SeriesInstanceUID), "ONLINE")]
    assert first_s >= 2, first_s
    assert "region not asked: no answer within 2.0 s" in (
        audit_rows(pas.home, "query")[-1]["detail"] or "")
    images, final, images_s = _timed_find(pas.port, "-S", "IMAGE", [
        f"StudyInstanceUID={ds.StudyInstanceUID}", f"SeriesInstanceUID={ds.SeriesInstanceUID}",
        "SOPInstanceUID", "InstanceAvailability"], tmp_path / "images")
    assert final == 0x0000 and [str(a.SOPInstanceUID) for _, a in images] == [
        str(ds.SOPInstanceUID)]
    again, final, again_s = _timed_find(pas.port, "-S", "SERIES", series_keys,
                                        tmp_path / "again")
    assert final == 0x0000 and len(again) == 1
    assert max(images_s, again_s) < 1.5, (images_s, again_s)
    assert hole.accepted == 1
    for row in audit_rows(pas.home, "query")[-2:]:
        assert "region not asked: it failed" in (row["detail"] or ""), row


def test_a_study_with_as_many_images_here_as_there_but_not_the_same_lists_both(
        region: Region, tmp_path: Path) -> None:
    """Review s42b F1: E holds one image here and another at the region (one each): the
    study listed first (the region counting 1, 1 held), the SERIES find was not sent to the
    region (a count proved nothing) and answered Success without the region's series. Now
    only the region's confirmations prove a study held whole: both series are listed."""
    _browse_study(region.pas.port, region.uid["E"], tmp_path / "study")
    answers, final = _find(region.pas.port, "-S", "SERIES", [
        f"StudyInstanceUID={region.uid['E']}", "SeriesInstanceUID", "InstanceAvailability"],
        tmp_path / "E")
    assert final == 0x0000
    assert {str(ds.SeriesInstanceUID): ds.InstanceAvailability for _, ds in answers} == {
        region.series["E_there"]: "NEARLINE", region.series["E_here"]: "ONLINE"}


def test_a_region_that_failed_is_not_waited_on_again_at_once(
        black_hole: tuple[BlackHole, PasProcess, Dataset], tmp_path: Path) -> None:
    """The first STUDY find waits out the deadline (2 s) and answers the local study; the
    next ones, and a PATIENT find, are answered at once, the region not asked ("it failed N
    s ago"): one connection to the black hole in all."""
    hole, pas, ds = black_hole
    keys = [f"PatientID={ds.PatientID}", "StudyInstanceUID", "InstanceAvailability"]
    first, final, first_s = _timed_find(pas.port, "-S", "STUDY", keys, tmp_path / "first")
    assert final == 0x0000 and [a.InstanceAvailability for _, a in first] == ["ONLINE"]
    assert first_s >= 2, first_s
    assert "region not asked: no answer within 2.0 s" in (
        audit_rows(pas.home, "query")[-1]["detail"] or "")
    for n, (model, level, more) in enumerate((("-S", "STUDY", []),
                                              ("-P", "PATIENT", PATIENT_KEYS[1:3]))):
        again, final, again_s = _timed_find(pas.port, model, level,
                                            [*(keys if level == "STUDY" else keys[:1]), *more],
                                            tmp_path / f"again{n}")
        assert final == 0x0000 and len(again) == 1
        assert again_s < 1.5, again_s
        detail = audit_rows(pas.home, "query")[-1]["detail"] or ""
        assert re.search(r"region not asked: it failed \d+ s ago \(no answer within 2\.0 s\)",
                         detail), detail
    assert hole.accepted == 1


def test_a_patient_search_cut_by_the_regions_limit_says_so(region: Region,
                                                          tmp_path: Path) -> None:
    """With ``max_results`` = 2 the region is asked ``limit=3`` studies: PIDM's three fill it
    (more patients, or more of PIDM's studies, could be past them), so the answer ends
    Success with what is known and the audit row says "truncated"; PIDC's two do not.

    Cut, the counts of a patient built from the region's studies may miss any of them: they
    are answered empty, 0xFF01 (they were the part's, 0xFF00: PID9, 4 studies at the region
    of which 3 were answered, counted 3 or 4 studies, never knowing). A PATIENT find that
    asks no count is 0xFF00 still, and PIDC's (not cut) has its counts."""
    pas = _asking(tmp_path / "pas", region.region.dicomweb,
                  PAS_SERVING__REGION_QUERY_TIMEOUT_S="10", PAS_SERVING__MAX_RESULTS="2")
    try:
        pas.start()
        for patient, cut in (("PIDM", True), ("PID9", True), ("PIDC", False)):
            answers, final = _find(pas.port, "-P", "PATIENT", [f"PatientID={patient}",
                                   *PATIENT_KEYS[1:]], tmp_path / patient)
            assert final == 0x0000
            (status, ds), = answers
            assert (ds.PatientID, ds.InstanceAvailability) == (patient, "NEARLINE")
            detail = audit_rows(pas.home, "query")[-1]["detail"] or ""
            assert ("truncated: the region answered 3 studies" in detail) == cut, detail
            if cut:
                assert status == 0xFF01
                assert all(ds[k].is_empty for k in PATIENT_KEYS[3:6]), ds
                assert "counts of the patients the region matched not given" in detail, detail
            else:
                assert (status, _counts(ds)) == (0xFF00, (2, 2, 2))
        uncounted, final = _find(pas.port, "-P", "PATIENT", [
            "PatientID=PIDM", "PatientName", "InstanceAvailability"], tmp_path / "names")
        assert final == 0x0000
        assert [(s, str(a.PatientName)) for s, a in uncounted] == [(0xFF00, "DOE^JOHN")]
        # A patient held here only, matched with others the cut answer lists: its studies at
        # the region may be past the cut too, so it is uncounted as well (review s42b F2: it
        # was counted from this site's studies alone, 0xFF00).
        local = tiny_ct(PatientID="PIDLOCAL", PatientName="HERE^ONLY")
        local.save_as(tmp_path / "local.dcm", enforce_file_format=True)
        storescu([tmp_path / "local.dcm"], pas.port)
        every, final = _find(pas.port, "-P", "PATIENT", ["PatientID=PID*", *PATIENT_KEYS[1:]],
                             tmp_path / "every")
        assert final == 0x0000
        found = _by("PatientID", every)
        assert "PIDLOCAL" in found
        assert all(status == 0xFF01 and all(ds[k].is_empty for k in PATIENT_KEYS[3:6])
                   for status, ds in found.values()), found
    finally:
        pas.stop()
