"""C-FIND / C-MOVE / C-GET served by PAS, DCMTK as the viewer, a real Orthanc as the yardstick.

PAS and Orthanc hold the same files (the real CT and MR sets); every query is sent to both in
the same test and the UIDs (and counts) returned must be the same. Retrieves are checked by
SHA-256: what a viewer gets from PAS is the stored dataset byte for byte when it accepts the
stored transfer syntax, and a decompressed copy (same pixels, same UIDs) when it does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom.dsutils import split_dataset

from tests.support.cleanup import started
from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    MR_DIR,
    NetNamespace,
    Orthanc,
    PasProcess,
    StoreSCP,
    closed_port,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.root
JPEG_LS_FILE = Path(get_testdata_file("emri_small_jpeg_ls_lossless.dcm"))  # type: ignore[arg-type]


class Site:
    """PAS and Orthanc loaded with the same files, plus a storescp both can reach."""

    def __init__(self, root: Path):
        self.root = root
        with contextlib.ExitStack() as stack:  # a step that raises stops those started
            self.ns = NetNamespace("qr").create()
            stack.callback(self.ns.delete)
            # storescp listens on every address: PAS reaches it on loopback, Orthanc (inside
            # its namespace) on the namespace's outer address.
            self.scp = started(stack, StoreSCP(root / "scp"))
            self.implicit_scp = started(stack, StoreSCP(root / "implicit", ae_title="IMPLICIT"),
                                        ["+xi"])
            self.orthanc = started(stack, Orthanc(root / "orthanc", ns=self.ns, modalities={
                "STORESCP": ["STORESCP", self.ns.outer_address, self.scp.port],
                "VIEWER": ["VIEWER", self.ns.outer_address, self.scp.port]}))
            self.switched_off = closed_port()  # refuses connections while the module runs
            stack.callback(self.switched_off.close)
            # Orthanc fills while PAS starts and fills (each in the same order as before):
            # one after the other they took 10-13 s of the module's set-up.
            pool = ThreadPoolExecutor(1)
            stack.callback(pool.shutdown)  # should a step raise: the fill ends before the stops
            orthanc_filled = pool.submit(self._fill_orthanc)
            self.pas = started(stack, PasProcess(root / "pas", {
                "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                # What is served, not how it was stored: the store's fsync has its own tests.
                "PAS_STORAGE__FSYNC": "false",
                "PAS_SERVING__MOVE_DESTINATIONS":
                    f'[{{title = "STORESCP", host = "127.0.0.1", port = {self.scp.port}}}, '
                    f'{{title = "IMPLICIT", host = "127.0.0.1", '
                    f'port = {self.implicit_scp.port}}}, '
                    f'{{title = "SWITCHEDOFF", host = "127.0.0.1", '
                    f'port = {self.switched_off.getsockname()[1]}}}]',
            }))
            for folder in (CT_DIR, MR_DIR):
                storescu(folder, self.pas.port)
            storescu(JPEG_LS_FILE, self.pas.port, extra=["-xt"])
            orthanc_filled.result()
            pool.shutdown()
            stack.pop_all()  # set up: stop() stops them from now on

    def _fill_orthanc(self) -> None:
        for folder in (CT_DIR, MR_DIR):
            storescu(folder, self.orthanc.dicom_port, host=self.orthanc.host, called="ORTHANC")

    def stop(self) -> None:
        self.pas.stop()
        self.orthanc.stop()
        self.scp.stop()
        self.implicit_scp.stop()
        self.switched_off.close()
        self.ns.delete()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    site = Site(tmp_path_factory.mktemp("qr"))
    try:
        yield site
    finally:
        site.stop()


def dcmtk(tool: str, host: str, port: int, called: str, keys: list[str], *extra: str,
          out: Path | None = None) -> subprocess.CompletedProcess[str]:
    args = [tool, "-v", "-aet", "VIEWER", "-aec", called, *extra]
    for key in keys:
        args += ["-k", key]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        args += ["-od", str(out)]
    return subprocess.run([*args, host, str(port)], env=DCMTK_ENV, capture_output=True,
                          text=True, timeout=120)


def find(site: Site, target: str, keys: list[str], model: str, tmp: Path) -> list[Any]:
    """findscu against PAS or Orthanc; the response identifiers as datasets."""
    out = tmp / f"find-{target}-{abs(hash(tuple(keys)))}"
    if target == "pas":
        result = dcmtk("findscu", "127.0.0.1", site.pas.port, "PAS", keys, model, "-X", out=out)
    else:
        result = dcmtk("findscu", site.orthanc.host, site.orthanc.dicom_port, "ORTHANC", keys,
                       model, "-X", out=out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Error:" not in result.stderr, result.stderr[-2000:]
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


CT_PATIENT = "A002304"
CASES = [
    # (model, level, keys, the attribute whose values are compared)
    ("-S", "STUDY", ["StudyInstanceUID="], "StudyInstanceUID"),
    ("-S", "STUDY", ["PatientID=A0*", "StudyInstanceUID="], "StudyInstanceUID"),
    ("-S", "STUDY", ["PatientID=A00230?", "StudyInstanceUID="], "StudyInstanceUID"),
    ("-S", "STUDY", [f"PatientName={CT_PATIENT.lower()}", "StudyInstanceUID="],
     "StudyInstanceUID"),
    ("-S", "STUDY", ["PatientName=*9*", "StudyInstanceUID="], "StudyInstanceUID"),
    ("-S", "STUDY", ["StudyDate=19000101-19001031", "StudyInstanceUID="], "StudyInstanceUID"),
    ("-S", "STUDY", ["StudyDate=-19001001", "StudyInstanceUID="], "StudyInstanceUID"),
    ("-S", "STUDY", ["StudyDate=20190101-", "StudyInstanceUID="], "StudyInstanceUID"),
    ("-S", "STUDY", ["StudyTime=000000-120000", "StudyInstanceUID="], "StudyInstanceUID"),
    ("-S", "STUDY", ["ModalitiesInStudy=MR", "StudyInstanceUID="], "StudyInstanceUID"),
    ("-S", "STUDY", ["ModalitiesInStudy=", "StudyInstanceUID="], "ModalitiesInStudy"),
    ("-S", "STUDY", ["StudyInstanceUID=", "NumberOfStudyRelatedInstances="],
     "NumberOfStudyRelatedInstances"),
    ("-S", "STUDY", ["StudyInstanceUID=", "NumberOfStudyRelatedSeries="],
     "NumberOfStudyRelatedSeries"),
    ("-S", "SERIES", ["Modality=CT", "SeriesInstanceUID="], "SeriesInstanceUID"),
    ("-S", "SERIES", ["SeriesInstanceUID=", "NumberOfSeriesRelatedInstances="],
     "NumberOfSeriesRelatedInstances"),
    ("-S", "IMAGE", ["Modality=MR", "SOPInstanceUID="], "SOPInstanceUID"),
    ("-S", "IMAGE", ["InstanceNumber=1", "SOPInstanceUID="], "SOPInstanceUID"),
    # An image's geometry (schema 18): PAS answered these empty.
    ("-S", "IMAGE", ["SOPInstanceUID=", "Rows="], "Rows"),
    ("-S", "IMAGE", ["SOPInstanceUID=", "Columns="], "Columns"),
    ("-S", "IMAGE", ["SOPInstanceUID=", "BitsAllocated=", "NumberOfFrames="], "BitsAllocated"),
    ("-P", "PATIENT", ["PatientID=*", "PatientName="], "PatientID"),
    ("-P", "PATIENT", ["PatientID=", "NumberOfPatientRelatedStudies="],
     "NumberOfPatientRelatedStudies"),
    ("-P", "STUDY", [f"PatientID={CT_PATIENT}", "StudyInstanceUID="], "StudyInstanceUID"),
]


def _values(datasets: list[Any], keyword: str) -> list[str]:
    values = []
    for ds in datasets:
        value = ds.get(keyword)
        values.append("\\".join(map(str, value)) if isinstance(value, list | tuple)
                      or type(value).__name__ == "MultiValue" else str(value))
    return sorted(values)


@pytest.mark.parametrize(("model", "level", "keys", "compare"), CASES,
                         ids=[f"{c[1]}:{'|'.join(c[2])}" for c in CASES])
def test_find_matches_orthanc(site: Site, tmp_path: Path, model: str, level: str,
                              keys: list[str], compare: str) -> None:
    keys = [f"QueryRetrieveLevel={level}", *keys]
    if level in ("SERIES", "IMAGE") and not any(k.startswith("StudyInstanceUID") for k in keys):
        keys.append("StudyInstanceUID=")
    from_pas = find(site, "pas", keys, model, tmp_path)
    from_orthanc = find(site, "orthanc", keys, model, tmp_path)
    # The JPEG-LS sample lives only in PAS; leave its patient out of the comparison.
    sample = dcmread(JPEG_LS_FILE, stop_before_pixels=True)
    only_in_pas = {("StudyInstanceUID", str(sample.StudyInstanceUID)),
                   ("SeriesInstanceUID", str(sample.SeriesInstanceUID)),
                   ("SOPInstanceUID", str(sample.SOPInstanceUID)),
                   ("PatientID", str(sample.PatientID))}
    from_pas = [ds for ds in from_pas
                if not any(k in ds and str(ds.get(k)) == v for k, v in only_in_pas)]
    assert from_orthanc, "the yardstick returned nothing: the case tests nothing"
    assert _values(from_pas, compare) == _values(from_orthanc, compare)
    # Only the keys asked for come back (plus the level, and the character set if needed).
    asked = {k.split("=")[0] for k in keys}
    for ds in from_pas:
        assert {e.keyword for e in ds} - {"SpecificCharacterSet"} <= asked


def test_qido_instances_give_the_image_attributes_orthanc_gives(site: Site) -> None:
    """QIDO-RS instance searches of every study of both sets: each instance's Rows, Columns,
    BitsAllocated and NumberOfFrames (PS3.18 Table 10.6.3-5), or their absence, as Orthanc's
    DICOMweb plugin gives them. PAS gave none."""
    import httpx

    pas = f"http://127.0.0.1:{site.pas.http_port}/dicom-web"
    tags = ("00280010", "00280011", "00280100", "00280008")
    studies = [item["0020000D"]["Value"][0]
               for item in httpx.get(f"{site.orthanc.dicomweb}/studies", timeout=60).json()]
    given: dict[str, dict[str, Any]] = {}
    for study in studies:
        answers = [{item["00080018"]["Value"][0]: {tag: item.get(tag) for tag in tags}
                    for item in httpx.get(f"{base}/studies/{study}/instances",
                                          timeout=60).json()}
                   for base in (pas, site.orthanc.dicomweb)]
        assert answers[0] == answers[1], study
        given.update(answers[0])
    assert len(given) == 580  # 582 files, two of which repeat a SOP Instance UID
    geometry = {tuple(attribute and attribute["Value"][0] for attribute in values.values())
                for values in given.values()}
    assert {(512, 512, 16, None), (64, 64, 16, None)} <= geometry  # CT, MR
    assert all(None not in values[:3] and values[3] is None  # single frames
               for values in geometry), geometry


def test_find_returns_requested_keys_with_values(site: Site, tmp_path: Path) -> None:
    keys = ["QueryRetrieveLevel=STUDY", f"PatientID={CT_PATIENT}", "PatientName=",
            "StudyDate=", "AccessionNumber=", "StudyInstanceUID=", "PatientSex="]
    studies = find(site, "pas", keys, "-S", tmp_path)
    assert len(studies) == 2  # the current exam and its prior
    for ds in studies:
        assert str(ds.PatientName) == CT_PATIENT
        assert len(ds.StudyDate) == 8
        assert ds.PatientSex == "M"
        assert "AccessionNumber" in ds  # asked, empty in the data: present and empty


def _dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _stored(site: Site, folder: Path) -> dict[str, bytes]:
    """SOP Instance UID -> SHA-256 of the dataset (after the file meta) of each file PAS
    stored for the originals in ``folder`` (storescu may re-encode a file's dataset when
    sending, so PAS's copy, not the file on disk, is what a viewer must get unchanged)."""
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.glob("*.dcm")}
    conn = sqlite3.connect(site.pas.home / "pas.sqlite")
    try:
        rows = conn.execute("SELECT sop_instance_uid, path FROM instances WHERE is_current = 1")
        paths = {uid: path for uid, path in rows if uid in uids}
    finally:
        conn.close()
    assert set(paths) == uids
    spool = site.pas.home / "spool"
    return {uid: hashlib.sha256(_dataset_bytes(spool / path)).digest()
            for uid, path in paths.items()}


