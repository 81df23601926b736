"""A peer that sends what the DICOM Upper Layer cannot read, or keeps sending once PAS has
said its last word, against a real daemon: raw TCP clients send the bytes, pynetdicom
clients hold association places, DCMTK's storescu checks that the daemon still serves.

What is expected each time (appliance/dicomnet/last_word.py): one warning line naming the
peer and what was wrong, no traceback, PAS's A-ABORT (or its A-ASSOCIATE-RJ) and then the
end of the connection at once, its place free at once (``pas_dicom_connections``), the
refusal counted (``pas_access_refused{reason="invalid-pdu"}``) and audited, and a C-STORE
served right after, bit-exact.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.faults.test_connections import (
    CT_FILE,
    _connections,
    _refusals,
    _store,
    small_listener,
)
from tests.support import raw_ul
from tests.support.peers import PasProcess, free_port, read_rows, wait_for
from tests.test_dicomnet import as_sent, datasets_held

REQUEST = raw_ul.associate_rq([(1, str(Verification), "1.2.840.10008.1.2")], "PAS", "CT1", 0)
# An unknown PDU type (0x55) with a 4-byte body: read as a PDU header, that body is 2 bytes
# short, and pynetdicom's next read waited for them (the network timeout, 60 s).
UNKNOWN_TYPE = b"\x55\x00" + struct.pack(">I", 4) + b"abcd"
# A P-DATA-TF whose one value is a command fragment with nothing in it: no Command Field.
EMPTY_COMMAND = struct.pack(">BBI", 0x04, 0, 6) + struct.pack(">IBB", 2, 1, 0x03)
# A-RELEASE-RQ before the A-ASSOCIATE-AC: a well-formed PDU the state does not allow.
EARLY_RELEASE = struct.pack(">BBI", 0x05, 0, 4) + b"\0\0\0\0"
# An A-RELEASE-RQ whose length field says 2 where its body has 4 bytes.
SHORT_RELEASE = struct.pack(">BBI", 0x05, 0, 2) + b"\0" * 4
# A valid P-DATA-TF (one 1000-byte dataset fragment on context 1), for the streams.
STREAM_PDU = struct.pack(">BBI", 0x04, 0, 1006) + struct.pack(">IBB", 1002, 1, 0) + b"\0" * 1000
PROMPT_S = 5.0  # "at once", with room for a loaded CI: the timers in play are 30 and 60 s


@pytest.fixture
def pas(tmp_path: Path) -> Iterator[PasProcess]:
    daemon = small_listener(tmp_path / "pas")
    try:
        yield daemon.start()
        wait_for(lambda: _connections(daemon) == 0, 10, what="no connection open")
    finally:
        daemon.stop()


def _sockets_to(pas: PasProcess, port: int) -> list[str]:
    """The TCP connections of the daemon's process to ``port`` (any state but listening),
    from ``ss``."""
    assert pas.proc is not None
    listed = subprocess.run(["ss", "-tnpH", "dport", "=", f":{port}"], capture_output=True,
                            text=True, check=True).stdout
    return [line for line in listed.splitlines() if f"pid={pas.proc.pid}," in line]


def _answers(sock: socket.socket) -> tuple[list[int], float]:
    """The types of the PDUs PAS sent until it closed the connection, and how long after
    the call it closed it (a timeout here is a connection PAS left open)."""
    started = time.monotonic()
    raw = raw_ul.RawAssociation(sock)
    kinds: list[int] = []
    while True:
        try:
            kind, _ = raw.read_pdu(PROMPT_S)
        except ConnectionResetError:  # closed with the client's bytes unread: a reset
            kind = None
        if kind is None:
            return kinds, time.monotonic() - started
        kinds.append(kind)


def _stream(sock: socket.socket) -> threading.Thread:
    """Send valid P-DATA-TF PDUs back to back, without reading, until the connection ends
    (or 40 s: past the 30 s ARTIM timer); the thread ends then."""
    def run() -> None:
        until = time.monotonic() + 40
        payload = STREAM_PDU * 64
        while time.monotonic() < until:
            try:
                sock.sendall(payload)
            except OSError:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _served_bit_exact(pas: PasProcess, tmp_path: Path) -> None:
    """A storescu C-STORE right after: stored, the stored file's dataset the one storescu
    put on the wire (SHA-256, DCMTK's storescp as the witness: storescu gives sequences
    explicit lengths), its name its own SHA-256."""
    sent = _store(pas.port)
    assert sent.returncode == 0, sent.stderr
    [stored] = list((pas.home / "spool").rglob("*.dcm"))
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == stored.stem
    assert datasets_held([stored]) == as_sent(tmp_path, [CT_FILE])
    assert pas.status()["instances"] == 1


def _refused_as_invalid(pas: PasProcess, what: str) -> None:
    """One warning line naming the peer and ``what``, no traceback, the refusal counted
    and in the audit trail."""
    log = pas.log()
    line = f"WARNING pas.dicomnet: DICOM peer CT1 (127.0.0.1) sent {what}: association " \
           f"aborted (A-ABORT), connection closed"
    assert log.count(line) == 1, log[-3000:]
    assert "Traceback" not in log and "Invalid event" not in log, log[-3000:]
    assert _refusals(pas) == {"invalid-pdu": 1.0}
    rows = wait_for(lambda: read_rows(pas.home / "pas.sqlite", "SELECT actor, source, outcome "
                                      "FROM audit WHERE event = 'security'"), 10,
                    what="the refusal's audit row")
    assert [tuple(row) for row in rows] == [("CT1", "127.0.0.1", f"failure: sent {what}")]


@pytest.mark.parametrize(("garbage", "what"), [
    (UNKNOWN_TYPE, "an unknown PDU type (0x55)"),
    (EARLY_RELEASE, "an A-RELEASE-RQ PDU out of sequence (DICOM UL state Sta3)"),
], ids=["unknown-type", "release-before-the-answer"])
def test_a_pdu_behind_the_request_before_pas_answered_it(
        pas: PasProcess, tmp_path: Path, garbage: bytes, what: str) -> None:
    """The A-ASSOCIATE-RQ and, behind it, a PDU PAS cannot take, before PAS answered the
    request. An unknown type: pynetdicom took its body for the next PDU's header and waited
    for the rest for the network timeout (60 s): no A-ABORT, no answer at all, the place
    held a minute, and a traceback when the wait ended. A release before the answer: an
    A-ABORT, but not a word on PAS's side."""
    with socket.create_connection(("127.0.0.1", pas.port), timeout=10) as peer:
        peer.sendall(REQUEST + garbage)
        kinds, closed_after = _answers(peer)
    assert kinds == [0x07], kinds  # A-ABORT: the A-ASSOCIATE-AC never goes out
    assert closed_after < PROMPT_S
    wait_for(lambda: _connections(pas) == 0, PROMPT_S, what="its place free at once")
    _refused_as_invalid(pas, what)
    _served_bit_exact(pas, tmp_path)


