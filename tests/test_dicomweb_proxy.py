"""DICOMweb peers outside the hospital, reached through its outgoing proxy (``hub.proxy``
and its credentials): a STOW-RS destination (``destinations.<name>.through_proxy = true``)
and a plain DICOMweb region (``prefetch.dicomweb_through_proxy = true``, its regional CA in
``prefetch.dicomweb_ca_file``).

Before, only the hub's connections went through the proxy: where only the proxy may go out
(the appliance image's firewall with a seed's proxy), a STOW-RS archive in the cloud or a
region's DICOMweb could not be reached at all, and ``pas config check`` could only warn of
it. A region under a private CA could not be reached either (no key named its CA).

Real peers: Debian's tinyproxy with HTTP Basic (tests/support/http_proxy.py), Orthanc's
DICOMweb as the archive behind an HTTPS front whose certificate is under the test's CA
(tests/support/tlsfront.py, tests/faults/pki.py), DCMTK's storescu as the CT. The archive's
front counts its TLS connections: each must have come through a tunnel the proxy opened.
"""

from __future__ import annotations

import functools
import http.server
import re
import ssl
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from appliance.store.db import Database
from appliance.transfer.http import http_client
from tests.faults.pki import make_pki
from tests.support.archived import orthanc_hashes
from tests.support.findscu import find
from tests.support.http_proxy import TinyProxy
from tests.support.peers import (
    CT_DIR,
    Orthanc,
    PasProcess,
    free_port,
    read_rows,
    run_pas,
    storescu,
    wait_for,
)
from tests.support.tlsfront import TlsFront
from tests.test_routing import jobs_of

CT_FILES = sorted(CT_DIR.glob("*.dcm"))[:3]


def _stored(home: Path) -> dict[str, str]:
    return {r["sop_instance_uid"]: r["sha256"] for r in read_rows(
        home / "pas.sqlite", "SELECT sop_instance_uid, sha256 FROM instances")}


def test_a_stowrs_archive_through_the_proxy_gets_every_instance_bit_exact(
        tmp_path: Path, orthanc_factory: Any) -> None:
    pki = make_pki(tmp_path / "pki")  # server.crt: 127.0.0.1, under the test's CA
    orthanc: Orthanc = orthanc_factory()
    front = TlsFront(orthanc.host, orthanc.http_port, pki / "server.crt",
                     pki / "server.key").start()
    proxy = TinyProxy(tmp_path / "proxy", "127.0.0.1", "127.0.0.1", [front.port],
                      credentials=("pas-site", "right-one")).start()
    env = {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
           "PAS_HUB__PROXY": proxy.url, "PAS_HUB__PROXY_USERNAME": "pas-site",
           "PAS_HUB__PROXY_PASSWORD": "wrong-one",
           "PAS_DESTINATIONS__ARCHIVE__KIND": "stowrs",
           "PAS_DESTINATIONS__ARCHIVE__URL": f"{front.url}/dicom-web",
           "PAS_DESTINATIONS__ARCHIVE__CA_FILE": str(pki / "ca.crt"),
           "PAS_DESTINATIONS__ARCHIVE__THROUGH_PROXY": "true",
           "PAS_ROUTING__FALLBACK__DESTINATIONS": '["archive"]',
           "PAS_QUEUE__BACKOFF_INITIAL_S": "0.2", "PAS_QUEUE__BACKOFF_MAX_S": "0.5"}
    pas = PasProcess(tmp_path / "pas", env)
    try:
        pas.start()
        storescu(CT_FILES, pas.port)
        studies = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in CT_FILES}

        # The proxy refuses the credentials: the jobs wait for a person, uncounted; the
        # proxy is asked once, not at every retry (a directory account would be locked).
        def waiting() -> bool:
            jobs = jobs_of(pas.home)
            return len(jobs) == len(studies) and all(
                j["state"] == "pending" and "refuses this appliance's credentials"
                in (j["last_error"] or "") for j in jobs)

        wait_for(waiting, 60, what="the jobs waiting for the proxy's credentials")
        job = jobs_of(pas.home)[0]
        assert job["attempts"] == 0, job
        # The proxy's own answer, or (a job that asked after it) the same from the refusal
        # memory, which says how long ago the proxy gave it.
        assert re.fullmatch(
            r"waiting for credentials: archive: the hospital's proxy refuses this appliance's "
            r"credentials \(401 Unauthorized( \(the proxy's answer \d+ s ago: not asked again "
            r"for \d+ s\))?\): check hub\.proxy_username and hub\.proxy_password with the "
            r"network team", job["last_error"]), job["last_error"]
        refused = proxy.tunnels()  # one per worker that asked before the first answer
        assert refused and set(refused) == {f"127.0.0.1:{front.port}"}, refused
        assert len(refused) <= len(studies), refused
        # The jobs try again every 0.5 s (queue.backoff_max_s): for 2 s, the proxy's last
        # answer is theirs, the proxy not asked.
        seen = max(j["updated_at"] for j in jobs_of(pas.home))
        wait_for(lambda: max(j["updated_at"] for j in jobs_of(pas.home)) > seen + 2, 30,
                 what="the waiting jobs to try again for 2 s")
        assert proxy.tunnels() == refused
        assert front.connections == 0 and orthanc.instances() == []

        # The network team gives the right password; the restart sends the waiting jobs.
        pas.stop()
        pas.env["PAS_HUB__PROXY_PASSWORD"] = "right-one"
        pas.start()
        wait_for(lambda: (lambda jobs: bool(jobs) and all(j["state"] == "done" for j in jobs))(
            jobs_of(pas.home)), 90, what="every job done through the proxy")
        stored = _stored(pas.home)
        assert len(stored) == len(CT_FILES)
        assert orthanc_hashes(orthanc) == stored  # bit-exact at the archive
        tunnels = proxy.tunnels()
        assert set(tunnels) == {f"127.0.0.1:{front.port}"}, tunnels
        # Every TLS connection the archive's front took came through one of the proxy's
        # tunnels (the first ones were refused): none went around the proxy.
        assert 1 <= front.connections <= len(tunnels) - len(refused), (front.connections,
                                                                         tunnels)
    finally:
        pas.stop()
        proxy.stop()
        front.stop()


