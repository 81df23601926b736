"""MLLP framing and the listener's bounds, over raw sockets to a real ``pas run``.

What is proven: bytes between frames (the CR LF some engines send after the end block) are
skipped and the next message is answered as usual; an unframed message still gets a NAK; the
number of HL7 connections is capped (``hl7.max_connections``), a frame not finished within
``hl7.frame_timeout_s`` is refused and its connection closed, an idle connection is closed
after ``hl7.idle_timeout_s``, and the listener then serves new connections as before.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tests.support.peers import PasProcess, free_port, pas_with_hl7, port_open, wait_for
from tests.support.peers import prefetch_requests as requests

SB, EB = b"\x0b", b"\x1c\r"


def orm(control: str, order: str) -> bytes:
    return "\r".join([
        f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261123120000||ORM^O01|{control}|P|2.5",
        "PID|1||P700^^^HOSP^MR||DOE^JOHN",
        f"ORC|NW|{order}|||SC||^^^20991231120000",
        f"OBR|1|{order}||CT^CT||||||||||||||ACC{order}||||||CT",
    ]).encode()


def read_blocks(sock: socket.socket, count: int) -> list[bytes]:
    """Up to ``count`` MLLP blocks, fewer if the listener closes first."""
    buffer, blocks = b"", []
    while len(blocks) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buffer += chunk
        while EB in buffer:
            block, buffer = buffer.split(EB, 1)
            blocks.append(block.lstrip(SB))
    return blocks


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the listener closed this connection (EOF or reset), read blocking."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.fixture(scope="module")
def pas_mllp(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pas = pas_with_hl7(tmp_path_factory.mktemp("pas_mllp"))
    yield pas
    pas.stop()


@pytest.mark.parametrize("between", [b"\n", b"\r\n", b"\n\n \x00"])
def test_bytes_between_frames_are_skipped(pas_mllp: PasProcess, between: bytes) -> None:
    """``\\x1c\\r\\n\\x0b...``: both messages are ACKed AA on the same connection and stored
    (the second got ``MSA|AR ... not MLLP-framed`` and the connection was closed)."""
    tag = between.hex()
    payload = (SB + orm(f"SA{tag}", f"ORDA{tag}") + EB + between
               + SB + orm(f"SB{tag}", f"ORDB{tag}") + EB + between)
    with socket.create_connection(("127.0.0.1", pas_mllp.hl7_port), timeout=10) as sock:  # type: ignore[attr-defined]
        sock.sendall(payload)
        first, second = read_blocks(sock, 2)
        assert b"MSA|AA|SA" in first and b"MSA|AA|SB" in second
        sock.sendall(SB + orm(f"SC{tag}", f"ORDC{tag}") + EB)  # still open and in step
        (third,) = read_blocks(sock, 1)
        assert b"MSA|AA|SC" in third
    keys = {r["dedup_key"] for r in requests(pas_mllp)}
    assert {f"order:P700|HOSP|ORD{x}{tag}" for x in "ABC"} <= keys
    wait_for(lambda: "bytes before a start block skipped" in pas_mllp.log(), 10,
             what="the skipped bytes logged")


def test_a_message_without_start_block_is_still_refused(pas_mllp: PasProcess) -> None:
    """Skipping stops at an end block: an unframed message is a NAK, not a silent wait."""
    with socket.create_connection(("127.0.0.1", pas_mllp.hl7_port), timeout=10) as sock:  # type: ignore[attr-defined]
        sock.sendall(SB + orm("NS1", "ORDNS1") + EB + b"\r\n" + orm("NS2", "ORDNS2") + EB)
        first, second = read_blocks(sock, 2)
        assert b"MSA|AA|NS1" in first
        assert b"MSA|AR" in second and b"not MLLP-framed" in second
        assert closed_by_peer(sock)
    assert "order:P700|HOSP|ORDNS2" not in {r["dedup_key"] for r in requests(pas_mllp)}


def exchange(sock: socket.socket, control: str) -> bytes:
    sock.sendall(SB + orm(control, f"ORD{control}") + EB)
    (ack,) = read_blocks(sock, 1)
    return ack


def test_connections_are_capped_and_stalled_or_idle_ones_closed(pas_factory: Any) -> None:
    """200 connections each holding 1000 KB of an unfinished message stayed open for ever
    (+236 MB). Now: at most ``max_connections`` are served (the others closed at once), an
    unfinished frame is refused after ``frame_timeout_s`` and a silent connection closed after
    ``idle_timeout_s``, which frees the slots for the RIS."""
    port = free_port()
    pas = pas_factory({"PAS_HL7__HOST": "127.0.0.1", "PAS_HL7__PORT": str(port),
                       "PAS_HL7__MAX_CONNECTIONS": "3", "PAS_HL7__FRAME_TIMEOUT_S": "2",
                       "PAS_HL7__IDLE_TIMEOUT_S": "3",
                       "PAS_PREFETCH__DICOMWEB_URL": f"http://127.0.0.1:{free_port()}/x"})
    wait_for(lambda: port_open("127.0.0.1", port), 15, what="the HL7 listener")
    held: list[socket.socket] = []

    def served(control: str) -> socket.socket | None:
        """A connection that got its ACK (the listener may not have seen the close of the
        port probe yet, which still holds a slot for an instant)."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        try:
            if b"MSA|AA" in exchange(sock, control):
                return sock
        except (ValueError, ConnectionError):
            pass
        sock.close()
        return None

    try:
        for number in range(3):  # each served, then left in the middle of a message
            sock = wait_for(lambda n=number: served(f"CAP{n}"), 10, what="a served connection")
            held.append(sock)
            sock.sendall(SB + b"x" * 200_000)
        for _ in range(2):  # over the cap: closed before anything is read
            with socket.create_connection(("127.0.0.1", port), timeout=15) as extra:
                assert closed_by_peer(extra)
        assert "HL7 connections (hl7.max_connections = 3)" in pas.log()
        for sock in held:  # the stalled frames: a NAK naming the timeout, then closed
            (nak,) = read_blocks(sock, 1)
            assert b"MSA|AR" in nak and b"hl7.frame_timeout_s" in nak
            assert closed_by_peer(sock)
    finally:
        for sock in held:
            sock.close()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        assert b"MSA|AA" in exchange(sock, "CAP9")  # slots free again
        assert closed_by_peer(sock)  # then silent for idle_timeout_s: closed
    wait_for(lambda: "idle for 3" in pas.log(), 10, what="the idle close logged")
