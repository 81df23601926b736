"""Download lanes: one download stream carried by several TCP connections at once.

Owns: the lane wire format (shared with ``appliance.hub.lanes``) and the appliance's side of it:
reading each lane's records and putting the stream back in order. May not touch: the frames
inside the stream (``appliance.transfer.download`` reads them), the database, files.

Why: on a long link a fresh TCP window starts at 10 segments and needs several round trips to
fill the line (20 Mbit/s x 70 ms is 120 segments): one stream of ten CT priors took 1.23x the
bytes' time at link rate, whatever the application did (docs/benchmarks.md, prefetch). Four
connections, each paced by the hub at a quarter of the line (``SO_MAX_PACING_RATE``), start
with four windows and fill the line in fewer round trips without overrunning its queue
(measured 1.12x for the same bytes, no resend).

The stream (exactly the bytes of a one-connection answer: ``PASDL`` frames) is cut by the hub
into chunks of at most ``CHUNK_BYTES``; each lane takes the next chunk when its socket has
sent the previous one (``TCP_NOTSENT_LOWAT``), so a lane that falls behind takes fewer and the
lanes end together: within one chunk's time at a lane's pace (8 KiB: ~13 ms at a quarter of
20 Mbit/s; 32 KiB chunks had lanes end up to 80 ms apart, the line a quarter used meanwhile).
A lane's answer: ``LANE_MAGIC``, then records ``u64 offset | u32 length | bytes`` (big
endian), ``offset`` being the chunk's place in the stream. The answer ends when the stream
has no more chunks. The appliance puts the chunks back in order
(:class:`Reassembly`); a gap when every lane has ended is a cut stream.

Memory (invariant 8): chunks that arrived ahead of a missing one wait in memory up to
``MAX_AHEAD_BYTES``; past that, a lane reading a chunk that is not the next one waits (the lane
holding the next one never does, so this cannot deadlock).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator

LANES_PATH = "/api/v1/downloads/lanes"
LANE_MEDIA_TYPE = "application/vnd.pas.download-lanes"
LANE_MAGIC = b"PASLN\x01"
RECORD = struct.Struct(">QI")
CHUNK_BYTES = 8 * 1024
MAX_RECORD_BYTES = 1024 * 1024
MAX_AHEAD_BYTES = 16 * 1024 * 1024
MAX_LANES = 16


class LaneFormatError(Exception):
    """A lane's answer is not lane records."""


class LaneReader:
    """Incremental parser of one lane's answer: feed bytes, get ``(offset, chunk)`` records."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.opened = False

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        out: list[tuple[int, bytes]] = []
        if not self.opened:
            if len(self.buffer) < len(LANE_MAGIC):
                return out
            if bytes(self.buffer[:len(LANE_MAGIC)]) != LANE_MAGIC:
                raise LaneFormatError("a download lane does not start with PASLN v1")
            del self.buffer[:len(LANE_MAGIC)]
            self.opened = True
        at = 0  # records are cut out by position; the buffer is compacted once per feed
        while len(self.buffer) - at >= RECORD.size:
            offset, length = RECORD.unpack_from(self.buffer, at)
            if length == 0 or length > MAX_RECORD_BYTES:
                raise LaneFormatError(f"a download lane record declares {length} bytes")
            if len(self.buffer) - at < RECORD.size + length:
                break
            out.append((offset, bytes(self.buffer[at + RECORD.size:at + RECORD.size + length])))
            at += RECORD.size + length
        del self.buffer[:at]
        return out

    def finish(self) -> None:
        """The lane's answer ended: nothing may be left half read."""
        if self.buffer or not self.opened:
            raise LaneFormatError("a download lane ended inside a record" if self.opened
                                  else "a download lane ended before its first record")


class Reassembly:
    """The stream back in order from chunks that lanes ``put`` from their threads.

    Iterate it (one consumer) for the stream's bytes; each lane calls ``lane_ended`` once
    (with the error that ended it, if any). The iteration ends when every lane has ended and
    no gap is left. After a lane error it yields what is already there in order, then raises
    the first lane error at the first gap; :class:`LaneFormatError` for a gap left when every
    lane ended."""

    def __init__(self, lanes: int, max_ahead: int = MAX_AHEAD_BYTES):
        self.cond = threading.Condition()
        self.lanes_open = lanes
        self.max_ahead = max_ahead
        self.ahead: dict[int, bytes] = {}
        self.ahead_bytes = 0
        self.next_offset = 0
        self.error: BaseException | None = None
        self.aborted = False

    def put(self, offset: int, data: bytes) -> bool:
        """Hand a chunk over; False once the reader gave up (the lane should stop)."""
        with self.cond:
            while (not self.aborted and offset != self.next_offset
                   and self.ahead_bytes + len(data) > self.max_ahead):
                self.cond.wait(0.5)
            if self.aborted:
                return False
            if offset < self.next_offset or offset in self.ahead:
                self.error = self.error or LaneFormatError(
                    f"a download lane repeated the chunk at offset {offset}")
                self.cond.notify_all()
                return False
            self.ahead[offset] = data
            self.ahead_bytes += len(data)
            self.cond.notify_all()
            return True

    def lane_ended(self, error: BaseException | None = None) -> None:
        with self.cond:
            self.lanes_open -= 1
            if error is not None and self.error is None:
                self.error = error
            self.cond.notify_all()

    def abort(self) -> None:
        """The reader stops: lanes waiting to ``put`` are released and told to stop."""
        with self.cond:
            self.aborted = True
            self.cond.notify_all()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            with self.cond:
                while (self.next_offset not in self.ahead and self.lanes_open > 0
                       and self.error is None):
                    self.cond.wait(1.0)
                # What arrived in order before a lane failed is still the stream: it is read
                # before the error (a lane cut under a reader that lagged behind threw away
                # up to MAX_AHEAD_BYTES it had already been sent, and with them instances
                # that were complete: the retry fetched them again over the WAN).
                data = self.ahead.pop(self.next_offset, None)
                if data is None and self.error is not None:
                    raise self.error
                if data is None:  # every lane ended
                    if self.ahead:
                        raise LaneFormatError(f"the download lanes left a gap at offset "
                                              f"{self.next_offset}")
                    return
                self.next_offset += len(data)
                self.ahead_bytes -= len(data)
                self.cond.notify_all()
            yield data
