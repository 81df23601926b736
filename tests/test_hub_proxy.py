"""``hub.proxy``: an appliance whose firewall lets nothing out but the hospital's HTTP proxy
reaches its hub through it, for everything (enrolment, uploads, heartbeats, ``pas doctor``),
TLS and the client certificate end to end inside CONNECT tunnels.

The appliance runs in a network namespace of its own (198.18.0.0/15): from there the hub
(``pas hub run`` on this host's loopback, ``https://localhost:PORT``) cannot be reached at
all but through the proxy, Debian's ``tinyproxy``, listening on this host's end of the
namespace's link. A call that went around the proxy would fail, not pass unseen; the proxy's
log says each tunnel was asked for.

Before ``hub.proxy`` PAS ignored proxies altogether (appliance/transfer/http.py never reads
``HTTPS_PROXY``): such a site could not be enrolled.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from appliance.config import ConfigError, load_settings
from appliance.ops.doctor_hub import check_hub
from appliance.transfer.enrolment import EnrolmentError
from appliance.transfer.enrolment import enroll as enroll_appliance
from appliance.transfer.http import http_client
from tests.support.http_proxy import TinyProxy
from tests.support.hub import HubProcess
from tests.support.netns import NetNamespace
from tests.support.peers import CT_DIR, PAS_BIN, PasProcess, read_rows, storescu, wait_for

CREDENTIALS = ("pas-site", "Pr0xy-S3cret")
FILES = sorted(CT_DIR.glob("*.dcm"))[:3]


@pytest.fixture(scope="module")
def ns() -> Iterator[NetNamespace]:
    namespace = NetNamespace("pasproxy").create()
    yield namespace
    namespace.delete()


@pytest.fixture(scope="module")
def proxy(ns: NetNamespace, hub: HubProcess,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyProxy]:
    process = TinyProxy(tmp_path_factory.mktemp("proxy"), ns.outer_address, ns.inner_address,
                        [hub.port], CREDENTIALS).start()
    yield process
    process.stop()


def _env(home: Path, proxy: TinyProxy | None, password: str = CREDENTIALS[1],
         **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    env = {**clean, "PAS_HOME": str(home), "PAS_DICOM__ACCEPT_UNKNOWN": "true", **extra}
    if proxy is not None:
        env.update({"PAS_HUB__PROXY": proxy.url, "PAS_HUB__PROXY_USERNAME": CREDENTIALS[0],
                    "PAS_HUB__PROXY_PASSWORD": password})
    return env


def _in_ns(ns: NetNamespace, args: list[str], env: dict[str, str],
           stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``pas ARGS`` run inside the namespace (a new interpreter: the namespace is the
    process's)."""
    return subprocess.run(ns.command([str(PAS_BIN), *args]), env=env, input=stdin,
                          capture_output=True, text=True, timeout=120)


def _hub_row(ns: NetNamespace, env: dict[str, str]) -> dict[str, Any]:
    result = _in_ns(ns, ["doctor", "--json"], env)
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    return rows["hub"]


