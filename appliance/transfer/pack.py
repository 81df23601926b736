"""Packing instances into buckets, exact to the byte (issue 3's transfer format).

Owns: the bucket plan (which byte ranges of which files travel in which bucket) and the
self-describing plaintext format of a bucket. May not touch: the network, the database,
sealing (``seal.py``), and the stored files (read only).

Why this shape:
- A bucket carries byte ranges ("pieces") of original files; a big file spans buckets. The hub
  concatenates pieces and gets the original file back, byte for byte (invariant 4).
- Inside a bucket, uncompressed pixel data travels as JPEG-LS lossless bands (whole rows of
  the Pixel Data value that lie inside the piece), and every other byte (headers, odd
  lengths, padding, encapsulated pixel data, what JPEG-LS cannot do exactly) goes, in piece
  order, into ONE zstd stream over the whole bucket: instances of a series share most of
  their headers, which solid compression turns into nearly nothing.
- pydicom is used only to find the Pixel Data value's file offset and its geometry; the
  dataset is never re-encoded. Every band is decoded again right after encoding and compared
  with the original bytes; any doubt sends those bytes to zstd instead (counted).

Payload format v1 (all integers big endian):
``b"PASPK" 0x01 | u32 header length | header (UTF-8 JSON) | blob 0 | blob 1 | ...``
header: ``{"v": 1, "raw": <bytes in the zstd stream>, "blobs": [<len>, ...],
"entries": [{"uid", "offset", "length", "total", "segs": [...]}]}`` where blob 0 is the
zstd frame (empty when ``raw`` is 0), the others JPEG-LS codestreams, and each segment is
``[0, n]`` (the next n bytes of the zstd stream), ``[1, blob, rows, cols, comps, ilv, dtype,
base]`` (a JPEG-LS band: decoded samples + ``base``, stored as ``dtype``), ``[2, n]`` (the
next n bytes of the zstd stream's tail, which follows all kind-0 bytes: bands that JPEG-LS
could not carry exactly or usefully) or ``[3, blob, first_row, rows, cols, comps, ilv, dtype,
base]`` (rows of a stack: small images of one geometry encoded as one JPEG-LS image).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from appliance.transfer import jls, levels
from appliance.transfer.layout import PixelLayout, pixel_layout

# The format's reading side lives in unpack.py; Piece, BucketFormatError and unpack_bucket
# are part of this module's fixed API, hence re-exported.
from appliance.transfer.unpack import (  # noqa: F401
    HEADER_LEN,
    MAGIC,
    BucketFormatError,
    Piece,
    band_bytes,
    unpack_bucket,
)

DEFAULT_TARGET = 6 * 1024 * 1024
# Bands smaller than this are not worth a JPEG-LS header and a Python round trip.
MIN_BAND_BYTES = 4096
# Large bands are cut so that two cores can encode parts of one big image at once.
MAX_BAND_BYTES = 2 * 1024 * 1024
# Bands smaller than this (the 64x64 images of an MR series) are stacked, rows under rows,
# with others of the same geometry into one JPEG-LS image of up to STACK_TARGET bytes:
# CharLS's adaptive contexts learn over the whole stack (MR: 4 % smaller), in fewer calls.
STACK_BELOW = 64 * 1024
STACK_TARGET = 1024 * 1024

# A band whose JPEG-LS is not at least this much smaller than its bytes (noise) goes to zstd.
WORTHWHILE = 0.9
# level -> (zstd level, JPEG-LS on?)
LEVELS: dict[str, tuple[int, bool]] = {
    "fast": (3, False),
    "default": (6, True),
    "max": (19, True),
}


class PackError(ValueError):
    """A bucket cannot be packed: unknown level, or a stored file that no longer matches its
    record (size or SHA-256). Nothing is produced."""


@dataclass(frozen=True)
class PackItem:
    """One stored instance to ship."""

    sop_instance_uid: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class BucketPlan:
    """Deterministic: the same items in the same order give the same plan."""

    index: int
    entries: list[tuple[PackItem, int, int]]


def plan_buckets(items: list[PackItem], target_bytes: int = DEFAULT_TARGET,
                 first_bytes: int | None = None) -> list[BucketPlan]:
    """Cut the items into buckets of about ``target_bytes`` of original bytes.

    Small files are never split: a file that does not fit in the current bucket starts the
    next one. A file bigger than a bucket is cut into ``target_bytes`` pieces; its tail piece
    shares a bucket with the files that follow. Empty files still get an entry, so the hub
    sees every instance. ``first_bytes`` (smaller than ``target_bytes``): the first bucket's
    size instead, so that the hub has whole instances to archive one round trip after the
    transfer starts (the plan stays a function of the items and the two sizes: a resumed
    transfer cuts the same buckets)."""
    if target_bytes < 1:
        raise PackError(f"target_bytes must be positive, got {target_bytes}")
    plans: list[list[tuple[PackItem, int, int]]] = [[]]
    used = 0
    limit = min(first_bytes, target_bytes) if first_bytes and first_bytes > 0 else target_bytes
    for item in items:
        if item.size < 0:
            raise PackError(f"{item.sop_instance_uid}: negative size {item.size}")
        if used + item.size > limit and plans[-1]:
            plans.append([])
            used = 0
            limit = target_bytes
        offset = 0
        while item.size - offset > limit:
            plans[-1].append((item, offset, limit))
            plans.append([])
            offset += limit
            limit = target_bytes
        length = item.size - offset
        plans[-1].append((item, offset, length))
        used += length
    if not plans[-1]:
        plans.pop()
    return [BucketPlan(index=i, entries=entries) for i, entries in enumerate(plans)]


# ---------------------------------------------------------------------------------------
# Packing


@dataclass
class _Band:
    """One JPEG-LS candidate: a run of whole rows inside a piece."""

    data: memoryview
    rows: int
    layout: PixelLayout
    blob: bytes | None = None
    base: int = 0
    failed: bool = False  # JPEG-LS was not exact: counted as a fallback
    cpu_s: float = 0.0  # CPU time the pool thread spent on it (for the level chooser)


def _encode_band(band: _Band) -> _Band:
    """JPEG-LS encode, then decode and compare (cheap insurance); on any doubt mark it failed
    so that the bytes go to zstd. Samples are shifted by their minimum so that signed data
    and data with a small range use the fewest bits; the shift is stored."""
    layout = band.layout
    started = time.thread_time()
    try:
        arr = np.frombuffer(band.data, dtype=layout.dtype)
        low = int(arr.min())
        high = int(arr.max())
        span = high - low
        # Wrapping unsigned arithmetic: (v - low) mod 2^n is v - low exactly, since every
        # v - low lies in [0, span]; one pass, no widening copy.
        unsigned = arr.view(layout.dtype.replace("i", "u"))
        shifted = (unsigned - unsigned.dtype.type(low % (1 << (8 * arr.itemsize)))).astype(
            "<u2" if span > 255 else "u1")
        bits = max(2, span.bit_length())
        ilv = 2 if layout.comps == 3 else 0
        blob = jls.encode(
            shifted.tobytes(), band.rows, layout.columns, layout.comps, bits, ilv
        )
        decoded = band_bytes(
            blob, band.rows, layout.columns, layout.comps, ilv, layout.dtype, low
        )
        if decoded != band.data:
            band.failed = True
        elif len(blob) < len(band.data) * WORTHWHILE:
            band.blob = bytes(blob)
            band.base = low
    except Exception:
        band.failed = True
    band.cpu_s = time.thread_time() - started
    return band


@dataclass
class _Stack:
    """Small bands of one geometry gathered into one JPEG-LS image."""

    layout: PixelLayout
    parts: list[memoryview]
    rows: int = 0
    size: int = 0
    future: Future[_Band] | None = None

    def submit(self) -> None:
        joined = memoryview(b"".join(self.parts))
        self.future = _pool().submit(_encode_band, _Band(joined, self.rows, self.layout))
        self.parts = []


@dataclass
class _Member:
    """One band of one entry, in payload order: encoded alone or as rows of a stack."""

    number: int  # entry index
    seg: list[Any]  # the entry's segment to fill
    data: memoryview
    rows: int
    future: Future[_Band] | None = None  # encoded alone
    stack: _Stack | None = None  # or stacked, from row ``row_start``
    row_start: int = 0


def _read_range(item: PackItem, offset: int, length: int) -> bytes:
    with open(item.path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(length)
    if len(data) != length:
        raise PackError(
            f"{item.sop_instance_uid}: {item.path} has {offset + len(data)} bytes where "
            f"{offset + length} were expected (file changed or truncated)"
        )
    return data


def _check_whole_file(item: PackItem, data: bytes) -> None:
    """A whole file in one piece is checked against its recorded SHA-256 before it leaves:
    a disk error found here is found before the hub spends a commit on it."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != item.sha256.lower():
        raise PackError(
            f"{item.sop_instance_uid}: {item.path} has SHA-256 {digest}, the index says "
            f"{item.sha256}"
        )