def _received(folder: Path) -> dict[str, bytes]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID):
            hashlib.sha256(_dataset_bytes(p)).digest()
            for p in folder.rglob("*") if p.is_file()}


def _one_ct_study() -> str:
    path = next(iter(sorted(CT_DIR.glob(f"{CT_PATIENT}_*.dcm"))))
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_move_study_bit_exact_same_uids_as_orthanc(site: Site, tmp_path: Path) -> None:
    study = _one_ct_study()
    originals = _stored(site, CT_DIR)
    for target, host, port, called in (
        ("orthanc", site.orthanc.host, site.orthanc.dicom_port, "ORTHANC"),
        ("pas", "127.0.0.1", site.pas.port, "PAS"),
    ):
        for old in site.scp.files():
            old.unlink()
        result = dcmtk("movescu", host, port, called,
                       ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"],
                       "-S", "-aem", "STORESCP")
        assert result.returncode == 0, result.stderr[-2000:]
        received = wait_for(lambda: _received(site.scp.folder) or None, 30,
                            what=f"files moved from {target}")
        if target == "orthanc":
            expected = set(received)
            assert expected, "Orthanc moved nothing: the comparison tests nothing"
        else:
            assert set(received) == expected
            for uid, digest in received.items():
                assert digest == originals[uid], f"{uid}: bytes differ from the original"
            assert "Received Final Move Response (Success)" in result.stderr


