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
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from appliance.config import ConfigError, load_settings
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
