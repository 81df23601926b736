"""The DICOM listener's server (appliance/dicomnet/server.py) in process: a stop that comes
between a connection's registration as "handshaking" and its ``do_handshake``.

The window is microseconds wide in a running daemon, so the test opens it on purpose: the
connection's first ``settimeout`` (the handshake's time limit, set right after the
registration) runs ``end_handshakes`` as a stop would. Real sockets, a real TLS context.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    Verification,
)

from appliance.dicomnet.server import ListenerServer
from appliance.ops.security import server_context
from tests.faults.pki import make_pki
from tests.support.peers import wait_for


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


def test_associations_share_the_contexts_and_leave_them_as_they_were(tmp_path: Path) -> None:
    """The listener's supported contexts are not copied for each association (9 % of an
    association's CPU): negotiation must only read them. Two associations, one with SCP/SCU
    role selection (as a C-GET viewer proposes) and one without, accepted and released:
    every context's abstract syntax, transfer syntaxes and roles are as before, and each
    association negotiated from the very same objects."""
    ae = AE(ae_title="PAS")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
    ae.add_supported_context(PatientRootQueryRetrieveInformationModelGet)
    server = ae.make_server(("127.0.0.1", 0), server_class=ListenerServer)
    ae._servers.append(server)  # as AE.start_server does: its shutdown() removes it
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def shape() -> list[tuple[object, ...]]:
        return [(cx.abstract_syntax, tuple(cx.transfer_syntax), cx.scu_role, cx.scp_role)
                for cx in server.contexts]

    before, objects = shape(), [id(cx) for cx in server.contexts]
    try:
        for roles in ([], [build_role(CTImageStorage, scp_role=True)]):
            client = AE(ae_title="VIEWER")
            client.add_requested_context(Verification)
            client.add_requested_context(CTImageStorage)
            client.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
            assoc = client.associate(*server.server_address[:2], ae_title="PAS",
                                     ext_neg=roles)
            assert assoc.is_established
            assert len(assoc.accepted_contexts) == 3
            [acceptor] = [a for a in server.active_associations if a.is_alive()]
            assert [id(cx) for cx in acceptor.acceptor.supported_contexts] == objects
            assoc.release()
            wait_for(lambda: not server.active_associations, 10, what="the association over")
    finally:
        server.shutdown()
    assert shape() == before
