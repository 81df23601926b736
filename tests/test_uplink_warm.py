"""The uplink keeps its hub connections open while idle (``HubClient.keep_warm``), so a study's
first requests skip the TCP and TLS handshakes (two round trips on a regional line).

Real peers: ``pas hub run`` (TLS 1.3, mutual TLS) and an enrolled identity. The connections are
read from the kernel's own table (``/proc/net/tcp``): client sockets to the hub's port.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.transfer.client import HubClient
from appliance.transfer.enrolment import Enrolment
from tests.support.hub import HubProcess, enroll
from tests.support.peers import wait_for


@pytest.fixture(scope="module")
def site(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> Enrolment:
    return enroll(hub, tmp_path_factory.mktemp("site"), "CHU-WARM")


def _client_ports(hub_port: int) -> set[int]:
    """Local ports of the established TCP connections whose far end is the hub."""
    ports = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == hub_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def test_idle_connections_are_opened_kept_open_and_used_by_the_next_call(
        hub: HubProcess, site: Enrolment) -> None:
    client = HubClient(site.url, site.ssl_context(), max_connections=4)
    assert _client_ports(hub.port) == set()
    client.keep_warm(idle_s=0.4)
    # A port is ESTABLISHED before its TLS handshake ends: the hub's certificate is seen on
    # the warm connections (no call made yet), a moment after the ports appear.
    wait_for(lambda: len(_client_ports(hub.port)) == 4
             and client.hub_certificate_der is not None, 30,
             what="4 warm connections, the hub's certificate seen on them")
    opened = _client_ports(hub.port)

    # Idle past the refresh period: refreshed on the same connections, none reopened.
    warmed_at = client._last_used
    wait_for(lambda: client._last_used > warmed_at, 30, what="a refresh while idle")
    assert _client_ports(hub.port) == opened

    # A real call goes out on one of them: no new connection.
    assert client.held_buckets("no-such-transfer") is None
    assert _client_ports(hub.port) == opened

    client.close()
    wait_for(lambda: not _client_ports(hub.port), 30, what="connections closed with the client")
    assert client._warm_thread is not None
    client._warm_thread.join(30)
    assert not client._warm_thread.is_alive()


def test_connections_outlive_an_idle_spell_longer_than_httpx_default_expiry(
        hub: HubProcess, site: Enrolment) -> None:
    """httpx drops a pooled connection idle for 5 s unless told otherwise; the keep-warm call
    comes after 20 s idle in service. The pool must keep connections for longer than that
    call's period, or every study after a pause pays the handshakes again."""
    client = HubClient(site.url, site.ssl_context(), max_connections=2)
    try:
        client.warm()
        opened = _client_ports(hub.port)
        assert len(opened) == 2
        used_at = client._last_used
        # Idle 6.5 s (over httpx's default expiry of 5 s), then the keep-warm refresh.
        client.keep_warm(idle_s=6.5)
        wait_for(lambda: client._last_used > used_at + 6, 30, what="a refresh after 6.5 s idle")
        assert _client_ports(hub.port) == opened
        assert client.held_buckets("no-such-transfer") is None
        assert _client_ports(hub.port) == opened
    finally:
        client.close()


def test_warm_opens_every_connection_when_one_call_starts_late(
        hub: HubProcess, site: Enrolment) -> None:
    """Seen in a full CI run: ``warm()``'s two calls went out one after the other on a loaded
    machine, the second took the connection the first had just given back, and one
    connection of two was warm. Here the second call starts 0.5 s late (as a thread of a
    loaded machine does): both connections are opened all the same."""
    client = HubClient(site.url, site.ssl_context(), max_connections=2)
    calls = {"n": 0}
    lock = threading.Lock()
    for name in ("get", "stream"):  # whichever warm() uses
        real = getattr(client._http, name)

        def late_second(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            with lock:
                calls["n"] += 1
                late = calls["n"] == 2
            if late:
                time.sleep(0.5)
            return _real(*args, **kwargs)

        setattr(client._http, name, late_second)
    try:
        assert client.warm() == 2
        assert len(_client_ports(hub.port)) == 2
    finally:
        client.close()
