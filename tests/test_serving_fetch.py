"""Fetch-through and regional C-FIND: a study only the region holds reaches movescu via PAS.

The region is a real Orthanc (DICOMweb plugin) in its own network namespace behind a real
hub; PAS, enrolled, reaches it through the hub's mutual-TLS proxy. "WAN down" is the region's
link taken down: packets vanish, nothing answers, and C-FIND must still answer from local
data.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom.dsutils import split_dataset

from appliance.transfer.region import RegionClient
from tests.support.cleanup import started
from tests.support.hub import HubProcess, enroll
from tests.support.objects import tiny_ct
from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    Orthanc,
    PasProcess,
    StoreSCP,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.root
REGIONAL_PATIENT = "A002304"   # both of its studies are only at the region
LOCAL_PATIENT = "A027284"      # stored at PAS directly


class Setup:
    """Orthanc (the regional archive) behind a real hub (``pas hub run``, mutual TLS, the
    ``/api/v1/region/dicom-web`` proxy); PAS enrolled with ``pas enroll``."""

    def __init__(self, root: Path):
        with contextlib.ExitStack() as stack:  # a step that raises stops those started
            self.scp = started(stack, StoreSCP(root / "scp"))
            self.region = started(stack, Orthanc(root / "region"))
            storescu(sorted(CT_DIR.glob(f"{REGIONAL_PATIENT}_*.dcm")), self.region.dicom_port,
                     host=self.region.host, called="ORTHANC")
            self.hub = started(stack, HubProcess(root / "hub", {
                "PAS_HUB_ARCHIVE__KIND": "dicomweb",
                "PAS_HUB_ARCHIVE__URL": self.region.dicomweb}).init())
            enroll(self.hub, root / "pas", "SITE-A")
            self.pas = started(stack, PasProcess(root / "pas", {
                "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                "PAS_PREFETCH__ENABLED": "false",
                "PAS_SERVING__QUERY_REGION": "true",
                "PAS_SERVING__REGION_QUERY_TIMEOUT_S": "0.5",
                "PAS_SERVING__MOVE_DESTINATIONS":
                    f'[{{title = "STORESCP", host = "127.0.0.1", port = {self.scp.port}}}]',
            }))
            storescu(sorted(CT_DIR.glob(f"{LOCAL_PATIENT}_*.dcm")), self.pas.port)
            stack.pop_all()  # set up: stop() stops them from now on

    def stop(self) -> None:
        self.pas.stop()
        self.hub.stop()
        self.region.stop()
        self.scp.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("fetch"))
    try:
        yield s
    finally:
        s.stop()


def _studies(patient: str) -> list[str]:
    return sorted({str(dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                   for p in CT_DIR.glob(f"{patient}_*.dcm")})


def _findscu(pas: PasProcess, keys: list[str], out: Path) -> tuple[str, list]:
    out.mkdir(parents=True, exist_ok=True)
    args = ["findscu", "-v", "-S", "-aet", "VIEWER", "-aec", "PAS", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([*args, "127.0.0.1", str(pas.port)], env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr, [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _audit_queries(pas: PasProcess) -> list[sqlite3.Row]:
    conn = sqlite3.connect(pas.home / "pas.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM audit WHERE event = 'query' ORDER BY id").fetchall()
    finally:
        conn.close()


def _move_study(setup: Setup, study_uid: str) -> subprocess.CompletedProcess[str]:
    """movescu as the viewer: the study moved to the test's storescp (STORESCP)."""
    return subprocess.run(
        ["movescu", "-v", "-S", "-aet", "VIEWER", "-aec", "PAS", "-aem", "STORESCP",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
         "127.0.0.1", str(setup.pas.port)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=120)


def _dataset_sha(content: bytes, path: Path) -> str:
    path.write_bytes(content)
    _, offset = split_dataset(path)
    return hashlib.sha256(content[offset:]).hexdigest()


def test_cfind_includes_regional_studies_marked_nearline(setup: Setup, tmp_path: Path) -> None:
    # A date range, not a wildcard: the hub's proxy forwards "*" as "%2A", which Orthanc
    # matches literally (reported to the hub's owner).
    stderr, answers = _findscu(setup.pas, ["QueryRetrieveLevel=STUDY",
                                           "StudyDate=19000901-19010131",
                                           "StudyInstanceUID=", "InstanceAvailability="],
                               tmp_path / "find")
    availability = {str(a.StudyInstanceUID): a.InstanceAvailability for a in answers}
    for uid in _studies(REGIONAL_PATIENT):
        assert availability[uid] == "NEARLINE"
    for uid in _studies(LOCAL_PATIENT):
        assert availability[uid] == "ONLINE"
    assert len(availability) == 4


def test_regional_cfind_forwards_issuer_of_patient_id(setup: Setup, tmp_path: Path) -> None:
    """Two patients of two hospitals share PatientID ISSUED at the region (one study each):
    a C-FIND giving IssuerOfPatientID gets that patient's study only. The key was not
    forwarded to the region (QIDO-RS), whose answers then held the other issuer's study too,
    although PAS matches the issuer locally. Orthanc's QIDO-RS matches it (checked: direct,
    with a keyword or a tag); the issuer it answers is in the C-FIND answer."""
    studies = {}
    paths = []
    for issuer in ("HOSP_A", "HOSP_B"):
        ds = tiny_ct(PatientID="ISSUED", IssuerOfPatientID=issuer, PatientName=f"P^{issuer}")
        paths.append(tmp_path / f"{issuer}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
        studies[issuer] = str(ds.StudyInstanceUID)
    storescu(paths, setup.region.dicom_port, host=setup.region.host, called="ORTHANC")
    _, answers = _findscu(setup.pas, ["QueryRetrieveLevel=STUDY", "PatientID=ISSUED",
                                      "StudyInstanceUID="], tmp_path / "both")
    assert sorted(str(a.StudyInstanceUID) for a in answers) == sorted(studies.values())
    for issuer in studies:
        stderr, answers = _findscu(setup.pas, [
            "QueryRetrieveLevel=STUDY", "PatientID=ISSUED", f"IssuerOfPatientID={issuer}",
            "StudyInstanceUID=", "PatientName=", "InstanceAvailability="],
            tmp_path / issuer)
        assert "Final Find Response (Success)" in stderr, stderr[-2000:]
        assert [(str(a.StudyInstanceUID), str(a.IssuerOfPatientID), str(a.PatientName),
                 a.InstanceAvailability) for a in answers] == [
            (studies[issuer], issuer, f"P^{issuer}", "NEARLINE")]
        assert "region not asked" not in (_audit_queries(setup.pas)[-1]["detail"] or "")


def test_move_of_a_regional_study_fetches_then_serves(setup: Setup, tmp_path: Path) -> None:
    study = _studies(REGIONAL_PATIENT)[0]
    result = _move_study(setup, study)
    assert result.returncode == 0 and "Final Move Response (Success)" in result.stderr, \
        result.stderr[-2000:]
    files = wait_for(lambda: (f := setup.scp.files()) and len(f) == 3 and f, 30,
                     what="3 files moved")
    # Byte for byte what the region holds (dataset after the file meta).
    region_ids = setup.region.get(f"/studies/{_orthanc_study(setup, study)}/instances").json()
    expected = {_dataset_sha(setup.region.instance_file(i["ID"]), tmp_path / "r.dcm")
                for i in region_ids}
    got = {_dataset_sha(f.read_bytes(), tmp_path / "g.dcm") for f in files}
    assert got == expected and len(expected) == 3
    conn = sqlite3.connect(setup.pas.home / "pas.sqlite")
    origin = conn.execute("SELECT origin FROM studies WHERE study_uid = ?", (study,)).fetchone()
    conn.close()
    assert origin == ("regional",)
    # By the hub's bucketed download (one packed stream), not one WADO-RS per instance.
    assert f"fetched 3 instances of {study} from the region (bucketed download)" in \
        setup.pas.log(), setup.pas.log()[-2000:]
    # The miss and the bytes it brought down are visible to operations.
    metrics = httpx.get(f"http://127.0.0.1:{setup.pas.http_port}/metrics", timeout=10).text
    misses = re.search(r'^pas_retrieve_requests_total\{channel="dicom",result="miss"\} (\S+)',
                       metrics, re.M)
    down = re.search(r'^pas_wan_bytes_total\{direction="down"\} (\S+)', metrics, re.M)
    assert misses and float(misses.group(1)) >= 1, metrics[-2000:]
    originals = sum(len(setup.region.instance_file(i["ID"])) for i in region_ids)
    # Wire bytes: the archive may compress its answers, so fewer than the files themselves.
    assert down and 0 < float(down.group(1)) <= originals * 1.2


def _orthanc_study(setup: Setup, study_uid: str) -> str:
    response = httpx.post(f"{setup.region.url}/tools/lookup", content=study_uid, timeout=10)
    return str(response.json()[0]["ID"])


def test_wan_down_cfind_and_cmove_answer_from_local_data(setup: Setup, tmp_path: Path) -> None:
    ns = setup.region.ns
    subprocess.run(["ip", "-n", ns.name, "link", "set", ns.inner_if, "down"], check=True)
    try:
        stderr, answers = _findscu(setup.pas, ["QueryRetrieveLevel=STUDY", "PatientID=A0*",
                                               "StudyInstanceUID="], tmp_path / "down")
        assert "Final Find Response (Success)" in stderr
        uids = {str(a.StudyInstanceUID) for a in answers}
        # Local studies, and the regional study fetched by the previous test (now on site).
        assert set(_studies(LOCAL_PATIENT)) <= uids
        assert set(_studies(REGIONAL_PATIENT)[1:]).isdisjoint(uids)
        assert "region not asked" in (_audit_queries(setup.pas)[-1]["detail"] or "")
        # A local study still moves: the region's listing is not waited for.
        for old in setup.scp.files():
            old.unlink()
        study = _studies(LOCAL_PATIENT)[0]
        result = _move_study(setup, study)
        assert "Final Move Response (Success)" in result.stderr, result.stderr[-2000:]
        expected = sum(1 for p in CT_DIR.glob(f"{LOCAL_PATIENT}_*.dcm")
                       if str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) == study)
        assert len(setup.scp.files()) == expected
    finally:
        subprocess.run(["ip", "-n", ns.name, "link", "set", ns.inner_if, "up"], check=True)


def test_move_of_an_unknown_study_fails_cleanly(setup: Setup) -> None:
    for old in setup.scp.files():
        old.unlink()
    result = _move_study(setup, "1.2.3.4.5.6.7")
    # The region knows no such study: nothing fetched, nothing sent, a success with 0 sub-ops.
    assert "Final Move Response" in result.stderr
    assert setup.scp.files() == []


def _wado_retrieves(setup: Setup) -> dict[str, float]:
    """pas_retrieve_requests_total{channel="wado-rs"} by result."""
    text = httpx.get(f"http://127.0.0.1:{setup.pas.http_port}/metrics", timeout=10).text
    return {result: float(value) for result, value in re.findall(
        r'^pas_retrieve_requests_total\{channel="wado-rs",result="(\w+)"\} (\S+)$', text,
        re.M)}


def test_wado_rs_of_a_regional_study_fetches_then_serves(setup: Setup) -> None:
    study = _studies(REGIONAL_PATIENT)[1]  # not fetched by any earlier test
    web = f"http://127.0.0.1:{setup.pas.http_port}/dicom-web/studies/{study}"
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    before = _wado_retrieves(setup)
    response = httpx.get(web, headers=accept, timeout=120)
    assert response.status_code == 200
    assert response.content.count(b"Content-Type: application/dicom;") == 3
    conn = sqlite3.connect(setup.pas.home / "pas.sqlite")
    origin = conn.execute("SELECT origin FROM studies WHERE study_uid = ?", (study,)).fetchone()
    series, sop = conn.execute(
        "SELECT se.series_uid, i.sop_instance_uid FROM instances i JOIN series se "
        "ON se.id = i.series_fk JOIN studies s ON s.id = i.study_fk WHERE s.study_uid = ? "
        "LIMIT 1", (study,)).fetchone()
    conn.close()
    assert origin == ("regional",)
    # Fetched from the region: a miss. WADO-RS retrieves were counted nowhere (only C-MOVE
    # and C-GET were): a web viewer's site showed no retrieves at all.
    assert _wado_retrieves(setup) == {"hit": before["hit"], "miss": before["miss"] + 1}
    # Now on site: the study, one series and one instance served from the cache, three hits.
    parts = {}
    for path in (web, f"{web}/series/{series}", f"{web}/series/{series}/instances/{sop}"):
        again = httpx.get(path, headers=accept, timeout=60)
        assert again.status_code == 200, again.text[:300]
        parts[path] = again.content.count(b"Content-Type: application/dicom;")
    assert list(parts.values())[0] == 3 and 1 <= list(parts.values())[1] <= 3 and \
        list(parts.values())[2] == 1, parts
    assert _wado_retrieves(setup) == {"hit": before["hit"] + 3, "miss": before["miss"] + 1}


def test_move_of_a_study_partly_on_site_fetches_only_the_rest(setup: Setup,
                                                              tmp_path: Path) -> None:
    """The region's list is checked against the index (not against every row of the study
    read whole): one instance of three on site, two fetched, three moved."""
    study = generate_uid()
    paths = []
    for number in (1, 2, 3):
        paths.append(tmp_path / f"{number}.dcm")
        tiny_ct(study, PatientID="PARTLY", InstanceNumber=number).save_as(
            paths[-1], enforce_file_format=True)
    storescu(paths, setup.region.dicom_port, host=setup.region.host, called="ORTHANC")
    storescu(paths[0], setup.pas.port)
    for old in setup.scp.files():
        old.unlink()
    result = _move_study(setup, study)
    assert "Final Move Response (Success)" in result.stderr, result.stderr[-2000:]
    assert f"fetched 2 instances of {study} from the region" in setup.pas.log(), \
        setup.pas.log()[-2000:]
    sent = {str(dcmread(f).SOPInstanceUID) for f in setup.scp.files()}
    assert sent == {str(dcmread(p).SOPInstanceUID) for p in paths}


def test_the_regions_list_of_a_study_read_a_page_at_a_time_is_the_whole_list(
        setup: Setup, tmp_path: Path) -> None:
    """Fetch-through asks the region for a study's instances with limit and offset (the
    whole list in one answer was 157 MB of JSON for 200,000 instances): Orthanc, through
    the hub's proxy, gives every instance once across the pages, the last one short."""
    study = generate_uid()
    paths = []
    for number in range(1, 6):
        paths.append(tmp_path / f"{number}.dcm")
        tiny_ct(study, PatientID="PAGED", InstanceNumber=number).save_as(
            paths[-1], enforce_file_format=True)
    storescu(paths, setup.region.dicom_port, host=setup.region.host, called="ORTHANC")
    client = RegionClient.from_home(setup.pas.home)
    assert client is not None
    try:
        pages = list(client.instance_pages(study, page_size=2))
        whole = client.qido(f"studies/{study}/instances")
    finally:
        client.close()
    assert [len(page) for page in pages] == [2, 2, 1]
    paged = [i.sop_instance_uid for page in pages for i in page]
    assert sorted(paged) == sorted(item["00080018"]["Value"][0] for item in whole)
    assert sorted(paged) == sorted(str(dcmread(p).SOPInstanceUID) for p in paths)
