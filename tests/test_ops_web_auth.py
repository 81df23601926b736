"""``serving.auth`` guards the whole HTTP port of a real daemon: the status page (it shows
patient IDs), /metrics, /api/status and DICOMweb answer 401 without the bearer token and 200
with it (only /healthz stays open); the Retry POST is refused without the token, without the
page's form token and from another site (headless Chromium), and then changes nothing in the
queue; a Retry form over a few KiB is refused with 413 unread, the daemon's memory unmoved;
with client certificates the page, /metrics and /api/status need one even when DICOMweb is off."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from appliance.ops.security import BCP195_TLS12_CIPHERS
from tests.support.browser import OtherSite, chromium, files_containing
from tests.support.cleanup import started
from tests.support.peers import (
    MR_DIR,
    PasProcess,
    StoreSCP,
    read_rows,
    run_pas,
    storescu,
    wait_for,
)
from tests.test_ingest_spill import peak_rss_mb
from tests.test_ops_web import failing_destination, refusing_node
from tests.test_serving_dicomweb import _issue, _write

FILES = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:3]
TOKEN = "s3cret-ops-token"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
ROUTES = ["/", "/metrics", "/api/status", "/dicom-web/studies"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A bearer-protected daemon whose only destination (a storescp) rejects associations:
    one failed job. ``scp`` (on that port, not started) is the node once fixed. (A node not
    listening would make the job wait for the link, uncounted, not fail.)"""
    root = tmp_path_factory.mktemp("ops_auth")
    with contextlib.ExitStack() as stack:  # a step that raises stops those started
        scp, refusing = refusing_node(stack, root)
        pas = started(stack, PasProcess(root / "pas", {
            "PAS_DICOM__ACCEPT_UNKNOWN": "true",
            "PAS_PREFETCH__ENABLED": "false",
            "PAS_SERVING__AUTH": "bearer",
            "PAS_SERVING__BEARER_TOKENS": f'["{TOKEN}"]',
            **failing_destination(scp),
        }))
        storescu(FILES, pas.port)
        wait_for(lambda: pas.status()["jobs"].get("failed") == 1, 60, what="the job to fail")
        refusing.stop()  # the node, down until a test starts scp on its port
        job_id = int(json.loads(pas.cli("queue", "list", "--json").stdout)[0]["id"])
        yield {"pas": pas, "scp": scp, "base": f"http://127.0.0.1:{pas.http_port}",
               "job_id": job_id}


@pytest.mark.parametrize("path", ROUTES)
def test_every_route_needs_the_token(site: dict[str, Any], path: str) -> None:
    url = site["base"] + path
    patient_id = str(dcmread(FILES[0], stop_before_pixels=True).PatientID)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        refused = httpx.get(url, headers=headers, timeout=10)
        assert refused.status_code == 401, (headers, refused.text)
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert patient_id not in refused.text
    allowed = httpx.get(url, headers=GOOD, timeout=10)
    assert allowed.status_code == 200, allowed.text
    if path == "/":
        assert patient_id in allowed.text  # what the 401 kept from a stranger
    assert httpx.get(site["base"] + "/healthz", timeout=10).status_code == 200  # probes


def _failed(pas: PasProcess) -> int:
    return int(pas.status()["jobs"].get("failed", 0))


def test_retry_refused_without_credentials_changes_nothing(site: dict[str, Any]) -> None:
    pas: PasProcess = site["pas"]
    url = f"{site['base']}/jobs/{site['job_id']}/retry"
    before = pas.status()["jobs"]
    page = httpx.get(site["base"] + "/", headers=GOOD, timeout=10).text
    form_token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert form_token, "the retry form carries the page's token"
    attempts = [
        ({}, {"csrf": form_token.group(1)}, 401),                         # no bearer token
        (GOOD, {}, 403),                                                  # no form token
        (GOOD, {"csrf": "forged"}, 403),                                  # a wrong one
        ({**GOOD, "Origin": "http://evil.example"}, {"csrf": form_token.group(1)}, 403),
    ]
    for headers, form, status in attempts:
        answer = httpx.post(url, headers=headers, data=form, timeout=10)
        assert answer.status_code == status, (headers, form, answer.text)
    assert pas.status()["jobs"] == before and _failed(pas) == 1