def test_get_mr_series_bit_exact(site: Site, tmp_path: Path) -> None:
    series = str(dcmread(next(iter(MR_DIR.glob("*.dcm"))), stop_before_pixels=True)
                 .SeriesInstanceUID)
    out = tmp_path / "get"
    result = dcmtk("getscu", "127.0.0.1", site.pas.port, "PAS",
                   ["QueryRetrieveLevel=SERIES", f"SeriesInstanceUID={series}"], "-S", "+B",
                   out=out)
    assert result.returncode == 0, result.stderr[-2000:]
    received = _received(out)
    assert received == _stored(site, MR_DIR)
    assert len(received) == 520


def test_move_of_520_images_sends_progress_not_a_pending_per_image(site: Site) -> None:
    """serving.retrieve_pending_interval_s (0.1 s): Pending responses are optional
    (PS3.4 C.4.2.1.4); a few carry the progress, the final response the counts."""
    study = str(dcmread(next(iter(MR_DIR.glob("*.dcm"))), stop_before_pixels=True)
                .StudyInstanceUID)
    for old in site.scp.files():
        old.unlink()
    result = dcmtk("movescu", "127.0.0.1", site.pas.port, "PAS",
                   ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"], "-S", "-d",
                   "-aem", "STORESCP")
    # movescu -d: "I: Received Move Response N" (pending) or "... Final Move Response", each
    # followed by its counts.
    pendings = re.findall(r"Received Move Response \d+\n", result.stderr)
    final = result.stderr.split("Received Final Move Response")
    assert len(final) == 2, result.stderr[-2000:]
    assert "0x0000: Success" in final[1], final[1][-2000:]
    assert re.search(r"Completed Suboperations\s*:\s*520\n", final[1]), final[1][-2000:]
    assert 1 <= len(pendings) < 520, len(pendings)
    received = wait_for(lambda: len(_received(site.scp.folder)) >= 520 and
                        _received(site.scp.folder), 30, what="520 moved images")
    assert received == _stored(site, MR_DIR)