@pytest.mark.parametrize(("garbage", "what"), [
    (UNKNOWN_TYPE, "an unknown PDU type (0x55)"),
    (EMPTY_COMMAND, "a message that does not decode (AttributeError: 'Dataset' object has "
                    "no attribute 'CommandField')"),
    (SHORT_RELEASE, "an A-RELEASE-RQ PDU declaring 2 bytes (its body has 4)"),
], ids=["unknown-type", "undecodable-message", "lying-length"])
def test_a_pdu_pas_cannot_read_on_an_accepted_association(
        pas: PasProcess, tmp_path: Path, garbage: bytes, what: str) -> None:
    """After the A-ASSOCIATE-AC. An unknown type: A-ABORT, then the body of that PDU read
    as the next one's header, and the connection held for the network timeout (60 s). A
    P-DATA-TF whose command does not decode: pynetdicom's state machine raised, two
    tracebacks in the journal, and the connection dropped without an A-ABORT. A release
    whose length field lies (2): its last two bytes taken for the next PDU's header, the
    DUL waited for the rest for the network timeout (60 s), the release never answered."""
    with socket.create_connection(("127.0.0.1", pas.port), timeout=10) as peer:
        peer.sendall(REQUEST)
        assert raw_ul.RawAssociation(peer).read_pdu()[0] == 0x02  # A-ASSOCIATE-AC
        peer.sendall(garbage)
        kinds, closed_after = _answers(peer)
    assert kinds == [0x07], kinds
    assert closed_after < PROMPT_S
    wait_for(lambda: _connections(pas) == 0, PROMPT_S, what="its place free at once")
    _refused_as_invalid(pas, what)
    _served_bit_exact(pas, tmp_path)