def test_a_big_retry_form_is_refused_unread(site: dict[str, Any]) -> None:
    """Invariant 8: the Retry form is one token field. A 48 MiB chunked body (no length
    declared) was read whole and parsed (+2x its size at the peak) before the token was
    checked; now the read stops past MAX_RETRY_FORM_BYTES and answers 413, the limit named,
    without reading the rest; a declared length over it is refused unread. Nothing changes."""
    pas: PasProcess = site["pas"]
    assert pas.proc is not None
    url = f"{site['base']}/jobs/{site['job_id']}/retry"
    before = pas.status()["jobs"]
    Path(f"/proc/{pas.proc.pid}/clear_refs").write_text("5")  # VmHWM back to VmRSS
    peak_before = peak_rss_mb(pas.proc.pid)

    def body() -> Iterator[bytes]:
        for _ in range(48):
            yield b"csrf=" + b"a" * ((1 << 20) - 5)

    answer = httpx.post(url, headers=GOOD, content=body(), timeout=30)
    growth = peak_rss_mb(pas.proc.pid) - peak_before
    assert answer.status_code == 413, answer.text
    assert "retry form over 4096 bytes" in answer.text
    assert growth < 16, f"the daemon grew {growth:.0f} MiB reading a refused form"
    # A declared length over the limit: refused before a byte of the body is read.
    with socket.create_connection(("127.0.0.1", pas.http_port), timeout=10) as conn:
        conn.sendall(f"POST /jobs/{site['job_id']}/retry HTTP/1.1\r\n"
                     f"Host: 127.0.0.1:{pas.http_port}\r\n"
                     f"Authorization: Bearer {TOKEN}\r\nContent-Length: 5000000\r\n\r\n"
                     "csrf=x".encode())
        status_line = conn.makefile("rb").readline()
    assert status_line.split()[1] == b"413", status_line
    assert pas.status()["jobs"] == before and _failed(pas) == 1


def _with_token(driver: Any) -> None:
    """The browser adds the bearer token to every request, as a header-adding proxy or
    extension would (to other sites' requests too)."""
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": GOOD})


def test_another_site_cannot_frame_the_retry_button(site: dict[str, Any], browser: Any) -> None:
    """Clickjacking: another site shows the status page in a transparent frame over a decoy
    and the user's click lands on Retry. That POST comes from the page itself (its form
    token, its Origin): only the browser's refusal to frame the page stops it
    (Content-Security-Policy frame-ancestors 'none', X-Frame-Options DENY)."""
    from selenium.webdriver.common.by import By

    _with_token(browser)
    decoy = f"<iframe src='{site['base']}/' onload=\"document.title='framed'\"></iframe>"
    with OtherSite(decoy) as other:
        browser.get(other.url)
        wait_for(lambda: browser.title == "framed", 20, what="the frame's load event")
        browser.switch_to.frame(0)
        try:
            buttons = browser.find_elements(By.CSS_SELECTOR,
                                            "#failed-jobs button[type=submit]")
        finally:
            browser.switch_to.default_content()
    assert buttons == [], "another site shows the Retry button in a frame"
    page = httpx.get(site["base"] + "/", headers=GOOD, timeout=10)
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert _failed(site["pas"]) == 1
    browser.get(site["base"] + "/")  # the policy lets the page's own stylesheet apply
    assert browser.execute_script(
        "return getComputedStyle(document.body).backgroundColor") == "rgb(246, 247, 249)"


def test_browser_keeps_no_copy_of_the_page(site: dict[str, Any], tmp_path: Path) -> None:
    """The status page shows patient IDs: the browser of a shared ward or IT workstation must
    not write it to its disk cache (Cache-Control: no-store)."""
    patient_id = str(dcmread(FILES[0], stop_before_pixels=True).PatientID).encode()
    profile = tmp_path / "chromium"
    driver = chromium(profile)
    try:
        _with_token(driver)
        driver.get(site["base"] + "/")
        assert patient_id.decode() in driver.page_source
        driver.get("about:blank")
    finally:
        driver.quit()  # Chromium ends: what it caches is on disk now
    assert files_containing(profile, patient_id) == []
    page = httpx.get(site["base"] + "/", headers=GOOD, timeout=10)
    assert page.headers["cache-control"] == "no-store"