@pytest.fixture(scope="module")
def enrolled(ns: NetNamespace, hub: HubProcess, proxy: TinyProxy,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home enrolled by ``pas enroll`` run in the namespace, through the proxy; the same
    command without the proxy fails first (nothing there reaches the hub), its token unspent."""
    home = tmp_path_factory.mktemp("site") / "home"
    token = hub.token("CHU-PROXY")
    direct = _in_ns(ns, ["enroll", "--hub", hub.url, "--token", "-"], _env(home, None),
                    f"{token}\n")
    assert direct.returncode != 0, direct.stdout
    assert f"cannot reach the hub at {hub.url}" in direct.stderr, direct.stderr
    assert proxy.tunnels() == []
    through = _in_ns(ns, ["enroll", "--hub", hub.url, "--token", "-"], _env(home, proxy),
                     f"{token}\n")
    assert through.returncode == 0, through.stdout + through.stderr
    assert (home / "pki" / "hub.json").exists()
    # The CA fetched, then the CSR posted: two tunnels, both to the hub.
    assert proxy.tunnels() == [f"localhost:{hub.port}"] * 2, proxy.log()
    return home


def test_uploads_heartbeats_and_doctor_go_through_the_proxy(
        ns: NetNamespace, hub: HubProcess, proxy: TinyProxy, enrolled: Path) -> None:
    tunnels_before = len(proxy.tunnels())
    pas = PasProcess(enrolled, _env(enrolled, proxy, **{
        "PAS_DICOM__HOST": ns.inner_address, "PAS_HTTP__HOST": ns.inner_address,
        "PAS_HL7__HOST": ns.inner_address, "PAS_OPS__HEARTBEAT_INTERVAL_S": "1"}))
    pas.env.update({"PAS_DICOM__PORT": str(pas.port), "PAS_HTTP__PORT": str(pas.http_port),
                    "PAS_HL7__PORT": str(pas.hl7_port)})
    pas.launcher, pas.probe_host = tuple(ns.command([])), ns.inner_address
    pas.start()
    try:
        storescu(FILES, pas.port, host=ns.inner_address)
        db = enrolled / "pas.sqlite"

        def all_confirmed() -> list[Any] | None:
            found = read_rows(db, "SELECT sop_instance_uid, sha256 FROM instances WHERE "
                              "confirmed_at IS NOT NULL")
            return found if len(found) == len(FILES) else None

        confirmed = wait_for(all_confirmed, 90, what=f"{len(FILES)} instances confirmed by "
                             f"the hub (log {pas.log_path})")
        # The modality's images; what the hub's archive holds of them is what PAS stored,
        # byte for byte.
        assert {row["sop_instance_uid"] for row in confirmed} == {
            str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in FILES}
        archive = hub.home / "archive"
        archived = {r["sop_instance_uid"]: r["path"] for r in read_rows(
            archive / "pas.sqlite", "SELECT sop_instance_uid, path FROM instances")}
        for row in confirmed:
            data = (archive / "spool" / archived[row["sop_instance_uid"]]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row["sha256"]
        wait_for(lambda: "hub unreachable" not in pas.log() and read_rows(
            hub.home / "hub.sqlite", "SELECT site FROM fleet_heartbeats WHERE site = ?",
            ("CHU-PROXY",)), 30, what="a heartbeat at the hub")
        hub_row = _hub_row(ns, _env(enrolled, proxy))
        assert hub_row["verdict"] == "ok", hub_row
        assert f"through the proxy {proxy.url}" in hub_row["detail"]
    finally:
        pas.stop()
    assert f"through the proxy {proxy.url}" in pas.log()  # "enrolled with hub ... as site"
    tunnels = proxy.tunnels()[tunnels_before:]
    assert len(tunnels) >= 3, proxy.log()  # uploads, heartbeats, doctor's call at least
    assert set(tunnels) == {f"localhost:{hub.port}"}
    # Without the proxy the same home reaches nothing from there: every call above used it.
    direct = _hub_row(ns, _env(enrolled, None))
    assert direct["verdict"] == "fail" and "proxy" not in direct["detail"], direct


def test_a_proxy_refusing_or_down_is_named_with_what_to_check(
        ns: NetNamespace, hub: HubProcess, proxy: TinyProxy, enrolled: Path,
        tmp_path: Path) -> None:
    wrong = _hub_row(ns, _env(enrolled, proxy, password="not-it"))
    assert wrong["verdict"] == "fail"
    # tinyproxy answers 401 (RFC 9110 wants 407; either is a credentials' refusal).
    assert wrong["detail"].startswith(f"the proxy {proxy.url} refused the tunnel to "
                                      f"{hub.url}: 401"), wrong
    assert "hub.proxy_username and hub.proxy_password" in wrong["fix"]
    assert "not-it" not in json.dumps(wrong)

    # A proxy that opens tunnels to other ports only (tinyproxy's ConnectPort).
    strict = TinyProxy(tmp_path / "strict", ns.outer_address, ns.inner_address,
                       [hub.port + 1], CREDENTIALS).start()
    try:
        refused = _hub_row(ns, {**_env(enrolled, proxy), "PAS_HUB__PROXY": strict.url})
    finally:
        strict.stop()
    assert refused["detail"].startswith(f"the proxy {strict.url} refused the tunnel to "
                                        f"{hub.url}: 403"), refused
    assert f"CONNECT) to localhost:{hub.port}" in refused["fix"]

    # Nothing listening where hub.proxy says.
    down = _hub_row(ns, {**_env(enrolled, proxy), "PAS_HUB__PROXY": strict.url})
    assert down["detail"].startswith(f"cannot reach the proxy {strict.url} (hub.proxy)"), down
    assert "ask the network team" in down["fix"]


@pytest.mark.parametrize(("environ", "problem"), [
    ({"PAS_HUB__PROXY": "https://proxy.example:3128"},
     "hub.proxy: must be http://host:port (a CONNECT proxy; the tunnel carries the hub's own "
     "TLS), got 'https://proxy.example:3128' (set by PAS_HUB__PROXY)"),
    ({"PAS_HUB__PROXY": "http://proxy.example:3128/path"},
     "hub.proxy: must be http://host:port, with no path, got "
     "'http://proxy.example:3128/path' (set by PAS_HUB__PROXY)"),
    ({"PAS_HUB__PROXY": "http://proxy.example"},
     None),
    ({"PAS_HUB__PROXY_USERNAME": "pas", "PAS_HUB__PROXY_PASSWORD": "x"},
     "hub.proxy_username: is set but hub.proxy is not (set by PAS_HUB__PROXY_USERNAME)"),
    ({"PAS_HUB__PROXY": "http://proxy.example:3128", "PAS_HUB__PROXY_USERNAME": "pas"},
     "hub.proxy_password: is required with proxy_username"),
    ({"PAS_HUB__PROXY": "http://proxy.example:3128", "PAS_HUB__PROXY_PASSWORD": "x"},
     "hub.proxy_username: is required with proxy_password"),
    ({"PAS_HUB__PROXY": "http://proxy.example:3128", "PAS_HUB__PROXY_USERNAME": "a:b",
      "PAS_HUB__PROXY_PASSWORD": "x"},
     "hub.proxy_username: must be a non-empty name without ':' (HTTP Basic) (set by "
     "PAS_HUB__PROXY_USERNAME)"),
])
def test_a_proxy_setting_that_cannot_work_is_refused_naming_the_key(
        environ: dict[str, str], problem: str | None) -> None:
    if problem is None:
        assert load_settings(environ=environ).hub.proxy == "http://proxy.example"
        return
    with pytest.raises(ConfigError) as raised:
        load_settings(environ=environ)
    assert raised.value.problems == [problem]


def test_proxy_credentials_in_the_url_are_refused_without_showing_them() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"PAS_HUB__PROXY": "http://pas:S3cret@proxy.example:3128"})
    [problem] = raised.value.problems
    assert problem.startswith("hub.proxy: holds credentials (user:password@host)")
    assert "put them in hub.proxy_username and hub.proxy_password" in problem
    assert "S3cret" not in problem


def _start_in_ns(ns: NetNamespace, home: Path, proxy: TinyProxy, password: str,
                 **extra: str) -> PasProcess:
    pas = PasProcess(home, _env(home, proxy, password, **{
        "PAS_DICOM__HOST": ns.inner_address, "PAS_HTTP__HOST": ns.inner_address,
        "PAS_HL7__HOST": ns.inner_address, **extra}))
    pas.env.update({"PAS_DICOM__PORT": str(pas.port), "PAS_HTTP__PORT": str(pas.http_port),
                    "PAS_HL7__PORT": str(pas.hl7_port)})
    pas.launcher, pas.probe_host = tuple(ns.command([])), ns.inner_address
    return pas.start()


def test_refused_proxy_credentials_wait_for_a_person_and_are_not_hammered(
        ns: NetNamespace, hub: HubProcess, proxy: TinyProxy, enrolled: Path) -> None:
    """Review s42 F1: a 401/407 of the proxy was taken for the link being down, and every
    worker, the keep-warm thread and the heartbeat asked again every few seconds (123
    CONNECTs refused in 2 minutes): a proxy checking its credentials against the hospital's
    directory locks the service account. Now the job waits for credentials (shown by
    ``pas status``, attempts not counted) and the proxy is not asked again for 5 minutes."""
    pas = _start_in_ns(ns, enrolled, proxy, "not-it",
                       PAS_OPS__HEARTBEAT_INTERVAL_S="1", PAS_QUEUE__BACKOFF_INITIAL_S="0.5",
                       PAS_QUEUE__BACKOFF_MAX_S="1")
    try:
        # An image the home does not hold yet (the upload test sent FILES): a new job.
        storescu(sorted(CT_DIR.glob("*.dcm"))[3:4], pas.port, host=ns.inner_address)
        db = enrolled / "pas.sqlite"
        job = wait_for(lambda: next((j for j in read_rows(db, "SELECT * FROM jobs WHERE "
                                                          "state = 'pending'")
                                     if (j["last_error"] or "").startswith(
                                         "waiting for credentials")), None), 60,
                       what=f"the job waiting for credentials (log {pas.log_path})")
        assert "the hospital's proxy refuses this appliance's credentials (401" in \
            job["last_error"], job["last_error"]
        assert job["attempts"] == 0
        asked = len(proxy.tunnels())
        # Heartbeats every second, jobs due every second: none of them reaches the proxy
        # (an absence over a span of time: nothing to await).
        time.sleep(4)
        assert len(proxy.tunnels()) == asked, proxy.tunnels()[asked:]
        refused = pas.status()["credentials_refused"]
        assert refused and "proxy refuses" in refused[0]["error"]
    finally:
        pas.stop()


class BlackHole:
    """A TCP port on loopback whose accept queue is full: a SYN to it is dropped, as by a
    hub across a WAN that went silent."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(0)
        self.port = self.server.getsockname()[1]
        self.fillers = []
        for _ in range(3):  # fill the queue: the next SYN gets no answer
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)

    def close(self) -> None:
        for sock in [*self.fillers, self.server]:
            sock.close()