def test_through_proxy_without_a_proxy_is_refused_naming_the_key(tmp_path: Path) -> None:
    env = {"PAS_HOME": str(tmp_path / "home"),
           "PAS_DESTINATIONS__ARCHIVE__KIND": "stowrs",
           "PAS_DESTINATIONS__ARCHIVE__URL": "https://archive.example/dicom-web",
           "PAS_DESTINATIONS__ARCHIVE__THROUGH_PROXY": "true"}
    result = run_pas(["config", "check"], {**env, "COLUMNS": "300"}, timeout=60)
    assert result.returncode != 0
    said = " ".join((result.stdout + result.stderr).split())
    assert ("destinations.archive.through_proxy: hub.proxy is not set (the hospital's proxy "
            "these requests would go through)") in said, said


def test_a_proxy_that_cannot_reach_the_archive_is_the_link_down_named(
        tmp_path: Path) -> None:
    """The proxy takes the tunnel but nothing answers at the archive's address (tinyproxy
    answers with an error status): the link is down, not the job's fault: it waits,
    uncounted, its error naming the proxy."""
    archive_port = free_port()  # nothing listens there
    proxy = TinyProxy(tmp_path / "proxy", "127.0.0.1", "127.0.0.1", [archive_port]).start()
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HUB__PROXY": proxy.url,
        "PAS_DESTINATIONS__ARCHIVE__KIND": "stowrs",
        "PAS_DESTINATIONS__ARCHIVE__URL": f"https://127.0.0.1:{archive_port}/dicom-web",
        "PAS_DESTINATIONS__ARCHIVE__THROUGH_PROXY": "true",
        "PAS_ROUTING__FALLBACK__DESTINATIONS": '["archive"]',
        "PAS_QUEUE__BACKOFF_INITIAL_S": "0.2", "PAS_QUEUE__BACKOFF_MAX_S": "0.5"})
    try:
        pas.start()
        storescu(CT_FILES[:1], pas.port)
        wait_for(lambda: any("unreachable" in (j["last_error"] or "")
                             for j in jobs_of(pas.home)), 90, what="the job waiting for the link")
        [job] = jobs_of(pas.home)
        assert job["state"] == "pending" and job["attempts"] == 0, job
        assert job["last_error"].startswith(
            f"waiting for the link: archive unreachable: no connection to "
            f"https://127.0.0.1:{archive_port}/dicom-web/studies through the proxy "
            f"{proxy.url} after "), job["last_error"]
        assert f"127.0.0.1:{archive_port}" in proxy.tunnels()
    finally:
        pas.stop()
        proxy.stop()


