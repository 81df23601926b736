"""The HTTP port's bounds (appliance/web/bounded.py), against a real daemon: connections
beyond ``http.max_connections`` closed as they open, one that sends no whole request within
``http.request_timeout_s`` closed, each said in the log; a viewer's requests served as before.

uvicorn took every connection and waited for ever for a request's headers: one host holding
a thousand such connections ran the daemon out of descriptors (security review, 2026-12-06).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.peers import PasProcess, closed_by_peer, wait_for


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
                return closed_by_peer(extra, 0.5)
            finally:
                extra.close()

        wait_for(one_more_closed, 10, what="a sixth connection closed as it opens")
        started = time.monotonic()
        assert all(closed_by_peer(sock, 10) for sock in held)  # no whole request in 2 s
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


def test_over_https_a_connection_that_never_begins_its_handshake_is_closed(
        tmp_path: Path) -> None:
    """``serving.tls_cert``: asyncio hands a connection to the protocol only once its TLS
    handshake is done, and waited 60 s for it (security review, 2026-12-07): TCP connections
    that sent nothing were neither counted nor timed. Now the handshake is bounded by
    ``http.request_timeout_s``, said in the log; a viewer is served beside them. (Counted
    as accepted, one beyond ``http.max_connections`` closed at once: the same code, proven
    on the hub's port, tests/test_hub_http_bounds.py.)"""
    from tests.test_serving_dicomweb import _issue, _write

    ca_key, ca_cert = _issue("viewers CA", None, None, ca=True)
    ca_crt, _ = _write(tmp_path, "ca", ca_key, ca_cert)
    server = _write(tmp_path, "server", *_issue("pas", ca_key, ca_cert.subject, ip="127.0.0.1"))
    pas = PasProcess(tmp_path / "pas", {
        "PAS_SERVING__AUTH": "bearer", "PAS_SERVING__BEARER_TOKENS": '["t0ken"]',
        "PAS_SERVING__TLS_CERT": server[0], "PAS_SERVING__TLS_KEY": server[1],
        "PAS_HTTP__MAX_CONNECTIONS": "8", "PAS_HTTP__REQUEST_TIMEOUT_S": "2"}).start()
    silent: list[socket.socket] = []
    try:
        trusted = ssl.create_default_context(cafile=ca_crt)
        base = f"https://127.0.0.1:{pas.http_port}"
        silent = [socket.create_connection(("127.0.0.1", pas.http_port), timeout=10)
                  for _ in range(3)]
        with httpx.Client(base_url=base, verify=trusted, timeout=10) as viewer:
            assert viewer.get("/healthz").status_code == 200
        # Far longer than the bound: closed by it, not by asyncio's 60 s.
        assert all(closed_by_peer(sock, 30) for sock in silent)
        wait_for(lambda: "closed: no TLS handshake within http.request_timeout_s (2 s)"
                 in pas.log(), 10, what="the handshake bound's line")
        assert httpx.get(base + "/healthz", verify=trusted, timeout=10).status_code == 200
    finally:
        for sock in silent:
            sock.close()
        pas.stop()


def _a_study_of_10_mb(pas: PasProcess) -> str:
    """120 MR instances sent to ``pas``, 10 MB: more than the 4 MB the kernel may buffer for
    a socket. Their study's UID."""
    from tests.support.peers import MR_DIR, storescu

    storescu(sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:120], pas.port)
    with httpx.Client(base_url=f"http://127.0.0.1:{pas.http_port}", timeout=30) as client:
        (study,) = [s["0020000D"]["Value"][0] for s in client.get("/dicom-web/studies").json()]
    return str(study)