def test_a_silent_hub_behind_the_proxy_is_given_up_at_the_connect_bound(
        tmp_path: Path) -> None:
    """Review s42 F2: the proxy's answer to CONNECT was awaited for the read timeout (60 s
    by default), not the connect bound (10 s): a viewer's fetch-through waited minutes for
    a hub that drops every packet. Here: connect bound 1 s, read timeout 60 s."""
    hole = BlackHole()
    front = TinyProxy(tmp_path / "proxy", "127.0.0.1", "127.0.0.1", [hole.port]).start()
    try:
        client = http_client(proxy=httpx.Proxy(front.url), verify=False,
                             timeout=httpx.Timeout(60.0, connect=1.0))
        began = time.monotonic()
        with client, pytest.raises(httpx.TimeoutException):
            client.get(f"https://127.0.0.1:{hole.port}/api/v1/whoami")
        waited = time.monotonic() - began
    finally:
        front.stop()
        hole.close()
    assert front.tunnels() == [f"127.0.0.1:{hole.port}"]
    assert waited < 10, waited  # the connect bound and some, not the read timeout's minute


def test_a_tls_failure_inside_the_tunnel_is_not_blamed_on_the_proxy(tmp_path: Path) -> None:
    """Review s42 F3: a hub (or a TLS-inspecting proxy) closing the connection at the TLS
    handshake was said as "cannot reach the proxy" though the proxy had opened the tunnel."""
    closer = socket.create_server(("127.0.0.1", 0))
    port = closer.getsockname()[1]
    stop = threading.Event()

    def close_each() -> None:
        closer.settimeout(0.2)
        while not stop.is_set():
            try:
                peer, _ = closer.accept()
            except OSError:
                continue
            peer.recv(1024)  # the ClientHello, then closed
            peer.close()

    thread = threading.Thread(target=close_each, daemon=True)
    thread.start()
    front = TinyProxy(tmp_path / "proxy", "127.0.0.1", "127.0.0.1", [port]).start()
    try:
        # The enrolment's record, as check_hub reads it: the hub's URL and a TLS context.
        record = SimpleNamespace(url=f"https://localhost:{port}",
                                 ssl_context=ssl.create_default_context)
        [row] = [c for c in check_hub(record, httpx.Proxy(front.url)) if c.name == "hub"]
    finally:
        front.stop()
        stop.set()
        thread.join(5)
        closer.close()
    assert front.tunnels() == [f"localhost:{port}"]
    assert row.verdict == "fail"
    assert row.detail.startswith(f"the tunnel to https://localhost:{port} through the proxy "
                                 f"{front.url} opened, but the TLS handshake with the hub "
                                 "failed"), row.detail
    assert "inspects TLS" in row.fix


