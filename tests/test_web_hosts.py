"""DNS rebinding: the appliance's HTTP port answers only the names PAS is known by.

A page from the internet whose name is made to resolve to PAS's address sends its requests
with ``Host: <its own name>``; before the check (appliance/web/hosts.py) a real ``pas run``
with ``serving.auth = "none"`` answered them with the status page, /api/status and DICOMweb,
patient IDs included. Now: 421 naming ``http.allowed_hosts``, nothing served, logged, in the
audit trail and the refusal counter; IP literals, ``localhost``, the machine's name and a
configured name are served, in headless Chromium too (its resolver told where the names
point: a page loaded through an allowed name works, the rebound one gets the refusal)."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from tests.support.browser import chromium
from tests.support.peers import MR_DIR, PasProcess, read_rows, storescu, wait_for

FILES = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:2]
PATIENT_ID = str(dcmread(FILES[0], stop_before_pixels=True).PatientID)
ROUTES = ["/", "/api/status", "/metrics", "/dicom-web/studies"]
ALLOWED_NAME = "pas.hospital.test"


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasProcess]:
    """``serving.auth = "none"`` (the default), one configured name, a study stored."""
    daemon = PasProcess(tmp_path_factory.mktemp("hosts") / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true",
        "PAS_PREFETCH__ENABLED": "false",
        "PAS_HTTP__ALLOWED_HOSTS": f'["{ALLOWED_NAME.upper()}."]',  # as IT may write it
    }).start()
    try:
        storescu(FILES, daemon.port)
        yield daemon
    finally:
        daemon.stop()


def _get(pas: PasProcess, path: str, host: str, source: str | None = None) -> httpx.Response:
    """A request to PAS's address carrying ``host``, as the browser of a rebound page sends
    (from the loopback address ``source``: another client's)."""
    if source is not None:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source),
                          timeout=10) as client:
            return client.get(f"http://127.0.0.1:{pas.http_port}{path}",
                              headers={"Host": host})
    return httpx.get(f"http://127.0.0.1:{pas.http_port}{path}", headers={"Host": host},
                     timeout=10)


def _refusals(pas: PasProcess) -> float:
    metrics = _get(pas, "/metrics", "127.0.0.1").text
    found = re.search(r'^pas_access_refused_total\{channel="http",reason="host-header"\} (\S+)$',
                      metrics, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("path", ROUTES)
def test_a_foreign_host_gets_nothing(pas: PasProcess, path: str) -> None:
    port = pas.http_port
    for host in (f"evil.example:{port}", "evil.example", f"EVIL.Example.:{port}",
                 f"{ALLOWED_NAME}.evil.example:{port}", f"localhost.evil.example:{port}"):
        refused = _get(pas, path, host)
        assert refused.status_code == 421, (host, refused.status_code, refused.text[:200])
        assert "evil.example" in refused.json()["detail"]
        assert "http.allowed_hosts" in refused.json()["detail"]
        assert PATIENT_ID not in refused.text
    assert _get(pas, "/healthz", f"evil.example:{port}").json() == {"status": "ok"}  # probes


def test_the_names_pas_is_known_by_are_served(pas: PasProcess) -> None:
    port = pas.http_port
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", f"[::1]:{port}",
                 "10.20.30.40",  # any IP literal: no name resolved, nothing to rebind
                 f"{ALLOWED_NAME}:{port}", f"{ALLOWED_NAME.title()}.",
                 f"{socket.gethostname()}:{port}"):
        page = _get(pas, "/", host)
        assert page.status_code == 200, (host, page.text[:200])
        assert PATIENT_ID in page.text, host
        studies = _get(pas, "/dicom-web/studies", host)
        assert studies.status_code == 200, (host, studies.text[:200])
        assert [s["00100020"]["Value"] for s in studies.json()] == [[PATIENT_ID]]