def _jpeg_ls_study() -> tuple[str, str]:
    ds = dcmread(JPEG_LS_FILE)
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


def test_get_decompresses_for_a_viewer_without_jpeg_ls(site: Site, tmp_path: Path) -> None:
    study, sop = _jpeg_ls_study()
    out = tmp_path / "get-jls"
    # getscu proposes only uncompressed syntaxes unless told otherwise.
    result = dcmtk("getscu", "127.0.0.1", site.pas.port, "PAS",
                   ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"], "-S", out=out)
    assert result.returncode == 0, result.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 1
    got = dcmread(files[0])
    assert str(got.SOPInstanceUID) == sop
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(got.pixel_array, dcmread(JPEG_LS_FILE).pixel_array)


def test_move_decompresses_for_implicit_only_destination(site: Site) -> None:
    study, sop = _jpeg_ls_study()
    result = dcmtk("movescu", "127.0.0.1", site.pas.port, "PAS",
                   ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"],
                   "-S", "-aem", "IMPLICIT")
    assert result.returncode == 0, result.stderr[-2000:]
    files = wait_for(lambda: site.implicit_scp.files() or None, 30, what="moved JPEG-LS file")
    got = dcmread(files[0])
    assert str(got.SOPInstanceUID) == sop
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"  # implicit VR LE
    assert np.array_equal(got.pixel_array, dcmread(JPEG_LS_FILE).pixel_array)


def _audit(site: Site, event: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(site.pas.home / "pas.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM audit WHERE event = ? ORDER BY id",
                            (event,)).fetchall()
    finally:
        conn.close()


def test_unknown_move_destination_is_a801_and_changes_nothing(site: Site,
                                                              tmp_path: Path) -> None:
    for old in site.scp.files():
        old.unlink()
    result = dcmtk("movescu", "127.0.0.1", site.pas.port, "PAS",
                   ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={_one_ct_study()}"],
                   "-S", "-aem", "NOWHERE")
    assert "a801" in result.stderr.lower() or "MoveDestinationUnknown" in result.stderr
    assert site.scp.files() == []
    (refused,) = [r for r in _audit(site, "retrieve") if "NOWHERE" in (r["outcome"] or "")]
    # The row names what was asked, so that pas audit --study finds the refusal too.
    assert refused["target"] == f"STUDY StudyInstanceUID={_one_ct_study()}", dict(refused)
    # The daemon keeps serving.
    assert find(site, "pas", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID="], "-S",
                tmp_path)


@pytest.mark.parametrize(("keys", "named"), [
    (["QueryRetrieveLevel=FOO", "StudyInstanceUID="], "QueryRetrieveLevel"),
    (["QueryRetrieveLevel=STUDY", "StudyDate=yesterday"], "StudyDate"),
    (["QueryRetrieveLevel=STUDY", "StudyDate=20201301"], "StudyDate"),  # was: 0 matches
    (["QueryRetrieveLevel=STUDY", "StudyInstanceUID=not-a-uid"], "StudyInstanceUID"),
    (["QueryRetrieveLevel=PATIENT", "PatientID="], "Patient Root"),
])
def test_malformed_query_is_refused_naming_the_problem(site: Site, tmp_path: Path,
                                                       keys: list[str], named: str) -> None:
    before = len(_audit(site, "query"))
    result = dcmtk("findscu", "127.0.0.1", site.pas.port, "PAS", keys, "-S")
    assert "Received Final Find Response (Error:" in result.stderr, result.stderr[-1000:]
    assert "Pending" not in result.stderr
    rows = _audit(site, "query")
    assert len(rows) == before + 1 and named in rows[-1]["outcome"]
    # The daemon keeps serving others.
    assert find(site, "pas", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID="], "-S",
                tmp_path)


def test_move_without_unique_key_is_refused(site: Site) -> None:
    for old in site.scp.files():
        old.unlink()
    result = dcmtk("movescu", "127.0.0.1", site.pas.port, "PAS",
                   ["QueryRetrieveLevel=STUDY", "PatientID=*"], "-S", "-aem", "STORESCP")
    assert "Final Move Response (Failed" in result.stderr or "Error" in result.stderr, \
        result.stderr[-1000:]
    assert site.scp.files() == []
    refused = _audit(site, "retrieve")[-1]
    assert "StudyInstanceUID: required" in refused["outcome"]
    assert refused["target"] == "STUDY PatientID=*", dict(refused)


def test_every_query_and_retrieve_is_audited(site: Site, tmp_path: Path) -> None:
    before_q, before_r = len(_audit(site, "query")), len(_audit(site, "retrieve"))
    find(site, "pas", ["QueryRetrieveLevel=STUDY", f"PatientID={CT_PATIENT}",
                       "StudyInstanceUID="], "-S", tmp_path)
    dcmtk("getscu", "127.0.0.1", site.pas.port, "PAS",
          ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={_one_ct_study()}"], "-S",
          out=tmp_path / "audit-get")
    queries, retrieves = _audit(site, "query"), _audit(site, "retrieve")
    assert len(queries) == before_q + 1
    assert queries[-1]["actor"] == "VIEWER" and queries[-1]["outcome"] == "success"
    assert CT_PATIENT in queries[-1]["target"] and "2 results" in queries[-1]["detail"]
    assert len(retrieves) == before_r + 1
    assert _one_ct_study() in retrieves[-1]["target"]


def test_move_to_a_destination_that_is_down_fails_and_pas_keeps_serving(
        site: Site, tmp_path: Path) -> None:
    result = dcmtk("movescu", "127.0.0.1", site.pas.port, "PAS",
                   ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={_one_ct_study()}"],
                   "-S", "-aem", "SWITCHEDOFF")
    # Known, not reached: every sub-operation failed (0xA702), not "destination unknown"
    # (pynetdicom's 0xA801; tests/test_serving_move_not_up.py).
    assert "Final Move Response (Refused: OutOfResourcesSubOperations)" in result.stderr, \
        result.stderr[-1000:]
    last = wait_for(lambda: (rows := _audit(site, "retrieve")) and "SWITCHEDOFF" in
                    (rows[-1]["detail"] or "") and rows[-1], 10, what="the audit row")
    assert last["outcome"].startswith("failure") and last["outcome"].endswith(
        ": could not connect (refused or no answer))"), last["outcome"]
    assert find(site, "pas", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID="], "-S",
                tmp_path)
