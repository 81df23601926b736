"""Two transfers archiving the same SOP Instance UID with other bytes at the same moment, into a
real Orthanc (``OverwriteInstances: false``: it keeps the first version and answers success
for the second) through ``pas hub run`` with the ``dicomweb`` archive.

The hub asks the archive which UIDs it holds before each STOW and reads back only those: when
both transfers asked before either STOW landed, both were "new", both STOWs succeeded, and
both transfers were receipted, although Orthanc kept only one of the two versions. The site
holding the other version then confirms it and may evict it: the corrected instance gone from
everywhere (invariant 2). A corrected version re-sent while the first is still on its way
(a delta job beside the study's own job, or two sites) is how it happens.

A proxy in front of Orthanc holds each request 0.5 s (a slow, far archive): the window between
the question and the STOW is then wide enough for both transfers to fall in it every time.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.hub import HubProcess, client, enroll, pack_items, ship
from tests.support.peers import MR_DIR, Orthanc
from tests.support.tcpproxy import TcpProxy


def _two_versions(folder: Path) -> tuple[Path, Path]:
    """One MR instance twice, with the same SOP Instance UID and other bytes."""
    source = sorted(MR_DIR.glob("*.dcm"))[0]
    paths = []
    for name, comment in (("first.dcm", "first version"), ("second.dcm", "corrected version")):
        ds = dcmread(source)
        ds.ImageComments = comment
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths[0], paths[1]


def test_two_versions_of_one_uid_archived_at_once_get_one_receipt_only(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("Orthanc runs in a network namespace: the tests must run as root")
    orthanc = Orthanc(tmp_path / "orthanc")
    proxy: TcpProxy | None = None
    hub: HubProcess | None = None
    try:
        orthanc.start()
        proxy = TcpProxy(orthanc.host, orthanc.http_port).start()
        hub = HubProcess(tmp_path / "hub", {
            "PAS_HUB_ARCHIVE__KIND": "dicomweb",
            "PAS_HUB_ARCHIVE__URL": f"http://127.0.0.1:{proxy.port}/dicom-web",
            "PAS_HUB_ARCHIVE__WORKERS": "2", "PAS_HUB_ARCHIVE__REQUESTS": "4"}).init()
        hub.start()
        site = enroll(hub, tmp_path / "site", "CHU-NORD")
        first, second = _two_versions(tmp_path)
        study_uid = str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)
        shipments = [ship(pack_items([path]), site.hub_transfer_key, 2 << 20, study_uid)
                     for path in (first, second)]
        uid = next(iter(shipments[0].originals))
        assert set(shipments[1].originals) == {uid}
        assert shipments[0].originals[uid] != shipments[1].originals[uid]

        with client(site) as http:
            for shipment in shipments:
                assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
            proxy.delay_up_s = 0.5
            with ThreadPoolExecutor(2) as pool:  # both last buckets at once, each committing
                puts = list(pool.map(
                    lambda s: http.put(s.bucket_url(0), params={"commit": "true"},
                                       content=s.buckets[0]), shipments))
            assert [p.status_code for p in puts] == [201, 201], [p.text for p in puts]
            proxy.delay_up_s = 0.0
            commits = [http.post(s.url + "/commit") for s in shipments]

        held = orthanc.instances()
        assert len(held) == 1  # Orthanc keeps one version of the UID
        data = orthanc.instance_file(held[0])
        assert str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID) == uid
        region_sha = hashlib.sha256(data).hexdigest()
        for shipment, answer in zip(shipments, commits, strict=True):
            if shipment.originals[uid] == region_sha:
                assert answer.status_code == 200, answer.text
                assert answer.json()["instances"] == [{"sop_instance_uid": uid,
                                                       "sha256": region_sha}]
            elif shipment is shipments[0]:  # the older one, the newer committed with other
                # bytes: superseded, refused before the archive is asked (docs/protocol.md)
                assert answer.status_code == 422, answer.text
                assert answer.json()["error"] == "superseded"
                assert "other bytes" in answer.text
            else:  # the version Orthanc did not keep is never receipted
                assert answer.status_code == 502, answer.text
                assert answer.json()["error"] == "archive_refused"
                assert "other bytes" in answer.text
    finally:
        if hub is not None:
            hub.kill()
        if proxy is not None:
            proxy.stop()
        orthanc.stop()
