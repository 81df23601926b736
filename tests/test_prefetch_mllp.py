"""MLLP framing and the listener's bounds, over raw sockets to a real ``pas run``.

What is proven: bytes between frames (the CR LF some engines send after the end block) are
skipped and the next message is answered as usual; an unframed message still gets a NAK; the
number of HL7 connections is capped (``hl7.max_connections``), a frame not finished within
``hl7.frame_timeout_s`` is refused and its connection closed, an idle connection is closed
after ``hl7.idle_timeout_s``, and the listener then serves new connections as before.

Found in review (2026-12-04):
- a client that sent messages but never read its ACKs held its connection slot for ever once
  the socket buffers were full (``drain`` had no bound): with ``max_connections = 1`` every
  other client was closed at once, for ever. Now dropped after ``hl7.frame_timeout_s``.
- the NAKs given before a message is read (not framed, too large, not finished) had an empty
  MSA-2: the RIS could not tell which message was refused. They echo MSH-10 now.
- the ACK's MSH-7 was UTC without an offset, which HL7 v2 reads as the sender's local time.

Found in review (2026-12-07):
- a CR LF after a frame started the frame timer: the sender quiet for ``frame_timeout_s``
  got an unasked AR (empty MSA-2) and a close, and took that AR for the answer to its next
  order, which was lost; meanwhile the connection counted as busy (never closed for a new
  one). Bytes outside a frame now leave the connection idle between messages.
- up to ``hl7.max_message_kb`` (1 MiB) of bytes before a start block were read a byte at a
  time without yielding: 8 connections sending 1 MiB of junk held an order on another one for
  seconds. Now at most 4096 between frames, read as they come; more closes the connection.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import threading
import time
import zlib
from typing import Any

import pytest

from tests.support.peers import (
    PasProcess,
    free_port,
    pas_with_hl7,
    port_open,
    run_pas,
    wait_for,
)
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


def served(port: int, control: str, receive_buffer: int = 0) -> socket.socket | None:
    """A new connection that got its ACK for ``control``, else None (the listener may not
    have seen the close of the port probe yet, which still holds a slot for an instant).
    ``receive_buffer``: SO_RCVBUF, set before connecting (a client slow to read)."""
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(15)
    try:
        sock.connect(("127.0.0.1", port))
        ack = exchange(sock, control)
    except (ValueError, ConnectionError):  # closed at once: every slot was taken
        sock.close()
        return None
    if b"MSA|AA" not in ack:
        sock.close()
        raise RuntimeError(f"{control} answered {ack[:300]!r}")  # kept by wait_for's message
    return sock


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

    try:
        for number in range(3):  # each served, then left in the middle of a message
            sock = wait_for(lambda n=number: served(port, f"CAP{n}"), 10,
                            what="a served connection")
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


def test_a_new_connection_takes_the_place_of_the_one_silent_longest(pas_factory: Any) -> None:
    """With every slot held by connections that send nothing (leaked by an engine, a health
    check that never closes), the RIS was closed at once for ``idle_timeout_s`` (an hour by
    default). Now a new connection takes the place of the one silent longest; one with a
    message under way (test above) is never closed for another."""
    port = free_port()
    pas = pas_factory({"PAS_HL7__HOST": "127.0.0.1", "PAS_HL7__PORT": str(port),
                       "PAS_HL7__MAX_CONNECTIONS": "2",
                       "PAS_PREFETCH__DICOMWEB_URL": f"http://127.0.0.1:{free_port()}/x"})
    wait_for(lambda: port_open("127.0.0.1", port), 15, what="the HL7 listener")
    oldest = socket.create_connection(("127.0.0.1", port), timeout=15)
    # Served (an ACK) and then silent: the listener has both counted. The oldest ends its
    # frame with CR LF, which made it a connection with a message under way, never closed.
    oldest.sendall(SB + orm("IDLE1", "ORDIDLE1") + EB + b"\r\n")
    assert b"MSA|AA|IDLE1" in read_blocks(oldest, 1)[0]
    newer = socket.create_connection(("127.0.0.1", port), timeout=15)
    assert b"MSA|AA" in exchange(newer, "IDLE2")
    try:
        # Within EVICT_AFTER_IDLE_S of their last message a newcomer may be closed at once;
        # then it is served, in the place of the oldest.
        ris = wait_for(lambda: served(port, "RIS1"), 15, what="the RIS's connection served")
        ris.close()
        assert closed_by_peer(oldest)
        assert re.search(r"closed after \d+ s silent between messages, for a new connection "
                         r"from 127\.0\.0\.1:\d+ \(hl7\.max_connections = 2 reached\)",
                         pas.log()), pas.log()[-2000:]
        assert b"MSA|AA" in exchange(newer, "IDLE3")  # the other one served on
    finally:
        oldest.close()
        newer.close()
    assert "order:P700|HOSP|ORDRIS1" in {r["dedup_key"] for r in requests(pas)}


def fields(ack: bytes) -> dict[str, list[str]]:
    """Each segment of an ACK by name, split into fields (MSH: index n is MSH-n)."""
    segments = {}
    for segment in ack.decode().split("\r"):
        parts = segment.split("|")
        segments[parts[0]] = ["MSH", "|", *parts[1:]] if parts[0] == "MSH" else parts
    return segments


def test_the_ack_time_carries_its_zone_offset(pas_mllp: PasProcess) -> None:
    """MSH-7 was ``20261204172843``, UTC with no offset (HL7 reads it as local time). Now
    ``YYYYMMDDHHMMSS+ZZZZ``, the moment the ACK was built."""
    with socket.create_connection(("127.0.0.1", pas_mllp.hl7_port), timeout=10) as sock:  # type: ignore[attr-defined]
        ack = fields(exchange(sock, "TZ1"))
    stamp = ack["MSH"][7]
    assert re.fullmatch(r"\d{14}[+-]\d{4}", stamp), stamp
    moment = dt.datetime.strptime(stamp, "%Y%m%d%H%M%S%z")
    assert abs(moment.timestamp() - time.time()) < 30
    assert ack["MSA"][1:3] == ["AA", "TZ1"]


@pytest.fixture(scope="module")
def pas_small(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pas = pas_with_hl7(tmp_path_factory.mktemp("pas_mllp_small"),
                       PAS_HL7__FRAME_TIMEOUT_S="2", PAS_HL7__MAX_MESSAGE_KB="8")
    yield pas
    pas.stop()


MSH_ONLY = b"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261204120000||ORM^O01|"


@pytest.mark.parametrize(("payload", "control", "reason"), [
    (SB + orm("NK1", "ORDNK1") + b"\x1c\x0b", "NK1", b"followed by 0x0b, not CR"),
    (orm("NK2", "ORDNK2") + EB, "NK2", b"not MLLP-framed: Block does not begin"),
    (SB + orm("NK3", "ORDNK3") + b"\rNTE|1||" + b"x" * 9000 + EB, "NK3",
     b"larger than hl7.max_message_kb (8 KB)"),
    (SB + orm("NK4", "ORDNK4"), "NK4", b"message not finished within hl7.frame_timeout_s"),
    (SB + orm("NK5", "ORDNK5") + b"\x1c", "NK5", b"no CR after it"),
    (SB + MSH_ONLY + b"NK6|P|2.5|", "NK6", b"message not finished"),
    (SB + MSH_ONLY + b"NK8|P", "NK8", b"message not finished"),  # MSH-11 may be cut short
    (SB + MSH_ONLY + b"NK7", "", b"message not finished"),  # MSH-10 maybe cut short
    (SB + b"PID|1||P1\rMSH|x", "", b"message not finished"),  # no MSH first
], ids=["bad-end-block", "no-start-block", "too-large", "stalled", "fs-no-cr", "msh-only",
        "msh-to-10", "msh10-cut", "no-msh"])
def test_mllp_naks_echo_the_control_id(pas_small: PasProcess, payload: bytes, control: str,
                                       reason: bytes) -> None:
    """The NAK of a message refused before it is read carries its MSH-10 in MSA-2 and
    mirrors its MSH (MSA-2 was empty for all of them); none when MSH-10 may be cut short."""
    with socket.create_connection(("127.0.0.1", pas_small.hl7_port), timeout=15) as sock:  # type: ignore[attr-defined]
        sock.sendall(payload)
        (nak,) = read_blocks(sock, 1)
        assert closed_by_peer(sock)
    assert reason in nak
    ack = fields(nak)
    assert ack["MSA"][1:3] == ["AR", control]
    assert re.fullmatch(r"\d{14}[+-]\d{4}", ack["MSH"][7])
    if control:
        assert ack["MSH"][3:7] == ["PAS", "HOSP", "RIS", "HOSP"]
        assert ack["MSH"][9] == "ACK^O01^ACK"
        assert ack["MSH"][11:13] == (["P", "2.5"] if b"2.5" in payload else ["", ""])
    # Audited as a message refused once read is, naming it (it was only logged).
    (row,) = json.loads(pas_small.cli("audit", "--event", "hl7", "--limit", "1",
                                      "--json").stdout)
    assert row["outcome"].startswith("failure: ") and reason.decode() in row["outcome"], row
    assert row["detail"] == (f"ORM^O01 MSH-10 {control} from RIS^HOSP" if control
                             else None), row
    assert row["actor"].startswith("127.0.0.1:"), row
    with socket.create_connection(("127.0.0.1", pas_small.hl7_port), timeout=15) as sock:  # type: ignore[attr-defined]
        after = f"OK{zlib.crc32(payload)}"
        assert f"MSA|AA|{after}".encode() in exchange(sock, after)  # served on as before


def test_a_trailing_cr_lf_is_no_message_under_way(pas_small: PasProcess) -> None:
    """``FS CR CR LF``, then the sender quiet longer than ``frame_timeout_s`` (2 s): the LF
    started the frame timer, PAS sent an unasked ``MSA|AR||message not finished`` and closed,
    and the engine's next order read it as its answer and was never stored. Now nothing comes
    while it is quiet, and the next order on the same connection gets its own AA."""
    with socket.create_connection(("127.0.0.1", pas_small.hl7_port), timeout=15) as sock:  # type: ignore[attr-defined]
        sock.sendall(SB + orm("CRLF1", "ORDCRLF1") + EB + b"\r\n")
        (ack,) = read_blocks(sock, 1)
        assert fields(ack)["MSA"][1:3] == ["AA", "CRLF1"]
        sock.settimeout(3 * 2)  # longer than hl7.frame_timeout_s: the NAK came within it
        with pytest.raises(TimeoutError):
            unasked = sock.recv(65536)
            pytest.fail(f"unasked answer: {unasked!r}")
        sender = sock.getsockname()
        sock.settimeout(15)
        sock.sendall(SB + orm("CRLF2", "ORDCRLF2") + EB + b"\r\n")
        (ack,) = read_blocks(sock, 1)
        assert fields(ack)["MSA"][1:3] == ["AA", "CRLF2"]
    assert "order:P700|HOSP|ORDCRLF2" in {r["dedup_key"] for r in requests(pas_small)}
    assert f"HL7 from {sender[0]}:{sender[1]} refused" not in pas_small.log()


def _send_all(sock: socket.socket, payload: bytes, outcome: list[BaseException]) -> None:
    """``sendall`` in a thread; ``outcome`` gets the error that ended it."""
    try:
        sock.sendall(payload)
    except OSError as exc:
        outcome.append(exc)


def test_bytes_outside_frames_are_bounded(pas_mllp: PasProcess) -> None:
    """4096 bytes between frames are skipped; connections each sending 1 MiB with no start
    block were read on (a byte at a time, up to hl7.max_message_kb) and held open. Now each
    is refused past 4096 bytes, logged, audited and closed, and another connection's order
    sent meanwhile is answered AA."""
    port = pas_mllp.hl7_port  # type: ignore[attr-defined]
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(b"\r\n" * 2048 + SB + orm("JUNK1", "ORDJUNK1") + EB)
        assert fields(read_blocks(sock, 1)[0])["MSA"][1:3] == ["AA", "JUNK1"]
    junk = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(4)]
    sources = {"{}:{}".format(*sock.getsockname()) for sock in junk}
    outcome: list[BaseException] = []
    senders = [threading.Thread(target=_send_all, args=(sock, b"A" * 1024 * 1024, outcome),
                                daemon=True) for sock in junk]
    try:
        for sender in senders:
            sender.start()
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            assert fields(exchange(sock, "JUNK2"))["MSA"][1:3] == ["AA", "JUNK2"]
        for sock in junk:
            assert closed_by_peer(sock)
        for sender in senders:
            sender.join(15)
            assert not sender.is_alive()
    finally:
        for sock in junk:
            sock.close()
    reason = ("not MLLP-framed: no start block in the 4097 bytes after the last frame (at "
              "most 4096 between frames)")
    log = pas_mllp.log()
    assert all(f"HL7 from {source} refused: {reason}" in log for source in sources), log[-3000:]
    rows = json.loads(pas_mllp.cli("audit", "--event", "hl7", "--json").stdout)
    assert sources <= {row["actor"] for row in rows if row["outcome"] == f"failure: {reason}"}
    assert {"order:P700|HOSP|ORDJUNK1", "order:P700|HOSP|ORDJUNK2"} <= {
        r["dedup_key"] for r in requests(pas_mllp)}


def test_a_client_that_never_reads_its_acks_frees_its_slot(pas_factory: Any) -> None:
    """With ``max_connections = 1``, a client that sends messages with a 200 KB MSH-3 (which
    the NAK mirrors) and never reads held the only slot for ever: every other client was
    closed at once. Now it is dropped ``frame_timeout_s`` after its ACKs stop being taken,
    logged naming it, and the next client is served."""
    port = free_port()
    pas = pas_factory({"PAS_HL7__HOST": "127.0.0.1", "PAS_HL7__PORT": str(port),
                       "PAS_HL7__MAX_CONNECTIONS": "1", "PAS_HL7__FRAME_TIMEOUT_S": "2",
                       "PAS_PREFETCH__DICOMWEB_URL": f"http://127.0.0.1:{free_port()}/x"})
    wait_for(lambda: port_open("127.0.0.1", port), 15, what="the HL7 listener")

    try:
        deaf = wait_for(lambda: served(port, "DEAF0", 4096), 30, what="the deaf client served")
    except TimeoutError as exc:  # what the listener said is the explanation
        raise AssertionError(f"{exc}\nPAS log:\n{pas.log()[-4000:]}") from None
    try:
        sender = deaf.getsockname()
        big = b"R" * 200_000
        message = b"\r".join([b"MSH|^~\\&|" + big + b"|HOSP|PAS|HOSP|20261204120000||ORU^R01|"
                              b"DEAF%d|P|2.5", b"PID|1||P1^^^HOSP^MR"])
        # 30 MB: more than the socket buffers on both sides hold, so that sendall cannot end
        # before the listener drops the connection.
        flood = b"".join(SB + message % n + EB for n in range(1, 151))
        outcome: list[BaseException] = []
        sending = threading.Thread(target=_send_all, args=(deaf, flood, outcome), daemon=True)
        sending.start()
        flooded = time.monotonic()
        other = wait_for(lambda: served(port, "NEXT1"), 30, what="the next client served")
        other.close()
        assert time.monotonic() - flooded < 20  # 2 s once the buffers are full
        log = pas.log()
        assert f"HL7 from {sender[0]}:{sender[1]}: an answer not taken within " \
               "hl7.frame_timeout_s (2 s)" in log
        # The socket is gone, not waiting to flush what the client never reads: the flood
        # still being sent is reset (a close() left it blocked, the descriptor held).
        sending.join(15)
        assert not sending.is_alive()
        assert outcome and isinstance(outcome[0], (ConnectionResetError, BrokenPipeError))
    finally:
        deaf.close()


def test_only_the_allowed_sources_may_send_hl7(pas_factory: Any, tmp_path: Any) -> None:
    """Anyone who could reach the HL7 port sent orders (a named patient's priors pulled from
    the region) and merges (security review, 2026-12-06). With ``hl7.allowed_sources``, a
    connection from another host is closed as it opens, logged, counted and audited; one
    from an allowed network is served; a value that is no address is a config error."""
    import httpx

    port = free_port()
    env = {"PAS_HL7__HOST": "127.0.0.1", "PAS_HL7__PORT": str(port),
           "PAS_PREFETCH__DICOMWEB_URL": f"http://127.0.0.1:{free_port()}/x"}
    pas = pas_factory({**env, "PAS_HL7__ALLOWED_SOURCES": '["10.9.9.9", "192.0.2.0/24"]'})
    wait_for(lambda: port_open("127.0.0.1", port), 15, what="the HL7 listener")
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(SB + orm("SRC1", "ORDSRC1") + EB)
        assert closed_by_peer(sock)  # no ACK: not an allowed source
    wait_for(lambda: "HL7 from 127.0.0.1:" in pas.log() and "closed at once, not one of "
             "hl7.allowed_sources" in pas.log(), 10, what="the refusal's log line")
    assert "order:P700|HOSP|ORDSRC1" not in {r["dedup_key"] for r in requests(pas)}
    # Audited and counted after the close (the peer does not wait for the trail).
    wait_for(lambda: any(r["outcome"] == "failure: HL7 connection closed: not one of "
                         "hl7.allowed_sources" and r["source"] == "127.0.0.1"
                         for r in json.loads(pas.cli("audit", "--event", "security",
                                                     "--json").stdout)), 10,
             what="the security row")
    scraped = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
    counted = re.search(r'pas_access_refused_total\{channel="hl7",reason="unknown-source"\} '
                        r"(\S+)", scraped)
    assert counted and float(counted[1]) >= 1, scraped  # port_open's probe is one too
    doctor = {c["name"]: c for c in json.loads(pas.cli("doctor", "--json",
                                                      check=False).stdout)}
    assert "HL7 access" not in doctor  # loopback, and allowed sources set
    pas.stop()

    served = pas_factory({**env, "PAS_HL7__ALLOWED_SOURCES": '["127.0.0.0/8"]'})
    wait_for(lambda: port_open("127.0.0.1", port), 15, what="the HL7 listener")
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        assert b"MSA|AA|SRC2" in exchange(sock, "SRC2")
    served.stop()
    bad = run_pas(["config", "check"], {**os.environ, "PAS_HOME": str(tmp_path / "x"),
                                        "PAS_HL7__ALLOWED_SOURCES": '["ris.hospital"]'},
                  timeout=60)
    assert bad.returncode == 2 and "hl7.allowed_sources" in bad.stderr and \
        "'ris.hospital' is not an IP address or network" in " ".join(bad.stderr.split())
