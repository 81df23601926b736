"""A Deflated Explicit VR Little Endian dataset (PS3.5 A.5) inflated with bounded memory
(invariant 8): a megabyte at a time, into memory while it is small, into a spool temp file
past that, whose room is reserved against the spool's quota and free-space floor as it grows.

Owns: the inflation of a raw deflate stream and the temp file it writes. May not touch: the
database, the filed instances (it reads only the bytes it is handed), the network. Used by
ingest (:mod:`appliance.ingest.reading` reads the index record from the inflated dataset,
mapped) and by :mod:`appliance.store.transcode` (a copy in another syntax is read from it).

Why: pydicom inflates a deflated dataset whole, in memory (``zlib.decompress`` in
``read_partial``), then parses that copy: a 220 MiB dataset (12 MB as sent) took a reader
~2x its inflated size of RAM. Here at most ``INFLATE_CHUNK`` is inflated at a time, and the
inflated bytes are written out as they come.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from appliance.store.spool import Spool, SpoolFull

INFLATE_CHUNK = 1 << 20  # deflated bytes fed, and inflated bytes made, at a time
ROOM_STEP = 16 << 20  # a temp file's reserved room grows by this much when it is reached
# An inflated dataset up to this size stays in memory (a structured report, the usual
# deflated object): no temp file for it.
IN_MEMORY = 4 << 20


class InflateError(Exception):
    """The deflated dataset cannot be inflated; the message says why."""


class InflatesPast(InflateError):
    """The dataset inflates past the limit it was given (a deflate bomb, say)."""


def inflate(chunks: Iterable[bytes | memoryview], sink: _Sink, *,
            limit: int | None = None) -> int:
    """The raw deflate stream in ``chunks`` inflated into ``sink``, ``INFLATE_CHUNK`` at most
    at a time; the inflated size. What follows the end of the stream (the writer's padding
    byte) is ignored, as ``zlib.decompress`` ignores it. Raises :class:`InflatesPast` as
    soon as ``limit`` bytes are passed, :class:`InflateError` for data that is not deflate
    or a stream cut short."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        for pending in chunks:
            while pending and not inflater.eof:
                piece = inflater.decompress(pending, INFLATE_CHUNK)
                pending = inflater.unconsumed_tail
                total += len(piece)
                if limit is not None and total > limit:
                    raise InflatesPast(f"the deflated dataset inflates past {limit >> 20} "
                                       f"MB: refused")
                sink.write(piece)
            if inflater.eof:
                break
        tail = inflater.flush()
    except zlib.error as exc:
        raise InflateError(f"the deflated dataset is not valid deflate data: {exc}") from None
    total += len(tail)
    if limit is not None and total > limit:
        raise InflatesPast(f"the deflated dataset inflates past {limit >> 20} MB: refused")
    sink.write(tail)
    if not inflater.eof:
        raise InflateError("the deflated dataset is cut short: its deflate stream does not "
                           "end")
    return total


def chunks_of(data: bytes | bytearray | memoryview,
              size: int = INFLATE_CHUNK) -> Iterator[memoryview]:
    """``data`` a slice at a time (no copy: a mapped spill file is read where it lies)."""
    view = memoryview(data)
    for at in range(0, len(view), size):
        yield view[at:at + size]


class _Sink:
    """Where inflated bytes go: a bytearray up to ``in_memory`` bytes, then (given a spool)
    a spool temp file, its room reserved ``ROOM_STEP`` at a time ahead of the bytes written
    (:meth:`Spool.open_temp`, :meth:`Spool.grow_temp`), so that it counts whole against the
    quota and the floor while it exists."""

    def __init__(self, spool: Spool | None, in_memory: int):
        self.spool, self.in_memory = spool, in_memory
        self.buffer = bytearray()
        self.path: Path | None = None
        self.fd = -1
        self.size = self.granted = 0

    def write(self, data: bytes) -> None:
        if self.fd < 0 and self.spool is not None \
                and len(self.buffer) + len(data) > self.in_memory:
            self.path, self.fd = self.spool.open_temp(ROOM_STEP)
            self.granted = ROOM_STEP
            held, self.buffer = self.buffer, bytearray()
            self._write_file(held)
        if self.fd < 0:
            self.buffer += data
            return
        self._write_file(data)

    def _write_file(self, data: bytes | bytearray) -> None:
        assert self.spool is not None and self.path is not None
        while self.size + len(data) > self.granted:
            self.spool.grow_temp(self.path, ROOM_STEP)
            self.granted += ROOM_STEP
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:  # a full disk, as the floor would have said: no room
            raise SpoolFull(f"cannot write the inflated dataset to the spool: "
                            f"{exc.strerror or exc}") from exc
        self.size += len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """The temp file (if any) goes, its room given back."""
        self.close()
        if self.path is not None and self.spool is not None:
            self.spool.remove_temp(self.path)
        self.buffer = bytearray()


def inflate_to_temp(spool: Spool, chunks: Iterable[bytes | memoryview], *,
                    limit: int | None = None) -> Path:
    """The stream inflated into a new spool temp file; its path, for the caller to remove
    with ``spool.remove_temp`` (its room stays reserved until then). Nothing is left behind
    when it fails (InflateError, SpoolFull: no room, or a write failed)."""
    sink = _Sink(spool, in_memory=0)
    try:
        inflate(chunks, sink, limit=limit)
        if sink.path is None:  # nothing inflated: an empty file all the same
            sink.path, sink.fd = spool.open_temp(0)
    except BaseException:
        sink.discard()
        raise
    sink.close()
    return sink.path


@contextlib.contextmanager
def inflated(deflated: bytes | bytearray | memoryview | Iterable[bytes], *,
             limit: int | None, spool: Spool | None) -> Iterator[memoryview]:
    """The dataset (a buffer, or its chunks) inflated, as a buffer: in memory up to
    ``IN_MEMORY`` bytes, past that a spool temp file mapped (only the pages read are in
    memory), removed on leaving with its room. Without a spool everything stays in memory
    (bounded by ``limit``)."""
    sink = _Sink(spool, IN_MEMORY)
    chunks = chunks_of(deflated) if isinstance(deflated, bytes | bytearray | memoryview) \
        else deflated
    try:
        inflate(chunks, sink, limit=limit)
    except BaseException:
        sink.discard()
        raise
    if sink.path is None:
        yield memoryview(sink.buffer)
        return
    try:
        sink.close()  # (past IN_MEMORY: never empty, which mmap would refuse)
        with open(sink.path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mapped)
        try:
            yield view
        finally:
            # A slice still held (by a traceback's frames, say) keeps the mapping: the
            # garbage collector closes it once that goes.
            with contextlib.suppress(BufferError):
                view.release()
                mapped.close()
    finally:
        sink.discard()
