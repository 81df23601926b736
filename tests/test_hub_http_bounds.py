"""The hub's HTTPS port is bounded as the appliance's HTTP port is (appliance/web/bounded.py):
a connection that does not send a whole request ``http.request_timeout_s`` after its TLS
handshake is closed, one over ``http.max_connections`` is closed as it opens, each said in the
log; a site's requests are served as before.

uvicorn waited for ever for a request's headers: anyone who could reach the port (it faces
the sites' WAN, often the Internet) could hold connections that never finished one, past
the TLS handshake that needs no certificate (``/enroll`` has none), until the hub had no
descriptor left for the sites. Real peer: ``pas hub run``.

Before the TLS handshake too (security review, 2026-12-07): asyncio hands a connection to
the protocol only once its handshake is done, and waited 60 s for it; TCP connections that
sent nothing were neither counted nor timed (3,000 open ~60 s past ``max_connections`` 50,
nothing logged; 1,100 of them held a 1,024-descriptor hub, a site's request took 60.5 s).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx

from appliance.transfer.enrolment import Enrolment
from tests.support.hub import HubProcess, client, enroll
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


def _silent(port: int) -> socket.socket:
    """A TCP connection that sends nothing, not even a TLS ClientHello."""
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed_yet(sock: socket.socket) -> bool:
    """The server closed it (an end of stream or a reset), without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@contextlib.contextmanager
def _bounded_hub(tmp_path: Path, request_timeout_s: float, max_connections: int
                 ) -> Iterator[tuple[HubProcess, Enrolment, list[socket.socket]]]:
    """A hub with these ``http.*`` bounds and an enrolled site: (hub, the site's enrolment,
    a list for the test's silent connections, closed at the end with the hub)."""
    hub = HubProcess(tmp_path / "hub", {
        "PAS_HUB_HTTP__REQUEST_TIMEOUT_S": f"{request_timeout_s:g}",
        "PAS_HUB_HTTP__MAX_CONNECTIONS": str(max_connections)}).init()
    hub.start()
    silent: list[socket.socket] = []
    try:
        yield hub, enroll(hub, tmp_path / "a", "SITEA"), silent
    finally:
        for sock in silent:
            sock.close()
        hub.stop()


def test_a_connection_that_never_begins_its_tls_handshake_is_closed(tmp_path: Path) -> None:
    """Its handshake is bounded by ``http.request_timeout_s`` (asyncio's 60 s before), said
    in the log; a site's requests are served beside such connections."""
    with _bounded_hub(tmp_path, request_timeout_s=2, max_connections=8) as (hub, site, silent):
        silent += [_silent(hub.port) for _ in range(4)]
        with client(site) as api:
            assert api.get("/api/v1/whoami").status_code == 200
        # Far longer than the bound: closed by it, not by asyncio's 60 s.
        assert all(closed_by_peer(sock, 30) for sock in silent)
        wait_for(lambda: "closed: no TLS handshake within http.request_timeout_s (2 s)"
                 in hub.log(), 10, what="the handshake bound's line")
        with client(site) as api:
            assert api.get("/api/v1/whoami").status_code == 200


def test_connections_beyond_the_bound_are_closed_before_their_tls_handshake(
        tmp_path: Path) -> None:
    """Counted as they are accepted: a flood of TCP connections that send nothing holds
    ``http.max_connections`` places at most, the rest closed at once (the handshake bound is
    60 s here), said in the log; a site's keep-alive connection is served throughout."""
    with _bounded_hub(tmp_path, request_timeout_s=60, max_connections=4) as (hub, site,
                                                                            silent):
        with client(site) as api:
            assert api.get("/api/v1/whoami").status_code == 200  # one place, kept
            silent += [_silent(hub.port) for _ in range(200)]
            # The site's connection and at most three of them hold the four places.
            wait_for(lambda: sum(_closed_yet(sock) for sock in silent) >= len(silent) - 3,
                     20, what="the connections beyond the bound closed as they open")
            assert api.get("/api/v1/whoami").status_code == 200
        wait_for(lambda: "closed: more than http.max_connections (4) open" in hub.log(), 10,
                 what="the bound's line")
        for sock in silent:  # the places free again: a new connection is served
            sock.close()

        def served() -> bool:
            with client(site) as api:
                return api.get("/api/v1/whoami").status_code == 200

        wait_for(served, 20, what="a request on a new connection")