def test_a_malformed_host_or_two_are_refused(pas: PasProcess) -> None:
    def raw(head: str) -> str:
        with socket.create_connection(("127.0.0.1", pas.http_port), timeout=10) as sock:
            sock.sendall(f"GET /api/status HTTP/1.1\r\n{head}Connection: close\r\n\r\n"
                         .encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer.decode(errors="replace")

    for head in ("Host: evil.example:80:80\r\n", "Host: ::1\r\n",
                 "Host: 127.0.0.1\r\nHost: evil.example\r\n"):
        answer = raw(head)
        assert answer.startswith("HTTP/1.1 400"), (head, answer[:300])
        assert PATIENT_ID not in answer
    assert raw("Host: 127.0.0.1\r\n").startswith("HTTP/1.1 200")


def test_a_refusal_is_logged_audited_and_counted(pas: PasProcess) -> None:
    before = _refusals(pas)
    # From a client of its own: the refusals of this module's other tests (from 127.0.0.1,
    # other names) share one row a minute with any other Host that source names.
    for _ in range(3):
        assert _get(pas, "/api/status", "rebound.example", "127.0.0.2").status_code == 421
    # Counted once the 421 is answered (appliance/web/hosts.py): awaited.
    wait_for(lambda: _refusals(pas) == before + 3, 10, what="the three refusals counted")
    line = wait_for(lambda: [x for x in pas.log().splitlines()
                             if "refused HTTP requests" in x and "rebound.example" in x], 10,
                    what="the refusal's log line")
    assert len(line) == 1, line  # once a minute per name, not per request
    assert "http.allowed_hosts" in line[0] and ALLOWED_NAME in line[0]
    rows = wait_for(lambda: [r for r in read_rows(
        pas.home / "pas.sqlite", "SELECT * FROM audit WHERE event = 'security' AND outcome "
        "LIKE '%rebound.example%'")], 10, what="the refusal's audit row")
    assert [(r["actor"], r["source"], r["target"]) for r in rows] == [
        ("anonymous", "127.0.0.2", "/api/status")]
    assert rows[0]["outcome"].startswith("failure: HTTP request refused (421)")


def test_a_bad_allowed_host_is_named(tmp_path: Path) -> None:
    from appliance.config import ConfigError, load_settings

    path = tmp_path / "appliance.toml"
    for entry, words in (("*", "no wildcard"), (".hospital.test", "no domain suffix"),
                         ("http://pas.hospital.test", "is not a host name")):
        path.write_text(f"[http]\nallowed_hosts = [{json.dumps(entry)}]\n")
        with pytest.raises(ConfigError) as raised:
            load_settings(path, environ={})
        assert "http.allowed_hosts.0" in str(raised.value) and words in str(raised.value)


def test_chromium_through_an_allowed_name_and_a_rebound_one(
        pas: PasProcess, tmp_path: Path) -> None:
    """Chromium resolves both names to PAS's address (no DNS involved): the page loaded
    through the configured name is the status page; the rebound name gets the refusal."""
    port = pas.http_port
    browser: Any = chromium(tmp_path / "chromium", flags=(
        f"--host-resolver-rules=MAP {ALLOWED_NAME} 127.0.0.1, MAP evil.example 127.0.0.1",))
    try:
        browser.get(f"http://{ALLOWED_NAME}:{port}/")
        assert PATIENT_ID in browser.page_source
        assert "PAS" in browser.title
        browser.get(f"http://{ALLOWED_NAME}:{port}/dicom-web/studies")
        assert PATIENT_ID in browser.page_source
        browser.get(f"http://evil.example:{port}/dicom-web/studies")
        assert "http.allowed_hosts" in browser.page_source
        assert PATIENT_ID not in browser.page_source
    finally:
        browser.quit()


def test_with_client_certificates_the_certificates_names_are_known(tmp_path: Path) -> None:
    """``client_cert``: the names the browser checks the certificate against are the names
    viewers use; its exact DNS names are answered, a wildcard is not taken as one."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from appliance.config import load_settings
    from appliance.web.hosts import KnownHosts

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pas")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("PACS-Gateway.hospital.test"), x509.DNSName("*.wild.test")]),
                critical=False).sign(key, hashes.SHA256()))
    (tmp_path / "web.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    settings = load_settings(None, environ={
        "PAS_HOME": str(tmp_path), "PAS_SERVING__AUTH": "client_cert",
        "PAS_SERVING__TLS_CERT": str(tmp_path / "web.crt"),
        "PAS_SERVING__TLS_KEY": str(tmp_path / "web.key"),
        "PAS_SERVING__TLS_CLIENT_CA": str(tmp_path / "web.crt")})
    known = KnownHosts.of(settings)
    assert known.allows("pacs-gateway.hospital.test")
    assert not known.allows("wild.test") and not known.allows("x.wild.test")
    assert not known.allows("evil.example")