def test_browser_retry_works_from_the_page_not_from_another_site(site: dict[str, Any],
                                                                 browser: Any) -> None:
    """The browser adds the token to every request (as a header-adding proxy or extension
    would, to other sites' requests too): a page elsewhere that posts the retry form is
    refused; the Retry button of the status page itself delivers."""
    from selenium.webdriver.common.by import By

    pas: PasProcess = site["pas"]
    scp: StoreSCP = site["scp"]
    _with_token(browser)
    forged = (f"<form method=post action='{site['base']}/jobs/{site['job_id']}/retry'>"
              "<input name=csrf value=guess></form><script>document.forms[0].submit()</script>")
    browser.get("data:text/html," + forged)
    wait_for(lambda: "refused" in browser.find_element(By.TAG_NAME, "body").text, 20,
             what="the forged POST's answer")
    assert _failed(pas) == 1

    scp.start()
    browser.get(site["base"] + "/")
    button = browser.find_element(
        By.CSS_SELECTOR, f'tr[data-job-id="{site["job_id"]}"] button[type=submit]')
    button.click()
    wait_for(lambda: pas.status()["jobs"].get("done") == 1, 60, what="the retried job")
    wait_for(lambda: len(scp.files()) == len(FILES), 30, what="files at storescp")
    # Audited with the retry, the token named by its place in serving.bearer_tokens.
    [row] = read_rows(pas.home / "pas.sqlite", "SELECT * FROM audit WHERE event = 'retry'")
    assert (row["actor"], row["source"]) == ("bearer:token-1", "127.0.0.1"), dict(row)
    assert row["detail"].startswith(f"job {site['job_id']} (dicom) to local")


def test_client_certificate_guards_the_page_even_without_dicomweb(tmp_path: Path) -> None:
    ca_key, ca_cert = _issue("viewers CA", None, None, ca=True)
    ca_crt, _ = _write(tmp_path, "ca", ca_key, ca_cert)
    server = _write(tmp_path, "server", *_issue("pas", ca_key, ca_cert.subject, ip="127.0.0.1"))
    viewer = _write(tmp_path, "viewer", *_issue("viewer-1", ca_key, ca_cert.subject))
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
        "PAS_SERVING__ENABLED": "false",
        "PAS_SERVING__AUTH": "client_cert", "PAS_SERVING__TLS_CERT": server[0],
        "PAS_SERVING__TLS_KEY": server[1], "PAS_SERVING__TLS_CLIENT_CA": ca_crt}).start()
    try:
        base = f"https://127.0.0.1:{pas.http_port}"
        trusted = ssl.create_default_context(cafile=ca_crt)
        with_cert = ssl.create_default_context(cafile=ca_crt)
        with_cert.load_cert_chain(*viewer)
        wait_for(lambda: httpx.get(base + "/healthz", verify=with_cert, timeout=5), 20,
                 what="the HTTP port over TLS")
        for path in ROUTES[:3]:
            with pytest.raises(httpx.HTTPError):
                httpx.get(base + path, verify=trusted, timeout=5)  # no client certificate
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{pas.http_port}{path}", timeout=5)  # plain HTTP
            assert httpx.get(base + path, verify=with_cert, timeout=5).status_code == 200
        # The browser would present the certificate to another site's form too: the retry
        # needs the page's form token.
        answer = httpx.post(base + "/jobs/1/retry", verify=with_cert, timeout=5)
        assert answer.status_code == 403
    finally:
        pas.stop()


def test_bearer_with_a_certificate_speaks_https(tmp_path: Path) -> None:
    """``auth = "bearer"`` with ``tls_cert`` and ``tls_key``: the port stayed plain HTTP
    (the certificate ignored, "configuration OK"), and the tokens and the images crossed the
    network in clear. Now HTTPS, with no client certificate asked; the token still needed.
    One of the two set alone is refused by name."""
    ca_key, ca_cert = _issue("viewers CA", None, None, ca=True)
    ca_crt, _ = _write(tmp_path, "ca", ca_key, ca_cert)
    server = _write(tmp_path, "server", *_issue("pas", ca_key, ca_cert.subject, ip="127.0.0.1"))
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
        "PAS_SERVING__AUTH": "bearer", "PAS_SERVING__BEARER_TOKENS": '["s3cret-token"]',
        "PAS_SERVING__TLS_CERT": server[0], "PAS_SERVING__TLS_KEY": server[1]}).start()
    try:
        base = f"https://127.0.0.1:{pas.http_port}"
        trusted = ssl.create_default_context(cafile=ca_crt)
        wait_for(lambda: httpx.get(base + "/healthz", verify=trusted, timeout=5), 20,
                 what="the HTTP port over TLS")
        assert httpx.get(base + "/api/status", verify=trusted, timeout=5).status_code == 401
        token = {"Authorization": "Bearer s3cret-token"}
        assert httpx.get(base + "/api/status", verify=trusted, headers=token,
                         timeout=5).status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP: no token in clear
            httpx.get(f"http://127.0.0.1:{pas.http_port}/api/status", headers=token, timeout=5)
        doctor = {c["name"]: c for c in json.loads(pas.cli("doctor", "--json",
                                                          check=False).stdout)}
        assert doctor["HTTP port"]["verdict"] == "ok", doctor["HTTP port"]
    finally:
        pas.stop()
    alone = run_pas(["config", "check"], {**os.environ, "PAS_HOME": str(tmp_path / "x"),
                                          "PAS_SERVING__TLS_CERT": server[0]}, timeout=60)
    assert alone.returncode == 2 and "serving.tls_key: required with the other" in \
        " ".join(alone.stderr.split()), alone.stderr


