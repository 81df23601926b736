"""The bucketed download's wire format, shared by the hub (``appliance.hub.download``,
``download_stages``, ``priors``: they write frames) and the appliance's client
(``appliance.transfer.download``: it reads them).

Owns: the routes' paths and the stream's media type, what a UID of the protocol looks like,
a frame's encoding (:func:`encode_frame`) and its incremental parser (:class:`FrameReader`,
with the limits on a frame's header and payload), and the check of what the frames announce
(:class:`Assembler`: pieces of instances in, whole instances out, each checked against the size
and SHA-256 its frame gave). May not touch: HTTP (requests, answers, lanes), threads beyond the
Assembler's own lock, unpacking buckets, the database or the spool.

Frame (integers big endian): ``b"PASDL" 0x01 | u32 header length | header (UTF-8 JSON) |
payload``. Header: ``{"index": n, "payload": <bytes>, "instances": [{"uid", "size",
"sha256"}]}`` (a bucket; the payload is a pack.py bucket, not sealed: TLS 1.3 with client
certificates protects it on the wire and the SHA-256 check end to end), ``{"end": true,
"instances": N, "buckets": K}``, or ``{"error": code, "detail": text}`` (the archive failed
after the answer had started).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from appliance.transfer.region import RegionError

DOWNLOADS_PATH = "/api/v1/downloads"
SEARCH_PATH = "/api/v1/downloads/search"
PRIORS_PATH = "/api/v1/downloads/priors"
# What a search of a patient's studies asks the archive for (as RegionClient.search_studies).
STUDY_FIELDS = ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
                "NumberOfStudyRelatedInstances", "StudyDescription")
MEDIA_TYPE = "application/vnd.pas.download-stream"
FRAME_MAGIC = b"PASDL\x01"
FRAME_LEN = struct.Struct(">I")
MAX_FRAME_HEADER = 16 * 1024 * 1024
MAX_FRAME_PAYLOAD = 256 * 1024 * 1024
# A UID as the download protocol takes it (study, series, instance; the hub refuses others).
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class DownloadError(RegionError):
    """The download failed or was cut; what was verified and handed over stays valid."""


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([FRAME_MAGIC, FRAME_LEN.pack(len(head)), head, payload])


class FrameReader:
    """Incremental frame parser: feed chunks, get whole (header, payload) frames."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.need: tuple[dict[str, Any], int, int] | None = None  # header, start, payload

    def feed(self, chunk: bytes) -> list[tuple[dict[str, Any], bytes]]:
        self.buffer += chunk
        frames: list[tuple[dict[str, Any], bytes]] = []
        while True:
            if self.need is None:
                prefix = len(FRAME_MAGIC) + FRAME_LEN.size
                if len(self.buffer) < prefix:
                    return frames
                if bytes(self.buffer[:len(FRAME_MAGIC)]) != FRAME_MAGIC:
                    raise DownloadError("the download stream is not PASDL v1 frames")
                (length,) = FRAME_LEN.unpack_from(self.buffer, len(FRAME_MAGIC))
                if length > MAX_FRAME_HEADER:
                    raise DownloadError(f"a frame header of {length} bytes is over the limit")
                if len(self.buffer) < prefix + length:
                    return frames
                try:
                    header = json.loads(bytes(self.buffer[prefix:prefix + length]))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise DownloadError(f"a frame header is not JSON: {exc}") from None
                if not isinstance(header, dict):
                    raise DownloadError("a frame header is not a JSON object")
                payload = header.get("payload", 0)
                if not isinstance(payload, int) or not 0 <= payload <= MAX_FRAME_PAYLOAD:
                    raise DownloadError(f"a frame declares a payload of {payload!r} bytes")
                self.need = (header, prefix + length, payload)
            header, start, payload = self.need
            if len(self.buffer) < start + payload:
                return frames
            frames.append((header, bytes(self.buffer[start:start + payload])))
            del self.buffer[:start + payload]
            self.need = None


@dataclass
class _Partial:
    size: int
    sha256: str
    data: bytearray
    got: int = 0


@dataclass
class Assembler:
    """Pieces in, whole verified instances out. A piece's instance must have been announced
    (size, SHA-256) by its frame; a rebuilt file that differs is an error naming it."""

    expected: dict[str, tuple[int, str]] = field(default_factory=dict)
    partial: dict[str, _Partial] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def announce(self, instances: list[Any]) -> None:
        with self.lock:
            for item in instances:
                try:
                    uid, size, digest = str(item["uid"]), int(item["size"]), str(item["sha256"])
                except (KeyError, TypeError, ValueError):
                    raise DownloadError(f"a frame lists a malformed instance {item!r}") from None
                self.expected[uid] = (size, digest)

    def add(self, uid: str, offset: int, total: int, data: bytes) -> bytes | None:
        with self.lock:
            if uid not in self.expected:
                raise DownloadError(f"{uid}: a piece of an instance no frame announced")
            size, digest = self.expected[uid]
            if total != size:
                raise DownloadError(f"{uid}: pieces say {total} bytes, the frame says {size}")
            if offset == 0 and len(data) == size:
                whole: bytes | None = data
            else:
                part = self.partial.setdefault(uid, _Partial(size, digest, bytearray(size)))
                part.data[offset:offset + len(data)] = data
                part.got += len(data)
                whole = bytes(part.data) if part.got >= size else None
                if whole is not None:
                    del self.partial[uid]
        if whole is None:
            return None
        actual = hashlib.sha256(whole).hexdigest()
        if len(whole) != size or actual != digest:
            raise DownloadError(f"{uid}: rebuilt {len(whole)} bytes with SHA-256 {actual}, the "
                                f"region's file has {size} bytes and SHA-256 {digest}")
        return whole
