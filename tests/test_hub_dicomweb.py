"""The hub with ``archive.kind = "dicomweb"``: STOW-RS into a real Orthanc (DICOMweb plugin,
in its own network namespace), and the read-only region proxy (QIDO-RS / WADO-RS).

Acceptance of issue 3 on the hub side: every instance of the real CT set arrives in Orthanc
with its original SHA-256 (downloaded back and compared). The receipt exists only once
Orthanc accepted every instance: an instance Orthanc refuses makes the commit 502, no receipt.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from appliance.transfer.enrolment import Enrolment
from appliance.transfer.pack import PackItem
from tests.support.hub import HubProcess, client, enroll, pack_items, ship
from tests.support.peers import CT_DIR, Orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if os.geteuid() != 0:
        pytest.fail("Orthanc runs in a network namespace: the tests must run as root")
    peer = Orthanc(tmp_path_factory.mktemp("orthanc"))
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def hub(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path_factory.mktemp("hub") / "home",
                         {"PAS_HUB_ARCHIVE__KIND": "dicomweb",
                          "PAS_HUB_ARCHIVE__URL": orthanc.dicomweb}).init()
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def site(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> Enrolment:
    return enroll(hub, tmp_path_factory.mktemp("site"), "CHU-CENTRE")


def test_ct_study_reaches_orthanc_bit_exact_and_reads_back_through_the_region_proxy(
        hub: HubProcess, site: Enrolment, orthanc: Orthanc) -> None:
    files = sorted(p for p in CT_DIR.rglob("*") if p.is_file())
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    # Two files of the set are byte-identical copies under another name: one instance each.
    items = list({item.sop_instance_uid: item for item in pack_items(files)}.values())
    assert len(items) == 60
    shipment = ship(items, site.hub_transfer_key, 6 << 20, study_uid)
    with client(site) as http:
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        assert shipment.put_all(http) == [201] * len(shipment.buckets)
        answer = http.post(shipment.url + "/commit")
        assert answer.status_code == 200, answer.text
        receipt = answer.json()
        assert receipt["archive"] == "dicomweb" and len(receipt["instances"]) == len(items)

        stored = orthanc.instances()
        assert len(stored) == len(items)
        arrived = {}
        for orthanc_id in stored:
            data = orthanc.instance_file(orthanc_id)
            uid = str(dcmread(__import__("io").BytesIO(data), stop_before_pixels=True)
                      .SOPInstanceUID)
            arrived[uid] = hashlib.sha256(data).hexdigest()
        assert arrived == shipment.originals

        # Commit again: same receipt, still one copy of each instance in Orthanc.
        assert http.post(shipment.url + "/commit").json() == receipt
        assert len(orthanc.instances()) == len(items)

        # Reading the region through the hub: QIDO-RS and WADO-RS, mutual TLS.
        qido = http.get("/api/v1/region/dicom-web/studies",
                        params={"StudyInstanceUID": study_uid},
                        headers={"Accept": "application/dicom+json"})
        assert qido.status_code == 200, qido.text
        assert qido.json()[0]["0020000D"]["Value"] == [study_uid]
        # A QIDO wildcard crosses the proxy as a wildcard (not %2A, matched literally).
        patient_id = qido.json()[0]["00100020"]["Value"][0]
        wildcard = http.get(f"/api/v1/region/dicom-web/studies?PatientID={patient_id[:4]}*",
                            headers={"Accept": "application/dicom+json"})
        assert study_uid in [s["0020000D"]["Value"][0] for s in wildcard.json()]
        series = http.get(f"/api/v1/region/dicom-web/studies/{study_uid}/series").json()
        series_uid = series[0]["0020000E"]["Value"][0]
        listed = http.get(f"/api/v1/region/dicom-web/studies/{study_uid}/series/{series_uid}/"
                          "instances").json()
        some_uid = listed[0]["00080018"]["Value"][0]
        wado = http.get(f"/api/v1/region/dicom-web/studies/{study_uid}/series/{series_uid}/"
                        f"instances/{some_uid}",
                        headers={"Accept": 'multipart/related; type="application/dicom"; '
                                 'transfer-syntax=*'})
        assert wado.status_code == 200
        assert wado.headers["content-type"].startswith("multipart/related")
        original = next(p for p in files if hashlib.sha256(p.read_bytes()).hexdigest()
                        == shipment.originals[some_uid])
        assert original.read_bytes() in wado.content
        assert http.post("/api/v1/region/dicom-web/studies").status_code == 405
    with httpx.Client(base_url=hub.url, verify=hub.anonymous_context()) as anonymous:
        assert anonymous.get("/api/v1/region/dicom-web/studies").status_code == 401


def test_an_instance_the_archive_refuses_means_502_and_no_receipt(
        hub: HubProcess, site: Enrolment, orthanc: Orthanc, tmp_path: Path) -> None:
    files = sorted(p for p in CT_DIR.rglob("*") if p.is_file())[:3]
    items = pack_items(files)
    junk = tmp_path / "not-dicom.bin"
    junk.write_bytes(b"this is not a DICOM file\n" * 100)
    items.append(PackItem("1.2.826.0.1.3680043.8.498.1", junk, junk.stat().st_size,
                          hashlib.sha256(junk.read_bytes()).hexdigest()))
    shipment = ship(items, site.hub_transfer_key, 6 << 20, "1.2.826.0.1.3680043.8.498.2")
    with client(site) as http:
        http.post("/api/v1/transfers", json=shipment.manifest)
        shipment.put_all(http)
        answer = http.post(shipment.url + "/commit")
        assert answer.status_code == 502, answer.text
        assert answer.json()["refused"] == ["1.2.826.0.1.3680043.8.498.1"]
        assert http.get(shipment.url + "/receipt").status_code == 404
        assert not http.get(shipment.url).json()["committed"]


def test_archive_unreachable_then_back_the_same_transfer_commits(
        orthanc: Orthanc, tmp_path: Path) -> None:
    """502 while the regional PACS does not answer; the transfer stays committable, and once
    the PACS is back the same commit succeeds with every instance bit-exact."""
    import signal

    from tests.support.peers import MR_DIR

    hub = HubProcess(tmp_path / "hub", {"PAS_HUB_ARCHIVE__KIND": "dicomweb",
                                        "PAS_HUB_ARCHIVE__URL": orthanc.dicomweb,
                                        "PAS_HUB_ARCHIVE__TIMEOUT_S": "2"}).init().start()
    try:
        site = enroll(hub, tmp_path / "site", "CHU-PAUSE")
        files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:3]
        shipment = ship(pack_items(files), site.hub_transfer_key, 6 << 20)
        assert orthanc.proc is not None
        with client(site) as http:
            http.post("/api/v1/transfers", json=shipment.manifest)
            assert shipment.put_all(http) == [201] * len(shipment.buckets)
            orthanc.proc.send_signal(signal.SIGSTOP)
            try:
                down = http.post(shipment.url + "/commit")
            finally:
                orthanc.proc.send_signal(signal.SIGCONT)
            assert down.status_code == 502 and down.json()["error"] == "archive_refused"
            assert sorted(down.json()["refused"]) == sorted(shipment.originals)
            assert http.get(shipment.url + "/receipt").status_code == 404
            back = http.post(shipment.url + "/commit")
            assert back.status_code == 200, back.text
        for uid, sha in shipment.originals.items():
            found = httpx.post(f"{orthanc.url}/tools/lookup", content=uid, timeout=30).json()
            instance = next(f["ID"] for f in found if f["Type"] == "Instance")
            assert hashlib.sha256(orthanc.instance_file(instance)).hexdigest() == sha
    finally:
        hub.stop()


def test_a_resent_uid_commits_when_its_bytes_are_the_same_and_is_refused_when_they_differ(
        hub: HubProcess, site: Enrolment, orthanc: Orthanc, tmp_path: Path) -> None:
    """Orthanc (``OverwriteInstances: false``) answers STOW-RS success for a SOP Instance UID it
    holds already and keeps the old bytes. The same bytes again is an idempotent re-send: a
    receipt. A corrected version (same UID, PatientName edited) must not be receipted: 502
    naming the UID and both SHA-256, no receipt, and Orthanc still holds the first version."""
    import pydicom

    from tests.support.peers import MR_DIR

    first = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[-1]
    corrected = tmp_path / "corrected.dcm"
    dataset = pydicom.dcmread(first)
    dataset.PatientName = "CORRECTED^NAME"
    dataset.save_as(corrected)
    uid, study_uid = str(dataset.SOPInstanceUID), str(dataset.StudyInstanceUID)
    old_sha = hashlib.sha256(first.read_bytes()).hexdigest()
    new_sha = hashlib.sha256(corrected.read_bytes()).hexdigest()
    assert old_sha != new_sha

    def send(path: Path) -> tuple[httpx.Response, httpx.Response]:
        shipment = ship(pack_items([path]), site.hub_transfer_key, 6 << 20, study_uid)
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        assert shipment.put_all(http) == [201] * len(shipment.buckets)
        return http.post(shipment.url + "/commit"), http.get(shipment.url + "/receipt")

    with client(site) as http:
        for attempt in ("first", "same bytes again"):
            committed, receipt = send(first)
            assert committed.status_code == 200, (attempt, committed.text)
            assert committed.json()["instances"] == [{"sop_instance_uid": uid,
                                                      "sha256": old_sha}]
            assert receipt.status_code == 200
        refused, receipt = send(corrected)
        assert refused.status_code == 502, refused.text
        assert refused.json()["error"] == "archive_refused"
        assert refused.json()["refused"] == [uid]
        detail = refused.json()["detail"]
        assert uid in detail and old_sha in detail and new_sha in detail, detail
        assert receipt.status_code == 404
    found = httpx.post(f"{orthanc.url}/tools/lookup", content=uid, timeout=30).json()
    held = [f["ID"] for f in found if f["Type"] == "Instance"]
    assert len(held) == 1
    assert hashlib.sha256(orthanc.instance_file(held[0])).hexdigest() == old_sha


@pytest.mark.parametrize("path", ["%252e%252e/system", "%252e%252e/tools/now",
                                  "..%2fsystem", "studies/%2e%2e/%2e%2e/system",
                                  "studies/..;/..;/system", "studies/.hidden", "studies//x",
                                  "studies/1.2.3%00"])
def test_the_region_proxy_keeps_a_site_in_the_dicomweb_root(
        hub: HubProcess, site: Enrolment, path: str) -> None:
    """A segment the archive decodes once more (``%2e%2e`` sent as ``%252e%252e``) or reads
    as a parent (``..;``) took a site out of the DICOMweb root into Orthanc's whole REST API
    (``/system``, ``/tools``, ``/changes``), with the hub's archive credentials (review
    s41). Refused before anything is sent to the archive."""
    with client(site) as http:
        answer = http.get("/api/v1/region/dicom-web/" + path)
    assert answer.status_code == 400, answer.text[:200]
    assert answer.json()["error"] == "bad_path"
    assert "is not a DICOMweb resource, UID, frame list or tag" in answer.json()["detail"]