def test_an_answer_the_client_stops_reading_is_aborted_and_a_slow_reader_is_not(
        tmp_path: Any) -> None:
    """A client that asked for a whole study (WADO-RS) and read nothing held ~3.3 MiB of
    the daemon's memory for as long as it kept the connection, nothing ending it. Now its
    answer is aborted ``http.send_timeout_s`` after its buffer filled; a client that reads
    slower than that bound's pace, but reads, gets the whole study."""
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_HTTP__SEND_TIMEOUT_S": "2"}).start()
    try:
        study = _a_study_of_10_mb(pas)
        with httpx.Client(base_url=f"http://127.0.0.1:{pas.http_port}", timeout=30) as client:
            whole = client.get(f"/dicom-web/studies/{study}")
        assert whole.status_code == 200 and len(whole.content) > 10_000_000, len(whole.content)
        request = (f"GET /dicom-web/studies/{study} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   "Accept: multipart/related; type=\"application/dicom\"\r\n\r\n").encode()

        stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", pas.http_port))
        stuck.sendall(request)
        try:
            assert stuck.recv(200)  # the answer began; then nothing more is read
            wait_for(lambda: "the client read none of its answer for http.send_timeout_s "
                             "(2 s)" in pas.log(), 30, what="the stalled answer aborted")
            stuck.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while stuck.recv(65536):  # what was in flight, then the end
                    pass
        finally:
            stuck.close()

        # A reader at ~3 MB/s (a 64 kB read every 20 ms): each read lets the answer go on.
        slow = socket.create_connection(("127.0.0.1", pas.http_port), timeout=10)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        slow.sendall(request)
        received = bytearray()
        try:
            while not received.endswith(b"\r\n0\r\n\r\n"):  # chunked: its last chunk
                chunk = slow.recv(65536)
                if not chunk:
                    break
                received += chunk
                time.sleep(0.02)  # the reader's pace, not a wait for a state
        finally:
            slow.close()
        # The whole answer (its own multipart boundary, in chunks: longer than the body).
        assert received.endswith(b"--\r\n\r\n0\r\n\r\n"), bytes(received[-200:])
        assert len(received) > len(whole.content)
        assert pas.log().count("the client read none of its answer") == 1
    finally:
        pas.stop()


def test_streamed_answers_beyond_the_bound_are_told_to_come_back(tmp_path: Any) -> None:
    """Streamed answers at once are bounded by ``http.max_streaming_answers``: with
    ``max_connections`` alone, clients that stop reading could each hold a few MB for
    ``send_timeout_s`` (4.6 MB a stuck study answer measured; 1,024 of them). One more is
    answered 503 with Retry-After, audited as not served; once the stuck answers are
    aborted, the next is served."""
    from tests.support.peers import read_rows

    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_HTTP__SEND_TIMEOUT_S": "2",
                                        "PAS_HTTP__MAX_STREAMING_ANSWERS": "2"}).start()
    stuck: list[socket.socket] = []
    try:
        study = _a_study_of_10_mb(pas)
        with httpx.Client(base_url=f"http://127.0.0.1:{pas.http_port}", timeout=30) as client:
            for _ in range(2):  # two answers begun, never read
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", pas.http_port))
                sock.sendall(f"GET /dicom-web/studies/{study} HTTP/1.1\r\n"
                             "Host: 127.0.0.1\r\n\r\n".encode())
                assert sock.recv(100).startswith(b"HTTP/1.1 200")
                stuck.append(sock)
            busy = client.get(f"/dicom-web/studies/{study}")
            assert busy.status_code == 503, busy.status_code
            assert busy.headers["retry-after"] == "5"
            assert "http.max_streaming_answers" in busy.json()["detail"]
            # The stuck ones aborted after send_timeout_s, their places free again.
            wait_for(lambda: client.get(f"/dicom-web/studies/{study}/metadata").status_code
                     == 200, 30, what="a streamed answer served again")
        rows = read_rows(pas.home / "pas.sqlite", "SELECT outcome FROM audit "
                         "WHERE event = 'retrieve' AND outcome LIKE '%max_streaming_answers%'")
        assert rows, "the refusals are in the audit trail"  # the first, and the waits' ones
        assert {r["outcome"] for r in rows} == {
            "failure: not served: too many answers streaming at once "
            "(http.max_streaming_answers), answered 503, after 0 of 120 instances"}
    finally:
        for sock in stuck:
            sock.close()
        pas.stop()
