"""The hub's prior searches reach the archive as its other clients do (review s40, WAN).

hub/priors.py built its own client to the archive with the CA alone: its searches sent none
of ``archive.username``/``password``/``bearer_token`` (a PACS that requires them answered
401 to every prior search while the STOWs went through), and it read ``HTTP_PROXY`` from the
hub's environment, sending patient IDs in clear to a proxy. It now takes
``archive_client_options`` and the shared constructor (appliance/transfer/http.py)."""

from __future__ import annotations

from pathlib import Path

from tests.support.http_peers import DicomWebRecorder
from tests.support.hub import HubProcess, client, enroll

SECRET = "Pri0rs-S3cret"


def test_prior_searches_send_the_archive_credentials_and_use_no_proxy(
        recorder: DicomWebRecorder, tmp_path: Path) -> None:
    # A proxy nobody listens on: a search sent through it would fail, not reach the archive.
    proxies = {name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "http_proxy",
                                                        "ALL_PROXY", "all_proxy")}
    hub = HubProcess(tmp_path / "hub", {
        "PAS_HUB_ARCHIVE__KIND": "dicomweb", "PAS_HUB_ARCHIVE__URL": recorder.url,
        "PAS_HUB_ARCHIVE__USERNAME": "hub", "PAS_HUB_ARCHIVE__PASSWORD": SECRET, **proxies})
    try:
        hub.init().start()
        site = enroll(hub, tmp_path / "site", "SITE-C")
        with client(site) as http:
            answer = http.post("/api/v1/downloads/search",
                               json={"patients": [{"patient_id": "P1"}]})
        assert answer.status_code == 200, answer.text
        searches = [(method, path, auth) for method, path, auth in recorder.seen
                    if path == "/dicom-web/studies"]
        # Basic base64("hub:Pri0rs-S3cret")
        assert searches == [("GET", "/dicom-web/studies", "Basic aHViOlByaTBycy1TM2NyZXQ=")]
        assert SECRET not in hub.log()
    finally:
        hub.stop()
