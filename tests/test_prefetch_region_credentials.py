"""Credentials for a region read directly (``prefetch.dicomweb_url``; review s40, WAN F1).

httpx used to send a ``user:password@`` of ``prefetch.dicomweb_url`` as HTTP Basic; that URL
is now refused (it is shown in logs and ``pas status``), so the region's credentials have
keys of their own: ``prefetch.dicomweb_username``/``dicomweb_password`` (Basic) or
``prefetch.dicomweb_bearer_token``, sent as the client's ``auth`` on every QIDO-RS and
WADO-RS to that URL (prior searches, fetch-through, regional C-FIND, the scrub's repair).
Set without ``dicomweb_url`` (the region read through the hub, where the site's certificate
is the credential) they are refused, naming the key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_settings
from tests.support.http_peers import DicomWebRecorder
from tests.support.peers import DCMTK_ENV, PasProcess

SECRET = "Reg10n-S3cret"


def test_credentials_without_a_dicomweb_url_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"PAS_PREFETCH__DICOMWEB_BEARER_TOKEN": SECRET})
    assert refused.value.problems == [
        "prefetch.dicomweb_bearer_token: is for prefetch.dicomweb_url, which is not set (the "
        "region read through the hub takes the site's certificate) (set by "
        "PAS_PREFETCH__DICOMWEB_BEARER_TOKEN)"]
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"PAS_PREFETCH__DICOMWEB_URL": "http://10.1.2.3/dicom-web",
                               "PAS_PREFETCH__DICOMWEB_USERNAME": "pas",
                               "PAS_PREFETCH__DICOMWEB_PASSWORD": SECRET})
    assert refused.value.problems[0].startswith(
        "prefetch.dicomweb_url: http:// sends patient data and credentials in clear")
    assert not any(SECRET in problem for problem in refused.value.problems)


@pytest.mark.parametrize(("keys", "expected"), [
    ({"PAS_PREFETCH__DICOMWEB_USERNAME": "pas", "PAS_PREFETCH__DICOMWEB_PASSWORD": SECRET},
     "Basic cGFzOlJlZzEwbi1TM2NyZXQ="),
    ({"PAS_PREFETCH__DICOMWEB_BEARER_TOKEN": SECRET}, f"Bearer {SECRET}"),
])
def test_a_regional_cfind_sends_the_regions_credentials(
        recorder: DicomWebRecorder, tmp_path: Path, keys: dict[str, str], expected: str) -> None:
    """A real daemon asked by findscu with ``serving.query_region``: the region's QIDO-RS
    carries the credentials; the secret is in no log line."""
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
        "PAS_PREFETCH__DICOMWEB_URL": recorder.url, "PAS_SERVING__QUERY_REGION": "true",
        "PAS_SERVING__REGION_QUERY_TIMEOUT_S": "20", **keys}).start()
    try:
        result = subprocess.run(
            ["findscu", "-S", "-aet", "VIEWER", "-aec", "PAS", "-k", "QueryRetrieveLevel=STUDY",
             "-k", "PatientID=P1", "-k", "StudyInstanceUID", "127.0.0.1", str(pas.port)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        assert [(method, path, auth) for method, path, auth in recorder.seen] == [
            ("GET", "/dicom-web/studies", expected)]
        assert SECRET not in pas.log()
    finally:
        pas.stop()