def test_a_dicomweb_region_through_the_proxy_under_its_own_ca_answers_c_find(
        tmp_path: Path, orthanc_factory: Any) -> None:
    pki = make_pki(tmp_path / "pki")
    orthanc: Orthanc = orthanc_factory()
    storescu(CT_FILES[:1], orthanc.dicom_port, host=orthanc.host, called="ORTHANC")
    study = str(dcmread(CT_FILES[0], stop_before_pixels=True).StudyInstanceUID)
    front = TlsFront(orthanc.host, orthanc.http_port, pki / "server.crt",
                     pki / "server.key").start()
    proxy = TinyProxy(tmp_path / "proxy", "127.0.0.1", "127.0.0.1", [front.port],
                      credentials=("pas-site", "right-one")).start()
    env = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
           "PAS_HUB__PROXY": proxy.url, "PAS_HUB__PROXY_USERNAME": "pas-site",
           "PAS_HUB__PROXY_PASSWORD": "right-one",
           "PAS_PREFETCH__DICOMWEB_URL": f"{front.url}/dicom-web",
           "PAS_PREFETCH__DICOMWEB_CA_FILE": str(pki / "ca.crt"),
           "PAS_PREFETCH__DICOMWEB_THROUGH_PROXY": "true",
           "PAS_SERVING__QUERY_REGION": "true", "PAS_SERVING__REGION_QUERY_TIMEOUT_S": "10"}
    pas = PasProcess(tmp_path / "pas", env)
    try:
        pas.start()
        answers, final = find(pas.port, "-S", "STUDY",
                              [f"StudyInstanceUID={study}", "InstanceAvailability",
                               "NumberOfStudyRelatedInstances"], tmp_path / "find")
        assert final == 0x0000
        assert [(status, str(ds.StudyInstanceUID), ds.InstanceAvailability)
                for status, ds in answers] == [(0xFF00, study, "NEARLINE")]
        tunnels = proxy.tunnels()
        assert tunnels and set(tunnels) == {f"127.0.0.1:{front.port}"}, tunnels
        assert 1 <= front.connections <= len(tunnels), (front.connections, tunnels)
    finally:
        pas.stop()
        proxy.stop()
        front.stop()


def test_the_regions_ca_file_and_proxy_keys_are_refused_when_they_cannot_apply(
        tmp_path: Path) -> None:
    base = {"PAS_HOME": str(tmp_path / "home"),
            "PAS_PREFETCH__DICOMWEB_URL": "https://region.example/dicom-web"}
    cases: tuple[tuple[dict[str, str | None], str], ...] = (
            ({"PAS_PREFETCH__DICOMWEB_THROUGH_PROXY": "true"},
             "prefetch.dicomweb_through_proxy: hub.proxy is not set"),
            ({"PAS_PREFETCH__DICOMWEB_URL": None, "PAS_HUB__PROXY": "http://10.1.2.9:3128",
              "PAS_PREFETCH__DICOMWEB_THROUGH_PROXY": "true"},
             "prefetch.dicomweb_through_proxy: is for prefetch.dicomweb_url, which is not "
             "set"),
            ({"PAS_PREFETCH__DICOMWEB_URL": "http://region.example/dicom-web",
              "PAS_PREFETCH__ALLOW_CLEARTEXT": "true",
              "PAS_PREFETCH__DICOMWEB_CA_FILE": str(tmp_path / "ca.crt")},
             "prefetch.dicomweb_ca_file: is for an https:// prefetch.dicomweb_url"))
    for extra, said in cases:
        env = {key: value for key, value in {**base, **extra}.items() if value is not None}
        result = run_pas(["config", "check"], {**env, "COLUMNS": "300"}, timeout=60)
        assert result.returncode != 0, extra
        assert said in " ".join((result.stdout + result.stderr).split()), (extra, result)


def test_a_region_ca_file_pas_run_cannot_read_stops_its_start_and_nothing_else(
        tmp_path: Path) -> None:
    """Review s43: read by the configuration's validation, a CA file missing there stopped
    every command (pas status, pas doctor, a configuration checked on another machine).
    Now pas run refuses to start on it, naming the key; pas config check warns (exit 0);
    pas status runs. A region on this machine's loopback through the proxy: a warning."""
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("not a certificate\n")
    env = {"PAS_HOME": str(tmp_path / "home"), "COLUMNS": "300",
           "PAS_PREFETCH__DICOMWEB_URL": "https://127.0.0.1:8443/dicom-web",
           "PAS_PREFETCH__DICOMWEB_CA_FILE": str(not_pem),
           "PAS_HUB__PROXY": "http://10.1.2.9:3128",
           "PAS_PREFETCH__DICOMWEB_THROUGH_PROXY": "true"}
    refused = f"prefetch.dicomweb_ca_file: {not_pem}: not a readable PEM bundle of CA certificates"
    checked = run_pas(["config", "check"], env, timeout=60)
    said = " ".join((checked.stdout + checked.stderr).split())
    assert checked.returncode == 0, said
    assert f"warning {refused}" in said and "pas run refuses to start on it" in said, said
    assert ("warning prefetch.dicomweb_url (https://127.0.0.1:8443/dicom-web) is this "
            "machine's loopback, and goes through hub.proxy") in said, said
    started = run_pas(["run"], env, timeout=60)
    said = " ".join((started.stdout + started.stderr).split())
    assert started.returncode == 1 and f"cannot start: {refused}" in said, said
    assert not (tmp_path / "home" / "pas.sqlite").exists()
    status = run_pas(["status", "--json"], env, timeout=60)
    assert "dicomweb_ca_file" not in status.stdout + status.stderr, status
    # pas verify --repair builds a region client too: one line, not a traceback.
    Database(tmp_path / "home" / "pas.sqlite").close()
    repair = run_pas(["verify", "--repair"], env, timeout=60)
    said = " ".join((repair.stdout + repair.stderr).split())
    assert repair.returncode == 1, said
    assert said.startswith(f"cannot repair from the region: {refused}"), said
    assert "Traceback" not in said, said