def test_a_peer_streaming_after_pas_aborted_it_is_closed_at_once(pas: PasProcess,
                                                                 tmp_path: Path) -> None:
    """PAS aborts (an unknown PDU type) and the peer streams P-DATA-TF on, never reading.
    In Sta13 pynetdicom read, decoded and ignored every PDU until the ARTIM timer: the
    connection held its place among dicom.max_connections 30.0 s (measured)."""
    with socket.create_connection(("127.0.0.1", pas.port), timeout=10) as peer:
        peer.sendall(REQUEST)
        assert raw_ul.RawAssociation(peer).read_pdu()[0] == 0x02
        peer.sendall(b"\x55\x00\x00\x00\x00\x00")  # an unknown PDU type, no body
        started = time.monotonic()
        streaming = _stream(peer)
        streaming.join(PROMPT_S)
        assert not streaming.is_alive(), "PAS left the connection open under the stream"
        wait_for(lambda: _connections(pas) == 0, PROMPT_S, what="its place free at once")
        assert time.monotonic() - started < PROMPT_S
    _refused_as_invalid(pas, "an unknown PDU type (0x55)")
    _served_bit_exact(pas, tmp_path)


def test_a_peer_streaming_through_its_rejection_is_closed_at_once(
        pas: PasProcess, tmp_path: Path) -> None:
    """Both places of dicom.max_associations (2) held: a request from CT1 is rejected, and
    CT1 streams P-DATA-TF behind its request without waiting for the answer. Whichever
    PAS met first, the A-ASSOCIATE-RJ or the unexpected P-DATA-TF (then an A-ABORT), the
    connection ends at once. Before: the stream read before the rejection was sent made
    the state machine abort, and the rejection then killed the DUL thread ("Invalid event
    'Evt8' for the current state 'Sta13'", a traceback); one read after it kept the
    connection open until the ARTIM timer (30 s)."""
    client = AE(ae_title="VIEWER")
    client.add_requested_context(Verification)
    held = [client.associate("127.0.0.1", pas.port, ae_title="PAS") for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        wait_for(lambda: _connections(pas) == 2, 10, what="the two places held")
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", pas.port), timeout=10) as peer:
                peer.sendall(REQUEST)
                streaming = _stream(peer)
                streaming.join(PROMPT_S)
                assert not streaming.is_alive(), "PAS left the connection open"
            wait_for(lambda: _connections(pas) == 2, PROMPT_S, what="its place free at once")
        log = pas.log()
        assert "Traceback" not in log and "Invalid event" not in log, log[-3000:]
        # Each was refused as over the limit, as unexpected data, or both: never unnoticed.
        assert sum(_refusals(pas).values()) >= 5
    finally:
        for assoc in held:
            assoc.release()
    wait_for(lambda: _connections(pas) == 0, 10, what="the viewer's places free")
    _served_bit_exact(pas, tmp_path)


def test_a_pdu_over_the_bound_on_a_large_association_is_refused_naming_the_peer(
        pas: PasProcess, tmp_path: Path) -> None:
    """A PDU over the Maximum Length PAS offered: aborted before its body is read (as
    before), now with the peer named and the refusal counted and audited."""
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS")
    assert assoc.is_established
    offered = assoc.acceptor.maximum_length
    assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0, offered + 1) + b"\x00" * 64)
    wait_for(lambda: assoc.is_aborted, 10, what="the association aborted by PAS")
    wait_for(lambda: _connections(pas) == 0, PROMPT_S, what="its place free at once")
    _refused_as_invalid(pas, f"a PDU that breaks the rules (PDU of type 0x04 declares "
                             f"{offered + 1} bytes, over the {offered} this association "
                             f"accepts)")
    _served_bit_exact(pas, tmp_path)


