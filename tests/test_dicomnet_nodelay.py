"""Nagle off on every DICOM association's socket (appliance/dicomnet/nodelay.py).

Why it matters: with Nagle on, the last short segment of each C-STORE's dataset waits for
the peer's delayed ACK (40 ms); PAS forwarding the 520-image MR set to a storescp took 11.8 s
instead of 0.9 s. Timing is the benchmark's business; what these tests hold is the cause: the
socket option on the associations PAS requests (a ``dicom`` destination against a real
storescp) and on those it accepts."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from appliance import dicomnet
from appliance.config import DicomDestination
from appliance.dicomnet.rejection import RejectionWatch
from appliance.dispatch.target_types.dicom import DicomTarget, plan_associations
from tests.support.peers import StoreSCP


def _nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_a_dicom_destinations_association_has_nagle_off(tmp_path: Path) -> None:
    dicomnet.install()
    scp = StoreSCP(tmp_path / "pacs", ae_title="PACS").start()
    try:
        target = DicomTarget("pacs", DicomDestination(
            kind="dicom", ae_title="PACS", host="127.0.0.1", port=scp.port, timeout_s=10), "PAS")
        contexts = next(iter(plan_associations({(CTImageStorage, "1.2.840.10008.1.2.1")})))
        opened = threading.Event()
        assoc = target._associate(contexts, opened, RejectionWatch())
        try:
            assert assoc.is_established
            assert _nodelay(assoc.dul.socket.socket) == 1
        finally:
            assoc.release()
    finally:
        scp.stop()


def test_an_accepted_association_has_nagle_off() -> None:
    dicomnet.install()
    seen: list[int] = []
    server_ae = AE(ae_title="PAS")
    server_ae.add_supported_context(Verification)

    def on_open(event: evt.Event) -> None:
        seen.append(_nodelay(event.assoc.dul.socket.socket))

    server = server_ae.start_server(("127.0.0.1", 0), block=False,
                                    evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    try:
        client_ae = AE(ae_title="VIEWER")
        client_ae.add_requested_context(Verification)
        assoc = client_ae.associate("127.0.0.1", server.server_address[1], ae_title="PAS")
        try:
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
            assert _nodelay(assoc.dul.socket.socket) == 1  # a requestor's, any service's
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert seen == [1]
