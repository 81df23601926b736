"""The hub's HTTPS port is bounded as the appliance's HTTP port is (appliance/web/bounded.py):
a connection that does not send a whole request ``http.request_timeout_s`` after its TLS
handshake is closed, one over ``http.max_connections`` is closed as it opens, each said in the
log; a site's requests are served as before.

uvicorn waited for ever for a request's headers: anyone who could reach the port (it faces
the sites' WAN, often the Internet) could hold connections that never finished one, past
the TLS handshake that needs no certificate (``/enroll`` has none), until the hub had no
descriptor left for the sites. Real peer: ``pas hub run``.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx

from tests.support.hub import HubProcess
from tests.support.peers import closed_by_peer, wait_for


def test_unfinished_requests_and_connections_over_the_bound_are_closed(
        tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub", {"PAS_HUB_HTTP__REQUEST_TIMEOUT_S": "2",
                                        "PAS_HUB_HTTP__MAX_CONNECTIONS": "3"}).init()
    hub.start()
    held: list[ssl.SSLSocket] = []
    try:
        context = hub.anonymous_context()
        for _ in range(3):  # a request begun after the handshake, never ended
            raw = socket.create_connection(("127.0.0.1", hub.port), timeout=10)
            tls = context.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
            held.append(tls)

        def one_more_closed() -> bool:
            raw = socket.create_connection(("127.0.0.1", hub.port), timeout=10)
            try:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    return closed_by_peer(tls, 0.5)
            except (ssl.SSLError, ConnectionResetError):
                return True  # closed during the handshake's end
            finally:
                raw.close()

        wait_for(one_more_closed, 10, what="a fourth connection closed as it opens")
        assert all(closed_by_peer(tls, 10) for tls in held)  # no whole request in 2 s
        wait_for(lambda: "closed: no whole request within http.request_timeout_s (2 s)"
                 in hub.log(), 10, what="the request bound's line")
        assert "closed: more than http.max_connections (3) open" in hub.log()
        for tls in held:  # their TLS close ends when the client answers it
            tls.close()

        def served() -> bool:  # the places free again: a site's request is served
            with httpx.Client(verify=context, timeout=10) as site:
                try:
                    return site.get(f"https://localhost:{hub.port}/healthz").status_code == 200
                except httpx.TransportError:
                    return False

        wait_for(served, 10, what="a request served once the places are free")
    finally:
        for tls in held:
            tls.close()
        hub.stop()
