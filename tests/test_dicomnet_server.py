"""The DICOM listener's server (appliance/dicomnet/server.py) in process: a stop that comes
between a connection's registration as "handshaking" and its ``do_handshake``.

The window is microseconds wide in a running daemon, so the test opens it on purpose: the
connection's first ``settimeout`` (the handshake's time limit, set right after the
registration) runs ``end_handshakes`` as a stop would. Real sockets, a real TLS context.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from appliance.dicomnet.server import ListenerServer
from appliance.ops.security import server_context
from tests.faults.pki import make_pki


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ListenerServer]:
    pki = make_pki(tmp_path / "pki")
    context = server_context(pki / "server.crt", pki / "server.key", pki / "ca.crt", True)
    ae = AE(ae_title="PAS")
    ae.add_supported_context(Verification)
    listening = ae.make_server(("127.0.0.1", 0), ssl_context=context,
                               server_class=ListenerServer, handshake_timeout_s=5.0)
    try:
        yield listening
    finally:
        listening.server_close()


def test_a_stop_just_before_the_handshake_ends_it_cleanly(server: ListenerServer) -> None:
    """SSLSocket.shutdown drops the TLS object: the handshake that followed died on an
    AttributeError ('NoneType' object has no attribute 'do_handshake'), a traceback at the
    stop and the connection left open. Now the handshake meets the closed connection: the
    thread ends quietly and the client sees the connection closed."""
    client = socket.create_connection(server.server_address[:2], timeout=5)
    try:
        request, address = server.get_request()
        assert isinstance(request, ssl.SSLSocket)
        settimeout = request.settimeout

        def stop_comes_now(value: Any) -> None:
            if value == server.handshake_timeout_s:
                server.end_handshakes()
            settimeout(value)

        request.settimeout = stop_comes_now  # type: ignore[method-assign]
        server.process_request_thread(request, address)  # the connection's thread's work
        assert request.fileno() == -1  # closed by the server
        assert client.recv(1) == b""  # and the client sees it closed
    finally:
        client.close()
