"""The regional C-FIND (``serving.query_region``) with answers the first fixes did not expect
(review s40/2a), each against a real daemon and findscu:

- a region holding a study whose UID the index would refuse (a letter in it): its UIDs were
  looked up in the index, whose QueryError failed the whole C-FIND (0xC311, one local
  answer sent, no audit row). Such a study is held nowhere here: answered NEARLINE.
- a region whose series search leaves StudyInstanceUID out (PS3.18 does not require the
  study's attributes in a search scoped to one study): KeyError, 0xC311. The UID the query
  pinned is the answer's.
- ``serving.max_results`` with a key held back from the region (a value holding a comma):
  the region was asked ``limit = max_results + 1`` and only those rows checked, so a
  matching study past them was missing while the answer ended Success."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.cleanup import started
from tests.support.objects import tiny_ct
from tests.support.peers import (
    DCMTK_ENV,
    Orthanc,
    PasProcess,
    read_rows,
    storescu,
    wait_for,
)
from tests.support.serving import serve_in_thread

ODD_UID = "1.2.826.0.1.3680043.8.498.77A"
STUDY = "1.2.826.0.1.3680043.8.498.4242"
SERIES = "1.2.826.0.1.3680043.8.498.4242.1"


def _region_env(url: str, **more: str) -> dict[str, str]:
    return {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
            "PAS_PREFETCH__DICOMWEB_URL": url, "PAS_PREFETCH__ALLOW_CLEARTEXT": "true",
            "PAS_SERVING__QUERY_REGION": "true", "PAS_SERVING__REGION_QUERY_TIMEOUT_S": "10",
            **more}


def _find(pas: PasProcess, keys: list[str], out: Path) -> tuple[list[str], list[dict]]:
    """findscu (Study Root): (every DIMSE status, the answers' keys as text)."""
    out.mkdir(parents=True)
    args = ["findscu", "-d", "-S", "-aet", "VIEWER", "-aec", "PAS", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([*args, "127.0.0.1", str(pas.port)], env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", result.stderr)
    answers = [{element.keyword: str(element.value) for element in dcmread(p)}
               for p in sorted(out.glob("rsp*.dcm"))]
    return [s.upper() for s in statuses], answers


@pytest.fixture(scope="module")
def orthanc_region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Orthanc holding: PIDX's study with an odd UID and a normal one; PIDZ's six studies,
    the one of AccessionNumber "X,1" received last."""
    root = tmp_path_factory.mktemp("region-odd")
    data = root / "data"
    data.mkdir()
    made = {"local": tiny_ct(None, None, PatientID="PIDX", StudyDate="20240101"),
            "odd": tiny_ct(ODD_UID, None, PatientID="PIDX", StudyDate="20230101"),
            "good": tiny_ct(None, None, PatientID="PIDX", StudyDate="20220101")}
    for n in range(6):
        made[f"z{n}"] = tiny_ct(None, None, PatientID="PIDZ", StudyDate=f"2020010{n + 1}",
                                AccessionNumber="X,1" if n == 5 else f"ACC{n}")
    for name, ds in made.items():
        ds.save_as(data / f"{name}.dcm", enforce_file_format=True)
    with contextlib.ExitStack() as stack:
        region = started(stack, Orthanc(root / "region"))
        storescu([data / "local.dcm", data / "odd.dcm", data / "good.dcm"],
                 region.dicom_port, host=region.host, called="ORTHANC")
        for n in range(6):  # one at a time: "X,1" last in the region's order
            storescu([data / f"z{n}.dcm"], region.dicom_port, host=region.host,
                     called="ORTHANC")
        yield {"region": region, "data": data,
               "uid": {name: str(ds.StudyInstanceUID) for name, ds in made.items()}}


def test_a_regional_study_with_a_uid_the_index_refuses_does_not_fail_the_find(
        orthanc_region: dict, tmp_path: Path) -> None:
    pas = PasProcess(tmp_path / "pas", _region_env(orthanc_region["region"].dicomweb)).start()
    try:
        storescu([orthanc_region["data"] / "local.dcm"], pas.port)
        statuses, answers = _find(pas, ["QueryRetrieveLevel=STUDY", "PatientID=PIDX",
                                        "StudyInstanceUID", "InstanceAvailability"],
                                  tmp_path / "find")
        assert statuses[-1] == "0000", statuses
        found = {a["StudyInstanceUID"]: a["InstanceAvailability"] for a in answers}
        uid = orthanc_region["uid"]
        assert found == {uid["local"]: "ONLINE", ODD_UID: "NEARLINE",
                         uid["good"]: "NEARLINE"}, found
        assert "Traceback" not in pas.log()
        # The query is in the audit trail (the failure skipped the row).
        rows = wait_for(lambda: read_rows(pas.home / "pas.sqlite",
                                          "SELECT outcome FROM audit WHERE event = 'query'"),
                        10, what="the query's audit row")
        assert [r[0] for r in rows] == ["success"]
    finally:
        pas.stop()


def test_a_key_held_back_is_checked_on_every_regional_study_whatever_max_results(
        orthanc_region: dict, tmp_path: Path) -> None:
    pas = PasProcess(tmp_path / "pas", _region_env(orthanc_region["region"].dicomweb,
                                                  PAS_SERVING__MAX_RESULTS="2")).start()
    try:
        statuses, answers = _find(pas, ["QueryRetrieveLevel=STUDY", "PatientID=PIDZ",
                                        "AccessionNumber=X,1", "StudyInstanceUID"],
                                  tmp_path / "find")
        assert statuses[-1] == "0000", statuses
        assert [a["StudyInstanceUID"] for a in answers] == [orthanc_region["uid"]["z5"]]
    finally:
        pas.stop()


class _SeriesWithoutStudy(BaseHTTPRequestHandler):
    """A QIDO-RS region whose series search returns no StudyInstanceUID (allowed)."""

    def do_GET(self) -> None:  # noqa: N802
        body = []
        if self.path.startswith(f"/dicom-web/studies/{STUDY}/series"):
            body = [{"0020000E": {"vr": "UI", "Value": [SERIES]},
                     "00080060": {"vr": "CS", "Value": ["CT"]},
                     "00201209": {"vr": "IS", "Value": [3]}}]
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_a_regional_series_row_without_its_study_uid_is_answered_with_the_querys(
        tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SeriesWithoutStudy)
    serve_in_thread(server)
    pas = PasProcess(tmp_path / "pas", _region_env(
        f"http://127.0.0.1:{server.server_port}/dicom-web")).start()
    try:
        statuses, answers = _find(pas, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={STUDY}",
                                        "SeriesInstanceUID", "Modality"], tmp_path / "find")
        assert statuses == ["FF00", "0000"], statuses
        assert [(a["StudyInstanceUID"], a["SeriesInstanceUID"], a["Modality"])
                for a in answers] == [(STUDY, SERIES, "CT")]
    finally:
        pas.stop()
        server.shutdown()
        server.server_close()