def _client_cert_env(tmp_path: Path) -> tuple[dict[str, str], tuple[str, str], str]:
    """serving.auth = client_cert with a CA, PAS's certificate and a viewer's."""
    ca_key, ca_cert = _issue("viewers CA", None, None, ca=True)
    ca_crt, _ = _write(tmp_path, "ca", ca_key, ca_cert)
    server = _write(tmp_path, "server", *_issue("pas", ca_key, ca_cert.subject, ip="127.0.0.1"))
    viewer = _write(tmp_path, "viewer", *_issue("viewer-1", ca_key, ca_cert.subject))
    return {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
            "PAS_SERVING__AUTH": "client_cert", "PAS_SERVING__TLS_CERT": server[0],
            "PAS_SERVING__TLS_KEY": server[1], "PAS_SERVING__TLS_CLIENT_CA": ca_crt}, viewer, ca_crt


def _handshake(port: int, viewer: tuple[str, str], ca_crt: str, *args: str) -> str:
    """The suite ``openssl s_client`` agreed on with the HTTP port ("(NONE)": refused)."""
    result = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                             "-cert", viewer[0], "-key", viewer[1], "-CAfile", ca_crt, *args],
                            input=b"", capture_output=True, timeout=30)
    found = re.search(r"Cipher is (\S+)", result.stdout.decode(errors="replace"))
    assert found, result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    return found[1]


def test_the_https_port_speaks_the_bcp195_suites_only(tmp_path: Path) -> None:
    """With serving.auth = client_cert the HTTP port (DICOMweb: patients' images) took
    uvicorn's cipher list ("TLSv1"): a TLS 1.2 client offering only a CBC suite without AEAD
    (ECDHE-ECDSA-AES256-SHA384) was served, where the DICOM port (same BCP 195 profile,
    appliance/ops/security.py) refuses it. Now the same suites as the DICOM port."""
    env, viewer, ca_crt = _client_cert_env(tmp_path)
    pas = PasProcess(tmp_path / "pas", env).start()
    try:
        port = pas.http_port
        context = ssl.create_default_context(cafile=ca_crt)
        context.load_cert_chain(*viewer)
        wait_for(lambda: httpx.get(f"https://127.0.0.1:{port}/healthz", verify=context,
                                   timeout=5), 20, what="the HTTP port over TLS")
        for cbc in ("ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256",
                    "ECDHE-ECDSA-AES128-SHA"):
            assert _handshake(port, viewer, ca_crt, "-tls1_2", "-cipher", cbc) == "(NONE)", cbc
        for version in ("-tls1", "-tls1_1"):
            assert _handshake(port, viewer, ca_crt, version) == "(NONE)", version
        assert _handshake(port, viewer, ca_crt, "-tls1_2") in BCP195_TLS12_CIPHERS.split(":")
        assert _handshake(port, viewer, ca_crt, "-tls1_3").startswith("TLS_AES_")
        answer = httpx.get(f"https://127.0.0.1:{port}/api/status", verify=context, timeout=5)
        assert answer.status_code == 200
    finally:
        pas.stop()


def test_a_readable_https_key_is_refused_at_start_with_the_fix(tmp_path: Path) -> None:
    """serving.tls_key (the HTTP port's private key) was used with mode 0644, where the
    DICOM port's key (dicom.tls.key) is refused: the configuration says keys are 0600."""
    env, _viewer, _ca = _client_cert_env(tmp_path)
    key = Path(env["PAS_SERVING__TLS_KEY"])
    key.chmod(0o644)
    pas = PasProcess(tmp_path / "pas", env)
    result = run_pas(["run"], pas.env, timeout=60)
    message = result.stdout + result.stderr
    assert result.returncode == 1, message
    assert f"serving.tls_key {key}" in message and f"chmod 600 {key}" in message, message
    assert "PRIVATE KEY" not in message and "http.port" not in message, message