@pytest.mark.parametrize(("garbage", "what"), [
    (UNKNOWN_TYPE, "an unknown PDU type (0x55)"),
    (EMPTY_COMMAND, "a message that does not decode (AttributeError: 'Dataset' object has "
                    "no attribute 'CommandField')"),
], ids=["unknown-type", "undecodable-message"])
def test_a_pdu_pas_cannot_read_on_its_own_association_fails_the_send_at_once(
        tmp_path: Path, garbage: bytes, what: str) -> None:
    """PAS forwarding to a ``dicom`` destination whose answer to the C-STORE is a PDU PAS
    cannot read (the node here is a pynetdicom SCP that writes it instead of its
    C-STORE-RSP). PAS named it and aborted at once, but its sender was not told: it waited
    out the DIMSE timeout (the destination's timeout_s, 20 s here) for an answer that could
    not come, and only then did the job fail."""
    answered = threading.Event()
    done = threading.Event()

    def on_store(event: Any) -> int:
        event.assoc.dul.socket.socket.sendall(garbage)
        answered.set()
        done.wait(30)  # the node says nothing more
        return 0x0000

    node = AE(ae_title="NODE")
    node.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    node_port = free_port()
    server = node.start_server(("127.0.0.1", node_port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
        "PAS_CACHE__SCRUB_MB_PER_S": "0", "PAS_QUEUE__MAX_ATTEMPTS": "1",
        "PAS_DESTINATIONS__NODE__KIND": "dicom", "PAS_DESTINATIONS__NODE__AE_TITLE": "NODE",
        "PAS_DESTINATIONS__NODE__HOST": "127.0.0.1",
        "PAS_DESTINATIONS__NODE__PORT": str(node_port),
        "PAS_DESTINATIONS__NODE__TIMEOUT_S": "20",
        "PAS_ROUTING__FALLBACK__DESTINATIONS": '["node"]'})
    try:
        pas.start()
        assert _store(pas.port).returncode == 0
        assert answered.wait(30), "PAS never sent the C-STORE"
        started = time.monotonic()
        [job] = wait_for(lambda: [r for r in read_rows(pas.home / "pas.sqlite",
                                                       "SELECT state, last_error FROM jobs")
                                  if r["state"] == "failed"], 15, what="the job failed")
        assert time.monotonic() - started < PROMPT_S
        assert job["last_error"] == (f"node: no C-STORE response for "
                                     f"{dcmread(CT_FILE, stop_before_pixels=True).SOPInstanceUID}")
        assert pas.log().count(f"WARNING pas.dicomnet: DICOM peer NODE (127.0.0.1) sent "
                               f"{what}: association aborted (A-ABORT)") == 1
        # "connection closed", as the line says: no socket of PAS's left to the node (its
        # own abort path left one open, in CLOSE-WAIT, until the association was collected).
        wait_for(lambda: not _sockets_to(pas, node_port), PROMPT_S,
                 what="PAS's connection to the node closed")
    finally:
        done.set()
        pas.stop()
        server.shutdown()