def test_a_tunnel_the_proxy_forbids_does_not_stop_the_others_through_it(
        tmp_path: Path) -> None:
    """Review s43: the refusal memory was one per proxy and credentials: a proxy forbidding
    a STOW-RS archive's port (403) made every call to the hub fail here for 5 minutes, the
    proxy not asked. A 403 is now remembered for its tunnel only; a refusal of the
    credentials (407) still for every tunnel. Real tinyproxy, allowing one port."""
    pki = make_pki(tmp_path / "pki")
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("allowed\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    front = TlsFront("127.0.0.1", upstream.server_address[1], pki / "server.crt",
                     pki / "server.key").start()
    forbidden = free_port()
    proxy = TinyProxy(tmp_path / "proxy", "127.0.0.1", "127.0.0.1", [front.port],
                      credentials=("pas-site", "right-one")).start()
    verify = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    try:
        right = httpx.Proxy(proxy.url, auth=("pas-site", "right-one"))
        with http_client(proxy=right, verify=verify, timeout=10) as client:
            for _ in range(2):  # the second from the memory, the proxy not asked
                with pytest.raises(httpx.ProxyError, match="^403"):
                    client.get(f"https://127.0.0.1:{forbidden}/")
            assert proxy.tunnels() == [f"127.0.0.1:{forbidden}"]
            answer = client.get(f"{front.url}/index.html")  # another tunnel: asked, opened
            assert answer.status_code == 200 and answer.text == "allowed\n"
            assert proxy.tunnels() == [f"127.0.0.1:{forbidden}", f"127.0.0.1:{front.port}"]

        wrong = httpx.Proxy(proxy.url, auth=("pas-site", "wrong-one"))
        with http_client(proxy=wrong, verify=verify, timeout=10) as client:
            with pytest.raises(httpx.ProxyError, match="^401"):
                client.get(f"{front.url}/index.html")
            asked = len(proxy.tunnels())
            with pytest.raises(httpx.ProxyError, match="^401"):  # the credentials: any tunnel
                client.get(f"https://127.0.0.1:{free_port()}/")
            assert len(proxy.tunnels()) == asked
    finally:
        proxy.stop()
        front.stop()
        upstream.shutdown()


def test_through_the_proxy_only_for_https(tmp_path: Path) -> None:
    """Review s43: through a proxy an http:// request is handed to it whole, in clear (the
    images, a bearer token), not tunnelled; a loopback url was accepted, the proxy then
    reaching its own loopback."""
    base = {"PAS_HOME": str(tmp_path / "home"), "PAS_HUB__PROXY": "http://10.1.2.9:3128"}
    cases = (
        ({"PAS_DESTINATIONS__ARCHIVE__KIND": "stowrs",
          "PAS_DESTINATIONS__ARCHIVE__URL": "http://127.0.0.1:8042/dicom-web",
          "PAS_DESTINATIONS__ARCHIVE__THROUGH_PROXY": "true"},
         "destinations.archive.through_proxy: only for an https:// destinations.archive.url: "
         "through the proxy an http:// request is handed to it in clear (patient data and "
         "credentials), not tunnelled"),
        ({"PAS_PREFETCH__DICOMWEB_URL": "http://region.example/dicom-web",
          "PAS_PREFETCH__ALLOW_CLEARTEXT": "true",
          "PAS_PREFETCH__DICOMWEB_THROUGH_PROXY": "true"},
         "prefetch.dicomweb_through_proxy: only for an https:// prefetch.dicomweb_url"))
    for extra, said in cases:
        result = run_pas(["config", "check"], {**base, **extra, "COLUMNS": "300"}, timeout=60)
        assert result.returncode != 0, extra
        assert said in " ".join((result.stdout + result.stderr).split()), (extra, result)
