"""The hub's way to the regional PACS (``archive.url``): nothing in clear beyond loopback
unless ``archive.allow_cleartext``, and ``archive.ca_file`` to verify a PACS whose
certificate the region's own CA signed.

Before, ``pas hub run`` took ``http://`` to any host (every study of the region went there
in clear), and its client verified an ``https://`` PACS against httpx's bundled list only:
a PACS under the region's CA could not be reached over TLS at all. Real peers: ``pas hub
run``, a real Orthanc (DICOMweb) behind an HTTPS front on 127.0.0.1 whose certificate a
test CA signed (tests/faults/pki.py).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from appliance.hub.config import load_hub_settings
from tests.faults.pki import make_pki
from tests.support.hub import HubProcess, client, enroll, pack_items, ship
from tests.support.peers import MR_DIR, PAS_BIN, Orthanc, free_port, port_open, wait_for
from tests.support.tlsfront import TlsFront

CLEARTEXT_REFUSED = ("archive.url: http:// sends every study the sites send in clear; use "
                     "https:// (or set archive.allow_cleartext = true for a host on the data "
                     "centre's own network)")


def _hub_run(tmp_path: Path, **env: str) -> tuple[bool, subprocess.CompletedProcess[str]]:
    """``pas hub run`` with these PAS_HUB_* variables: (whether it opened its port, what it
    said). Stopped if it did."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    if not (tmp_path / "hub" / "ca.crt").exists():  # a hub home: only the setting is wrong
        HubProcess(tmp_path / "hub").init()
    command = [str(PAS_BIN), "hub", "run"]
    process = subprocess.Popen(command, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               env={**clean, "PAS_HUB_HOME": str(tmp_path / "hub"),
                                    "PAS_HUB_HTTP__HOST": "127.0.0.1",
                                    "PAS_HUB_HTTP__PORT": str(port), **env})
    try:
        wait_for(lambda: process.poll() is not None or port_open("127.0.0.1", port), 60,
                 what="pas hub run to exit or listen")
        opened = process.poll() is None
    finally:
        if process.poll() is None:
            process.terminate()
        out, errors = process.communicate(timeout=30)
    return opened, subprocess.CompletedProcess(command, process.returncode, out, errors)


def test_an_http_archive_beyond_loopback_is_refused_at_hub_run(tmp_path: Path) -> None:
    opened, result = _hub_run(tmp_path, PAS_HUB_ARCHIVE__KIND="dicomweb",
                              PAS_HUB_ARCHIVE__URL="http://198.18.0.2:8042/dicom-web")
    assert not opened, f"pas hub run started with an archive in clear:\n{result.stderr}"
    assert result.returncode == 2, result.stdout + result.stderr
    said = " ".join(result.stderr.split())  # rich wraps long lines at its console's width
    assert said == f"config error {CLEARTEXT_REFUSED} (set by PAS_HUB_ARCHIVE__URL)", said

    # The opt-in, loopback and https:// are taken (the checks pas hub run makes first).
    base = {"PAS_HUB_HOME": str(tmp_path / "hub"), "PAS_HUB_ARCHIVE__KIND": "dicomweb"}
    for url, extra in (("http://pacs.dc.example/dicom-web", {"ALLOW_CLEARTEXT": "true"}),
                       ("http://127.0.0.1:8042/dicom-web", {}),
                       ("https://pacs.region.example/dicom-web", {})):
        env = {**base, "PAS_HUB_ARCHIVE__URL": url,
               **{f"PAS_HUB_ARCHIVE__{key}": value for key, value in extra.items()}}
        assert load_hub_settings(environ=env).archive.url == url

    # A ca_file that is not a CA bundle stops the start, naming the key.
    opened, result = _hub_run(tmp_path, PAS_HUB_ARCHIVE__KIND="dicomweb",
                              PAS_HUB_ARCHIVE__URL="https://pacs.region.example/dicom-web",
                              PAS_HUB_ARCHIVE__CA_FILE=str(tmp_path / "missing.pem"))
    assert not opened and result.returncode == 1, result.stdout + result.stderr
    said = " ".join(result.stderr.split())
    assert said.startswith(f"cannot start the hub: archive.ca_file {tmp_path / 'missing.pem'}: "
                           "not a readable PEM bundle of CA certificates"), said


def test_a_pacs_under_the_regions_ca_is_reached_only_with_archive_ca_file(
        tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("Orthanc runs in a network namespace: the tests must run as root")
    pki = make_pki(tmp_path / "pki")  # server.crt: 127.0.0.1, signed by the test CA
    orthanc = Orthanc(tmp_path / "orthanc")
    front: TlsFront | None = None
    hub: HubProcess | None = None
    try:
        orthanc.start()
        front = TlsFront(orthanc.host, orthanc.http_port, pki / "server.crt",
                         pki / "server.key").start()
        env = {"PAS_HUB_ARCHIVE__KIND": "dicomweb", "PAS_HUB_ARCHIVE__URL":
               f"{front.url}/dicom-web", "PAS_HUB_ARCHIVE__ALLOW_CLEARTEXT": "false"}
        hub = HubProcess(tmp_path / "hub", env).init()
        hub.start()
        site = enroll(hub, tmp_path / "site", "CHU-NORD")
        source = sorted(MR_DIR.glob("*.dcm"))[0]
        study_uid = str(dcmread(source, stop_before_pixels=True).StudyInstanceUID)
        shipment = ship(pack_items([source]), site.hub_transfer_key, 2 << 20, study_uid)
        with client(site) as http:
            assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
            assert shipment.put_all(http) == [201]
            refused = http.post(shipment.url + "/commit")
        # The system's store does not know the test CA: nothing sent, the reason named.
        assert refused.status_code == 502, refused.text
        assert refused.json()["error"] == "archive_refused", refused.text
        detail = refused.json()["detail"]
        assert ("the hub does not trust the archive's certificate (unable to get local "
                "issuer certificate), checked against the system's store (archive.ca_file "
                "not set)") in detail, detail
        assert orthanc.instances() == []

        hub.stop()  # regional ops set archive.ca_file and restart the hub
        hub.env["PAS_HUB_ARCHIVE__CA_FILE"] = str(pki / "ca.crt")
        hub.start()
        with client(site) as http:
            answer = http.post(shipment.url + "/commit")
        assert answer.status_code == 200, answer.text
        (uid, sha256), = shipment.originals.items()
        assert answer.json()["instances"] == [{"sop_instance_uid": uid, "sha256": sha256}]
        (held,) = orthanc.instances()
        data = orthanc.instance_file(held)
        assert str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID) == uid
        assert hashlib.sha256(data).hexdigest() == sha256
    finally:
        if hub is not None:
            hub.stop()
        if front is not None:
            front.stop()
        orthanc.stop()
