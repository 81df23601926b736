"""Download lanes, the appliance's side: records parsed, chunks put back in order, gaps and
repeats refused, memory bounded without deadlock (appliance/transfer/lanes.py); the hub's
side: the lanes of a site share its line, read back from real sockets (appliance/hub/lanes.py).
The lanes over real connections, against a real hub, are in tests/test_prefetch_batched.py."""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import threading
from typing import Any

import pytest

from appliance.hub.lanes import SO_MAX_PACING_RATE, SiteShares
from appliance.transfer.lanes import (
    LANE_MAGIC,
    RECORD,
    LaneFormatError,
    LaneReader,
    Reassembly,
)


def lane_bytes(records: list[tuple[int, bytes]]) -> bytes:
    return LANE_MAGIC + b"".join(RECORD.pack(o, len(d)) + d for o, d in records)


def test_a_lane_is_read_whatever_the_network_cuts_it_into() -> None:
    records = [(0, b"a" * 10), (10, b"b" * 70_000), (70_010, b"c")]
    wire = lane_bytes(records)
    for step in (1, 7, 4096, len(wire)):
        reader = LaneReader()
        got = [r for at in range(0, len(wire), step) for r in reader.feed(wire[at:at + step])]
        reader.finish()
        assert got == records


@pytest.mark.parametrize(("wire", "named"), [
    (b"PASDL\x01" + bytes(12), "does not start with PASLN"),
    (LANE_MAGIC + RECORD.pack(0, 0), "declares 0 bytes"),
    (LANE_MAGIC + RECORD.pack(0, 64 * 1024 * 1024), "declares 67108864 bytes"),
])
def test_a_lane_that_is_not_lane_records_is_refused(wire: bytes, named: str) -> None:
    with pytest.raises(LaneFormatError, match=named):
        LaneReader().feed(wire)


def test_a_lane_cut_inside_a_record_is_noticed() -> None:
    reader = LaneReader()
    reader.feed(lane_bytes([(0, b"x" * 100)])[:-1])
    with pytest.raises(LaneFormatError, match="inside a record"):
        reader.finish()
    with pytest.raises(LaneFormatError, match="before its first record"):
        LaneReader().finish()


def _chunks(data: bytes, size: int) -> list[tuple[int, bytes]]:
    return [(at, data[at:at + size]) for at in range(0, len(data), size)]


def test_chunks_from_several_lanes_come_back_in_order() -> None:
    data = random.Random(7).randbytes(1_000_000)
    chunks = _chunks(data, 4096)
    lanes = 4
    merge = Reassembly(lanes, max_ahead=64 * 1024)  # small: the lanes wait on each other

    def lane(number: int) -> None:
        for offset, chunk in chunks[number::lanes]:
            assert merge.put(offset, chunk)
        merge.lane_ended()

    threads = [threading.Thread(target=lane, args=(n,)) for n in range(lanes)]
    for thread in threads:
        thread.start()
    got = b"".join(merge)
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert merge.ahead_bytes == 0


def test_a_gap_left_when_every_lane_ended_is_a_cut() -> None:
    merge = Reassembly(2)
    merge.put(0, b"abc")
    merge.put(6, b"ghi")  # offset 3 never comes
    merge.lane_ended()
    merge.lane_ended()
    with pytest.raises(LaneFormatError, match="gap at offset 3"):
        b"".join(merge)


def test_a_repeated_chunk_and_a_lane_error_end_the_stream() -> None:
    merge = Reassembly(1)
    assert merge.put(0, b"abc")
    assert not merge.put(0, b"abc")
    with pytest.raises(LaneFormatError, match="repeated the chunk at offset 0"):
        b"".join(merge)
    failing = Reassembly(2)
    failing.put(0, b"abc")
    failing.lane_ended(RuntimeError("lane 1: connection reset"))
    with pytest.raises(RuntimeError, match="connection reset"):
        b"".join(failing)


def test_what_arrived_in_order_before_a_lane_failed_is_read_before_the_error() -> None:
    """A lane cut while the reader lagged: the chunks already in, in order, are the stream
    (their buckets' instances are complete and filed, not fetched again); the error comes
    at the first gap. It came at once before, whatever was waiting (a CI run under load
    filed nothing of a 400 kB cut download, and its retry fetched it all again)."""
    merge = Reassembly(2)
    assert merge.put(0, b"abc") and merge.put(3, b"def") and merge.put(9, b"jkl")
    merge.lane_ended(RuntimeError("lane 0: connection reset"))  # offset 6 never comes
    got: list[bytes] = []
    with pytest.raises(RuntimeError, match="connection reset"):
        for chunk in merge:
            got.append(chunk)
    assert got == [b"abc", b"def"]
    assert merge.ahead == {9: b"jkl"}  # past the gap: not the stream


def test_a_lane_waiting_for_room_is_released_when_the_reader_gives_up() -> None:
    merge = Reassembly(2, max_ahead=10)
    merge.put(20, b"x" * 10)  # ahead of offset 0: the room is used up
    result: list[bool] = []
    waiting = threading.Thread(target=lambda: result.append(merge.put(30, b"y" * 10)))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # no room, not the next chunk: it waits
    merge.abort()
    waiting.join(5)
    assert result == [False]


class _Connection:
    """The two things ``tune`` asks of an asyncio transport, over a real TCP socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.limits: dict[str, Any] = {}

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = {"high": high, "low": low}


def _pacing(sock: socket.socket) -> int:
    return struct.unpack("=I", sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, 4))[0]


def test_the_lanes_of_a_site_share_its_line() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    ends = []
    for _ in range(3):
        ends.append(socket.create_connection(server.getsockname()))
        ends.append(server.accept()[0])
    first, second, other = (_Connection(ends[n]) for n in (1, 3, 5))
    shares = SiteShares()
    try:
        shares.join("SITE-A", 1, first, 20_000_000)
        assert _pacing(first.sock) == 2_500_000  # the whole line: 20 Mbit/s in bytes
        shares.join("SITE-A", 2, second, 20_000_000)
        shares.join("SITE-B", 3, other, 8_000_000)  # another site's line is its own
        assert _pacing(first.sock) == _pacing(second.sock) == 1_250_000
        assert _pacing(other.sock) == 1_000_000
        assert first.limits["high"] is not None  # asyncio's TLS buffer kept small
        shares.leave("SITE-A", 2)
        assert _pacing(first.sock) == 2_500_000
    finally:
        for end in ends:
            end.close()
        server.close()
