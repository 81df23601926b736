"""The incremental ``multipart/related`` reader: one state machine for every multipart answer
read as it streams (an archive's WADO-RS answer, at the hub and at a ``stowrs`` destination).

Owns: finding the parts' bodies across chunks cut anywhere (the preamble and each part's
headers skipped, part headers limited to 64 KiB), handing each body to a sink as it arrives:
memory holds one chunk, whatever the size of a part. May not touch: files, hashes, the
network (the sink and the caller do: :class:`appliance.hub.staging.PartsToFiles`,
:class:`appliance.dispatch.target_types.stowrs.PartDigests`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

HEADERS_LIMIT = 64 * 1024


class PartSink(Protocol):
    """What the reader tells about the parts, in order: started, data (any number), ended."""

    def part_started(self) -> None: ...

    def part_data(self, data: bytes) -> None: ...

    def part_ended(self) -> None: ...


class MultipartReader:
    """Feed it the answer's chunks; it calls the sink for each part's body. ``error`` makes
    the exception raised for a malformed answer from its message."""

    def __init__(self, boundary: bytes, sink: PartSink,
                 error: Callable[[str], Exception] = ValueError):
        self.opening = b"--" + boundary
        self.delimiter = b"\r\n--" + boundary
        self.sink = sink
        self.error = error
        self.buffer = bytearray()
        self.state = "preamble"  # preamble | after | headers | body | closed

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        while True:
            if self.state == "preamble":
                at = self.buffer.find(self.opening)
                if at < 0:
                    del self.buffer[: max(0, len(self.buffer) - len(self.opening))]
                    return
                del self.buffer[: at + len(self.opening)]
                self.state = "after"
            elif self.state == "after":
                if len(self.buffer) < 2:
                    return
                if self.buffer[:2] == b"--":
                    self.state = "closed"
                    return
                self.state = "headers"
            elif self.state == "headers":
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > HEADERS_LIMIT:
                        raise self.error("a multipart part's headers exceed 64 KiB")
                    return
                del self.buffer[: end + 4]
                self.sink.part_started()
                self.state = "body"
            elif self.state == "body":
                at = self.buffer.find(self.delimiter)
                if at < 0:
                    keep = len(self.delimiter) - 1
                    if len(self.buffer) > keep:
                        self.sink.part_data(bytes(self.buffer[: len(self.buffer) - keep]))
                        del self.buffer[: len(self.buffer) - keep]
                    return
                self.sink.part_data(bytes(self.buffer[:at]))
                del self.buffer[: at + len(self.delimiter)]
                self.sink.part_ended()
                self.state = "after"
            else:
                return


class StreamedParts:
    """Base of a sink that owns its reader: callers feed it the answer's chunks and look at
    ``state`` ("closed" once the closing delimiter came); subclasses say what becomes of
    each part (``part_started``, ``part_data``, ``part_ended``)."""

    def __init__(self, boundary: bytes, error: Callable[[str], Exception] = ValueError):
        self.reader = MultipartReader(boundary, self, error)

    @property
    def state(self) -> str:
        """preamble | after | headers | body | closed"""
        return self.reader.state

    def feed(self, chunk: bytes) -> None:
        self.reader.feed(chunk)

    def part_started(self) -> None:
        raise NotImplementedError

    def part_data(self, data: bytes) -> None:
        raise NotImplementedError

    def part_ended(self) -> None:
        raise NotImplementedError