def test_an_ipv6_hub_through_a_proxy_is_refused_before_anything_is_sent(
        tmp_path: Path) -> None:
    """Review s42 F6: httpx writes CONNECT 2001:db8::10:8443 (no brackets): no proxy reads
    it. Refused at the enrolment, in one line, the token unspent."""
    with pytest.raises(EnrolmentError) as refused:
        enroll_appliance(tmp_path / "home", "https://[2001:db8::10]:8443",
                         "SITE.SECRET0123456789abcdef." + "0" * 64,
                         proxy=httpx.Proxy("http://127.0.0.1:9"))
    assert "not an IPv6 one" in str(refused.value)
    assert not (tmp_path / "home").exists()


def test_config_check_warns_of_dicomweb_peers_that_go_around_the_proxy(
        tmp_path: Path) -> None:
    """Review s42 F5: hub.proxy is the hub's only; a regional STOW-RS destination or a
    plain DICOMweb region is reached directly, which the image's firewall (the proxy alone
    let out) drops. Said by ``pas config check`` (a warning: it may be on the LAN)."""
    env = {**_env(tmp_path / "home", None), "PAS_HUB__PROXY": "http://10.1.2.9:3128",
           "PAS_DESTINATIONS__REGION__KIND": "stowrs",
           "PAS_DESTINATIONS__REGION__URL": "https://pacs.region.example/dicom-web",
           "PAS_DESTINATIONS__LOCAL__KIND": "stowrs",
           "PAS_DESTINATIONS__LOCAL__URL": "http://127.0.0.1:8042/dicom-web",
           # Through the proxy, as said: no warning.
           "PAS_DESTINATIONS__CLOUD__KIND": "stowrs",
           "PAS_DESTINATIONS__CLOUD__URL": "https://cloud.example/dicom-web",
           "PAS_DESTINATIONS__CLOUD__THROUGH_PROXY": "true"}
    result = subprocess.run([str(PAS_BIN), "config", "check", "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["warnings"] == [
        "destinations.region (https://pacs.region.example/dicom-web) is reached directly, not "
        "through hub.proxy (the hub's connections, STOW-RS destinations with through_proxy "
        "= true and prefetch.dicomweb_through_proxy use it): check that the firewall lets it "
        "out"]
