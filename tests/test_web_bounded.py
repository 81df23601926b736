"""The HTTP port's bounds (appliance/web/bounded.py), against a real daemon: connections
beyond ``http.max_connections`` closed as they open, one that sends no whole request within
``http.request_timeout_s`` closed, each said in the log; a viewer's requests served as before.

uvicorn took every connection and waited for ever for a request's headers: one host holding
a thousand such connections ran the daemon out of descriptors (security review, 2026-12-06).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx

from tests.support.peers import PasProcess, wait_for


def _closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """Closed by the server within ``within_s``: an end of stream, or a reset (a close with
    the request's bytes unread sends one)."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_connections_beyond_the_bound_and_requests_never_finished_are_closed(
        tmp_path: Any) -> None:
    pas = PasProcess(tmp_path / "pas", {"PAS_HTTP__MAX_CONNECTIONS": "5",
                                        "PAS_HTTP__REQUEST_TIMEOUT_S": "2"}).start()
    held: list[socket.socket] = []
    try:
        base = f"http://127.0.0.1:{pas.http_port}"
        for _ in range(5):  # a request's headers begun, never ended (a slow-loris)
            sock = socket.create_connection(("127.0.0.1", pas.http_port), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append(sock)

        def one_more_closed() -> bool:  # once the five are the server's, at once
            extra = socket.create_connection(("127.0.0.1", pas.http_port), timeout=10)
            try:
                return _closed_by_peer(extra, 0.5)
            finally:
                extra.close()

        wait_for(one_more_closed, 10, what="a sixth connection closed as it opens")
        started = time.monotonic()
        assert all(_closed_by_peer(sock, 10) for sock in held)  # no whole request in 2 s
        assert time.monotonic() - started < 9
        # The slots are free again: a viewer is served, and its keep-alive connection is
        # not closed by the first-request bound once it asked.
        with httpx.Client(base_url=base, timeout=10) as viewer:
            assert viewer.get("/healthz").status_code == 200
            time.sleep(2.5)  # past request_timeout_s on purpose: the bound must not apply
            assert viewer.get("/healthz").status_code == 200
        wait_for(lambda: "closed: more than http.max_connections (5) open" in pas.log(), 10,
                 what="the bound's log line")
        assert "closed: no whole request within http.request_timeout_s (2 s)" in pas.log()
    finally:
        for sock in held:
            sock.close()
        pas.stop()
