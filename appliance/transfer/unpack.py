"""Unpacking a bucket's plaintext: the hub's side of pack.py's format, exact to the byte.

Owns: reading the payload format (described in ``pack.py``) back into original byte ranges,
and checking every field of it first: a payload that is not what ``pack_bucket`` makes gets a
``BucketFormatError`` naming the problem, never another exception, an unbounded allocation or
a hang. May not touch: the network, the database, sealing, files. ``pack.py`` re-exports
``unpack_bucket``, ``Piece`` and ``BucketFormatError`` (the fixed API).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from appliance.transfer import jls

MAGIC = b"PASPK\x01"
HEADER_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 16 * 1024 * 1024
# A bucket never unpacks to more than this (buckets are at most 64 MB by config): guards
# the hub against decompression bombs.
MAX_RAW_BYTES = 256 * 1024 * 1024
_DTYPES = ("u1", "<u2", ">u2", "<i2", ">i2")


class BucketFormatError(ValueError):
    """A bucket payload is malformed; the message names what is wrong."""


@dataclass(frozen=True)
class Piece:
    """What unpacking yields: original bytes ``[offset, offset + len(data))`` of one instance."""

    sop_instance_uid: str
    offset: int
    total_size: int
    data: bytes


def _decode_band(blob: bytes, rows: int, columns: int, comps: int,
                 ilv: int) -> tuple[bytes, int]:
    """(samples, bytes per sample) of a JPEG-LS band, its declared geometry checked against
    the bucket header before CharLS allocates or decodes anything."""
    info = jls.read_info(blob)
    if (info.width, info.height, info.components) != (columns, rows, comps):
        raise BucketFormatError(
            f"JPEG-LS band is {info.width}x{info.height}x{info.components}, the header says "
            f"{columns}x{rows}x{comps}")
    if info.interleave != ilv:
        raise BucketFormatError("JPEG-LS band interleave mode differs from the header")
    size = 1 if info.bits <= 8 else 2
    samples, _ = jls.decode(blob)
    if len(samples) != rows * columns * comps * size:
        raise BucketFormatError("JPEG-LS band decodes to an unexpected number of bytes")
    return samples, size


def _stored_bytes(samples: bytes | memoryview, size: int, dtype: str, base: int) -> bytes:
    """The inverse of the packing shift, in the same wrapping arithmetic; the stored byte
    order and signedness are a reinterpretation of the same bits."""
    values = np.frombuffer(samples, dtype="u1" if size == 1 else "<u2")
    unsigned = np.dtype(dtype.replace("i", "u"))
    native = unsigned.newbyteorder("=")
    out = values.astype(native) + native.type(base % (1 << (8 * native.itemsize)))
    return out.astype(unsigned, copy=False).tobytes()


def band_bytes(
    blob: bytes, rows: int, columns: int, comps: int, ilv: int, dtype: str, base: int
) -> bytes:
    """Decode one whole band back to the original stored bytes."""
    samples, size = _decode_band(blob, rows, columns, comps, ilv)
    return _stored_bytes(samples, size, dtype, base)


def _int(value: Any, what: str, low: int = 0, high: int = MAX_RAW_BYTES) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BucketFormatError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _parse_header(payload: bytes) -> tuple[dict[str, Any], int]:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise BucketFormatError("bucket payload must be bytes")
    if len(payload) < len(MAGIC) + HEADER_LEN.size:
        raise BucketFormatError(f"bucket payload is truncated ({len(payload)} bytes)")
    if bytes(payload[: len(MAGIC)]) != MAGIC:
        raise BucketFormatError("bucket payload does not start with the PASPK v1 marker")
    (header_len,) = HEADER_LEN.unpack_from(payload, len(MAGIC))
    body_start = len(MAGIC) + HEADER_LEN.size + header_len
    if header_len > MAX_HEADER_BYTES or body_start > len(payload):
        raise BucketFormatError(f"bucket header length {header_len} exceeds the payload")
    try:
        header = json.loads(bytes(payload[len(MAGIC) + HEADER_LEN.size : body_start]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BucketFormatError(f"bucket header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("v") != 1:
        raise BucketFormatError("bucket header is not a version 1 object")
    for key, kind in (("raw", int), ("blobs", list), ("entries", list)):
        if not isinstance(header.get(key), kind):
            raise BucketFormatError(f"bucket header field {key!r} is missing or mistyped")
    return header, body_start


def unpack_bucket(payload: bytes) -> Iterator[Piece]:
    """The pieces of a bucket, in packing order: the exact inverse of ``pack_bucket``.
    The whole header is validated before the first piece is yielded."""
    header, position = _parse_header(payload)
    raw_size = _int(header["raw"], "raw size")
    blob_lengths = [_int(n, "blob length", 0, len(payload)) for n in header["blobs"]]
    if not blob_lengths:
        raise BucketFormatError("bucket header lists no zstd blob")
    if position + sum(blob_lengths) != len(payload):
        raise BucketFormatError(
            f"bucket blobs total {sum(blob_lengths)} bytes but {len(payload) - position} "
            "follow the header (truncated or padded)"
        )
    blobs: list[bytes] = []
    for length in blob_lengths:
        blobs.append(bytes(payload[position : position + length]))
        position += length
    entries, stack_heights = _validate_entries(header["entries"], raw_size, len(blobs))
    if raw_size:
        try:
            declared = zstandard.frame_content_size(blobs[0])
        except zstandard.ZstdError as exc:
            raise BucketFormatError(f"zstd stream is corrupt: {exc}") from None
        if declared not in (-1, raw_size):  # -1: not declared (streamed)
            raise BucketFormatError(f"zstd frame declares {declared} bytes, header says {raw_size}")
        try:
            solid = zstandard.ZstdDecompressor().decompress(blobs[0], max_output_size=raw_size)
        except zstandard.ZstdError as exc:
            raise BucketFormatError(f"zstd stream is corrupt: {exc}") from None
        if len(solid) != raw_size:
            raise BucketFormatError(
                f"zstd stream gives {len(solid)} bytes, header says {raw_size}"
            )
    else:
        if blob_lengths[0]:
            raise BucketFormatError("zstd blob present but raw size is 0")
        solid = b""
    stacks: dict[int, tuple[bytes, int]] = {}  # blob -> decoded samples, bytes per sample
    cursor = 0  # kind 0: bytes in piece order
    tail = sum(seg[1] for e in entries for seg in e["segs"] if seg[0] == 0)  # kind 2 after
    for entry in entries:
        parts: list[bytes] = []
        for seg in entry["segs"]:
            if seg[0] == 0:
                parts.append(solid[cursor : cursor + seg[1]])
                cursor += seg[1]
            elif seg[0] == 2:
                parts.append(solid[tail : tail + seg[1]])
                tail += seg[1]
            else:
                try:
                    parts.append(_segment_bytes(seg, blobs, stacks, stack_heights))
                except BucketFormatError:
                    raise
                except Exception as exc:
                    raise BucketFormatError(
                        f"JPEG-LS band {seg[1]} does not decode: {exc}") from None
        data = b"".join(parts)
        if len(data) != entry["length"]:
            raise BucketFormatError(
                f"{entry['uid']}: rebuilt {len(data)} bytes, header says {entry['length']}"
            )
        yield Piece(entry["uid"], entry["offset"], entry["total"], data)


def _segment_bytes(seg: list[Any], blobs: list[bytes], stacks: dict[int, tuple[bytes, int]],
                   stack_heights: dict[int, int]) -> bytes:
    """The stored bytes of a JPEG-LS segment: a whole band (kind 1), or rows of a stack
    (kind 3; the stack is decoded once per bucket, its height being the rows its segments
    tile, as validated)."""
    if seg[0] == 1:
        _, blob, rows, columns, comps, ilv, dtype, base = seg
        return band_bytes(blobs[blob], rows, columns, comps, ilv, dtype, base)
    _, blob, row_start, rows, columns, comps, ilv, dtype, base = seg
    if blob not in stacks:
        stacks[blob] = _decode_band(blobs[blob], stack_heights[blob], columns, comps, ilv)
    samples, size = stacks[blob]
    row_bytes = columns * comps * size
    return _stored_bytes(memoryview(samples)[row_start * row_bytes : (row_start + rows) *
                                             row_bytes], size, dtype, base)


def _validate_entries(entries: list[Any], raw_size: int,
                      blob_count: int) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Check every entry and segment so that unpacking cannot index out of range, allocate
    without bound, or loop on attacker-chosen numbers. Returns the entries and each stack's
    height (its segments must tile its rows exactly, with one geometry)."""
    solid_used = 0
    produced = 0
    used_blobs: set[int] = set()  # kind 1: one segment each
    stack_blobs: set[int] = set()  # kind 3: shared by the rows of a stack
    stack_rows: dict[int, list[tuple[int, int]]] = {}  # blob -> (first row, rows)
    stack_shape: dict[int, list[Any]] = {}
    for number, entry in enumerate(entries):
        where = f"entry {number}"
        if not isinstance(entry, dict):
            raise BucketFormatError(f"{where} is not an object")
        uid = entry.get("uid")
        if not isinstance(uid, str) or not uid:
            raise BucketFormatError(f"{where} has no SOP Instance UID")
        total = _int(entry.get("total"), f"{where} total size", 0, 1 << 50)
        offset = _int(entry.get("offset"), f"{where} offset", 0, total)
        length = _int(entry.get("length"), f"{where} length", 0, total - offset)
        segs = entry.get("segs")
        if not isinstance(segs, list):
            raise BucketFormatError(f"{where} has no segment list")
        covered = 0
        for seg in segs:
            if not isinstance(seg, list) or not seg or seg[0] not in (0, 1, 2, 3):
                raise BucketFormatError(f"{where} has a malformed segment {seg!r}")
            if seg[0] in (0, 2):
                if len(seg) != 2:
                    raise BucketFormatError(f"{where} has a malformed zstd segment")
                covered += _int(seg[1], f"{where} zstd segment length")
                solid_used += seg[1]
                continue
            stacked = seg[0] == 3
            if len(seg) != (9 if stacked else 8):
                raise BucketFormatError(f"{where} has a malformed JPEG-LS segment")
            blob = _int(seg[1], f"{where} blob index", 1, blob_count - 1)
            if blob in used_blobs or (not stacked and blob in stack_blobs):
                raise BucketFormatError(f"{where} reuses JPEG-LS blob {blob}")
            (stack_blobs if stacked else used_blobs).add(blob)
            shape = seg[3:] if stacked else seg[2:]
            rows = _int(shape[0], f"{where} rows", 1, 1 << 20)
            if stacked:
                stack_rows.setdefault(blob, []).append(
                    (_int(seg[2], f"{where} first row", 0, 1 << 24), rows))
                if stack_shape.setdefault(blob, shape[1:]) != shape[1:]:
                    raise BucketFormatError(f"{where}: rows of JPEG-LS stack {blob} disagree "
                                            "on its geometry")
            columns = _int(shape[1], f"{where} columns", 1, 1 << 20)
            comps = _int(shape[2], f"{where} components", 1, 3)
            _int(shape[3], f"{where} interleave", 0, 2)
            if shape[4] not in _DTYPES:
                raise BucketFormatError(f"{where} has an unknown sample type {shape[4]!r}")
            _int(shape[5], f"{where} base", -(1 << 16), 1 << 16)
            covered += rows * columns * comps * np.dtype(shape[4]).itemsize
            if covered > length:
                break
        if covered != length:
            raise BucketFormatError(f"{where}: segments cover {covered} bytes, length is {length}")
        produced += length
        if produced > MAX_RAW_BYTES:
            raise BucketFormatError("bucket unpacks to more than the allowed size")
    if solid_used != raw_size:
        raise BucketFormatError(f"segments use {solid_used} zstd bytes, header says {raw_size}")
    if len(used_blobs | stack_blobs) != blob_count - 1:
        raise BucketFormatError("bucket carries JPEG-LS blobs no entry uses")
    heights: dict[int, int] = {}
    for blob, spans in stack_rows.items():
        next_row = 0
        for first, rows in sorted(spans):
            if first != next_row:
                raise BucketFormatError(
                    f"JPEG-LS stack {blob}: segments do not tile its rows (row {first} where "
                    f"{next_row} was expected)")
            next_row += rows
        heights[blob] = next_row
    return entries, heights