def damaged(items: list[PackItem]) -> list[PackItem]:
    """The items whose file no longer has the size and SHA-256 recorded for it (or is gone),
    read a megabyte at a time. For an instance the hub rebuilt with other bytes: the
    difference began here (the copy at rest is damaged) or on the way (packing, memory)."""
    out = []
    for item in items:
        digest, size = hashlib.sha256(), 0
        try:
            with open(item.path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError:
            out.append(item)
            continue
        if size != item.size or digest.hexdigest() != item.sha256.lower():
            out.append(item)
    return out


def _split_piece(
    data: bytes, offset: int, layout: PixelLayout | None
) -> list[tuple[int, int, bool]]:
    """(start, end, is_band) ranges of ``data`` covering it in order."""
    if layout is None:
        return [(0, len(data), False)]
    rel_start = layout.start - offset  # pixel value start relative to the piece
    first_row = max(0, -(-(0 - rel_start) // layout.row_bytes)) if rel_start < 0 else 0
    band_start = rel_start + first_row * layout.row_bytes
    pixel_end = rel_start + layout.length
    usable_end = min(len(data), pixel_end)
    if band_start < 0 or band_start >= usable_end:
        return [(0, len(data), False)]
    whole_rows = (usable_end - band_start) // layout.row_bytes
    band_end = band_start + whole_rows * layout.row_bytes
    if band_end - band_start < MIN_BAND_BYTES:
        return [(0, len(data), False)]
    ranges: list[tuple[int, int, bool]] = []
    if band_start > 0:
        ranges.append((0, band_start, False))
    rows_per_band = max(1, MAX_BAND_BYTES // layout.row_bytes)
    position = band_start
    while position < band_end:
        stop = min(band_end, position + rows_per_band * layout.row_bytes)
        ranges.append((position, stop, True))
        position = stop
    if band_end < len(data):
        ranges.append((band_end, len(data), False))
    return ranges


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """One pool for the process, shared by every bucket packed at once: as many workers as
    cores (the appliance class has two), since CharLS runs with the GIL released."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                       thread_name_prefix="pas-jls")
        return _POOL


def pack_bucket(plan: BucketPlan, level: str = "default") -> tuple[bytes, dict[str, int]]:
    """The plaintext payload of one bucket and its stats. Reads only this bucket's byte ranges
    from disk, so memory stays about two buckets whatever the size of the study.

    Pipelined for two cores: while the calling thread reads, hashes, parses and feeds the
    non-pixel bytes to zstd, the pool encodes (and verifies) the pixel bands already found.
    Bands that fail verification go to the end of the zstd stream (segment kind 2), so
    nothing waits on the pool before the last file is read."""
    wall_started = time.monotonic()
    levels.begin_bucket()
    if level == "auto":
        level = levels.choose_level()
    if level not in LEVELS:
        raise PackError(
            f"unknown packing level {level!r}; expected one of {sorted(LEVELS)} or 'auto'")
    zstd_level, use_jls = LEVELS[level]
    started = time.thread_time()
    stats = {"original": 0, "packed": 0, "jpegls": 0, "zstd": 0, "jpegls_fallback": 0,
             "instances": 0, f"level_{level}": 1}
    # Single-threaded zstd: the calling thread compresses while the pool encodes bands, and
    # the uplink packs several buckets at once; more threads would only contend.
    compressor = zstandard.ZstdCompressor(level=zstd_level)
    stream = compressor.compressobj()
    frame_parts: list[bytes] = []
    raw_size = 0
    entries: list[dict[str, Any]] = []
    members: list[_Member] = []
    open_stacks: dict[tuple[int, int, str], _Stack] = {}
    for number, (item, offset, length) in enumerate(plan.entries):
        data = _read_range(item, offset, length)
        if offset == 0 and length == item.size:
            _check_whole_file(item, data)
        layout = None
        if use_jls and length >= MIN_BAND_BYTES:
            layout = pixel_layout(item.path, item.size, data if offset == 0 else None)
        segs: list[list[Any]] = []
        view = memoryview(data)  # bands and zstd input without copying the piece again
        for start, end, is_band in _split_piece(data, offset, layout):
            if is_band and layout is not None:
                segs.append([])  # filled once the band is encoded
                member = _Member(number, segs[-1], view[start:end],
                                 (end - start) // layout.row_bytes)
                if end - start >= STACK_BELOW:
                    member.future = _pool().submit(
                        _encode_band, _Band(member.data, member.rows, layout))
                else:
                    key = (layout.columns, layout.comps, layout.dtype)
                    stack = open_stacks.setdefault(key, _Stack(layout, []))
                    member.stack, member.row_start = stack, stack.rows
                    stack.parts.append(member.data)
                    stack.rows += member.rows
                    stack.size += end - start
                    if stack.size >= STACK_TARGET:
                        stack.submit()
                        del open_stacks[key]
                members.append(member)
                continue
            if segs and segs[-1] and segs[-1][0] == 0:
                segs[-1][1] += end - start
            else:
                segs.append([0, end - start])
            frame_parts.append(stream.compress(view[start:end]))
            raw_size += end - start
            stats["zstd"] += end - start
        del data, view
        entries.append({"uid": item.sop_instance_uid, "offset": offset, "length": length,
                        "total": item.size, "segs": segs})
        stats["original"] += length
        stats["instances"] += 1
    for stack in open_stacks.values():
        stack.submit()
    blobs: list[bytes] = []
    stack_blobs: dict[int, int] = {}  # id(stack) -> blob index
    fallback_entries: set[int] = set()
    pool_cpu_s = 0.0
    for member in members:
        future = member.future if member.stack is None else member.stack.future
        assert future is not None
        band = future.result()
        layout = band.layout
        shape = [layout.columns, layout.comps, 2 if layout.comps == 3 else 0, layout.dtype]
        if member.stack is None:
            pool_cpu_s += band.cpu_s
            if band.blob is not None:
                blobs.append(band.blob)
                member.seg.extend([1, len(blobs), member.rows, *shape, band.base])
                stats["jpegls"] += len(member.data)
                continue
        else:
            if id(member.stack) not in stack_blobs:  # first member: the stack's blob
                pool_cpu_s += band.cpu_s
                if band.blob is not None:
                    blobs.append(band.blob)
                stack_blobs[id(member.stack)] = len(blobs)
            if band.blob is not None:
                member.seg.extend([3, stack_blobs[id(member.stack)], member.row_start,
                                   member.rows, *shape, band.base])
                stats["jpegls"] += len(member.data)
                continue
        if band.failed:
            fallback_entries.add(member.number)
        member.seg.extend([2, len(member.data)])
        frame_parts.append(stream.compress(member.data))
        raw_size += len(member.data)
        stats["zstd"] += len(member.data)
    stats["jpegls_fallback"] = len(fallback_entries)
    frame_parts.append(stream.flush())
    frame = b"".join(frame_parts) if raw_size else b""
    header = {"v": 1, "raw": raw_size, "blobs": [len(frame)] + [len(b) for b in blobs],
              "entries": entries}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    payload = b"".join([MAGIC, HEADER_LEN.pack(len(header_bytes)), header_bytes, frame, *blobs])
    stats["packed"] = len(payload)
    cpu_s = time.thread_time() - started + pool_cpu_s
    stats["cpu_us"] = int(cpu_s * 1e6)
    levels.record(level, stats["original"], stats["packed"], cpu_s)
    levels.end_bucket(level, stats["original"], stats["packed"], time.monotonic() - wall_started)
    return payload, stats
