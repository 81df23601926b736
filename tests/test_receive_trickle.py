"""A peer that sends a PDU one byte at a time does not hold its place (docs/ingest.md).

Found in review (2027-01, s38): the socket's receive timeout (dicom.network_timeout_s)
bounded each ``recv``, not a PDU. A peer sending one byte every few seconds, each well inside
the timeout, was read for ever: its connection (and, once its association was accepted, its
association place) held until a restart. After the association thread saw the silence it
called abort(), which waited for the reading thread without end; no A-ABORT, the socket
open. Trickling the A-ASSOCIATE-RQ, before any AE title is checked, 64 connections (the
default dicom.max_connections) locked every modality out.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from appliance.dicomnet.direct_receive import p_data_tf
from appliance.dicomnet.direct_store import c_store_rq, parse_command
from tests.support import raw_ul
from tests.support.peers import CT_DIR, MR_DIR, PasProcess, storescu, wait_for
from tests.test_ingest import dataset_part
from tests.test_ingest_refusals import echo_accepted

EXPLICIT = "1.2.840.10008.1.2.1"
# One byte this often: well inside the 2 s network timeout, so no single recv times out.
TRICKLE_S = 0.4


class Trickler(threading.Thread):
    """Sends ``data`` one byte every ``TRICKLE_S`` until PAS closes the connection (an end of
    stream or a reset; what PAS may send before, an A-ABORT, is read and dropped)."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = data
        self.closed = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        self.sock.setblocking(True)
        for at in range(len(self.data)):
            if self.stop.is_set():
                return
            try:
                self.sock.sendall(self.data[at:at + 1])
                readable, _, _ = select.select([self.sock], [], [], TRICKLE_S)
                while readable:
                    if not self.sock.recv(65536):
                        break  # end of stream
                    readable, _, _ = select.select([self.sock], [], [], 0)
                else:
                    continue
            except OSError:
                pass  # reset, broken pipe: closed by PAS
            self.closed.set()
            return


@pytest.fixture
def pas(tmp_path: Path) -> PasProcess:
    daemon = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
        "PAS_DICOM__NETWORK_TIMEOUT_S": "2", "PAS_DICOM__MAX_ASSOCIATIONS": "1",
        # Room for the start-up probe's connection beside the two trickling ones (with 2,
        # the probe could still be counted when a trickler connected: closed at once).
        "PAS_DICOM__MAX_CONNECTIONS": "3",
    }).start()
    yield daemon
    daemon.stop()


def test_peers_trickling_a_pdu_are_closed_and_a_modality_stores(pas: PasProcess) -> None:
    """One peer trickles a P-DATA-TF PDU of a C-STORE (its association accepted: the only
    association place), another its A-ASSOCIATE-RQ (a connection place: 64 of them, the
    default dicom.max_connections, closed the port): both connections are closed by PAS
    (each PDU has network_timeout_s to arrive), then a modality stores. Before, both were
    read for ever and every modality was refused."""
    source = sorted(CT_DIR.glob("*.dcm"))[0]
    uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    in_data = raw_ul.associate(pas.port, [(1, str(CTImageStorage), EXPLICIT)],
                               calling="SLOWDATA")
    in_data.sock.sendall(p_data_tf(1, 0x03, c_store_rq(str(CTImageStorage), uid, 1)))
    in_request = socket.create_connection(("127.0.0.1", pas.port), timeout=10)
    in_request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tricklers = [
        Trickler(in_data.sock, p_data_tf(1, 0x00, dataset_part(source)[:65536])),
        Trickler(in_request, raw_ul.associate_rq([(1, str(Verification), EXPLICIT)], "PAS",
                                                 "SLOWRQ", 16384)),
    ]
    for trickler in tricklers:
        trickler.start()
    try:
        # A generous bound: each connection ends within twice the 2 s timeout of its PDU's
        # first byte; before, never.
        wait_for(lambda: all(t.closed.is_set() for t in tricklers), 30,
                 what="both trickling connections closed by PAS")
        log = pas.log()
        assert log.count("connection closed before the entire PDU was received") == 2, log
        assert "SLOWDATA (127.0.0.1)" in log and "the peer sends too slowly" in log
        assert "Traceback" not in log
        # The association's thread ends just after its connection (a retrying modality
        # gets in): awaited, as a modality's retry would.
        wait_for(lambda: echo_accepted(pas), 10, what="the association place free again")
        sent = storescu(sorted(MR_DIR.rglob("*.dcm"))[:1], pas.port)
        assert sent.returncode == 0, sent.stderr
        assert pas.status()["instances"] == 1
    finally:
        for trickler in tricklers:
            trickler.stop.set()
        for trickler in tricklers:
            trickler.join(5)
            trickler.sock.close()


def test_a_large_pdu_arriving_slowly_but_steadily_is_read_whole(pas: PasProcess) -> None:
    """A P-DATA-TF PDU that takes longer than the network timeout but keeps coming (64 kB
    at a time: a slow link) is read whole and its C-STORE stored: the deadline of a P-DATA
    PDU moves on with its progress, and so does the network idle timer. Before, the
    association loop took the peer for silent (its idle timer restarted only on a whole
    PDU) and aborted the association 2 s into the PDU."""
    source = sorted(CT_DIR.glob("*.dcm"))[1]
    uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    data = dataset_part(source)
    raw = raw_ul.associate(pas.port, [(1, str(CTImageStorage), EXPLICIT)], calling="SLOWLINK")
    try:
        fragment = raw.max_pdu - 6  # the default dicom.max_pdu: 256 kB
        assert len(data) > fragment > 4 * (64 << 10) - 64
        raw.sock.sendall(p_data_tf(1, 0x03, c_store_rq(str(CTImageStorage), uid, 1)))
        first = p_data_tf(1, 0x00, data[:fragment])
        step = 64 << 10
        for at in range(0, len(first), step):
            raw.sock.sendall(first[at:at + step])
            time.sleep(0.8)  # the link's pace: the PDU takes 4 s, twice the timeout
        for at in range(fragment, len(data), fragment):
            chunk = data[at:at + fragment]
            raw.sock.sendall(p_data_tf(1, 0x02 if at + len(chunk) >= len(data) else 0x00,
                                       chunk))
        kind, body = raw.read_pdu(10)
        assert kind == 0x04, (kind, pas.log()[-2000:])
        assert struct.unpack("<H", parse_command(body[6:])[0x0900])[0] == 0x0000
        raw.release()
    finally:
        raw.sock.close()
    assert pas.status()["instances"] == 1
