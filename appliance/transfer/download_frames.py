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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.transfer.region import RegionError

DOWNLOADS_PATH = "/api/v1/downloads"
SEARCH_PATH = "/api/v1/downloads/search"
PRIORS_PATH = "/api/v1/downloads/priors"
# What a search of a patient's studies asks the archive for (as RegionClient.search_studies).
# Bytes of one patient's archive answer the hub reads at most (hub/priors.py): a study row
# of Orthanc with STUDY_FIELDS is about 1 kB, so the hub's limit of 500 studies fits twice;
# past it (an archive that ignores ``limit``) that patient's result is an error naming the
# cap. The site bounds the hub's combined answer with it (transfer/download.py).
MAX_SEARCH_BYTES = 1 << 20
STUDY_FIELDS = ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
                "NumberOfStudyRelatedInstances", "StudyDescription")
MEDIA_TYPE = "application/vnd.pas.download-stream"
FRAME_MAGIC = b"PASDL\x01"
FRAME_LEN = struct.Struct(">I")
MAX_FRAME_HEADER = 16 * 1024 * 1024
MAX_FRAME_PAYLOAD = 256 * 1024 * 1024
# A UID as the download protocol takes it (study, series, instance; the hub refuses others).
UID = re.compile(r"[0-9]+(\.[0-9]+)*\Z")  # \Z: "$" took a final newline too


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
    file: Any = None  # a large instance's: see Assembler.large


@dataclass
class RebuiltFile:
    """A large instance rebuilt in a file (:attr:`Assembler.large`) and checked: the file, and
    a SHA-256 object fed with its bytes (the caller files it without reading it again)."""

    file: Any
    digest: Any


@dataclass
class Assembler:
    """Pieces in, whole verified instances out. A piece's instance must have been announced
    (size, SHA-256) by its frame; a rebuilt file that differs is an error naming it."""

    expected: dict[str, tuple[int, str]] = field(default_factory=dict)
    partial: dict[str, _Partial] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # An instance of more than ``large_above`` bytes that comes in several pieces is rebuilt
    # in the file ``large()`` gives (``write_at(offset, data)``, ``chunks()``, ``size``,
    # ``error``, ``discard()``; the caller's temp file) instead of in memory: a 300 MB one
    # took twice its size (the buffer, then its copy). None: every instance in memory.
    large: Callable[[], Any] | None = None
    large_above: int = 32 << 20

    def announce(self, instances: list[Any]) -> None:
        with self.lock:
            for item in instances:
                try:
                    uid, size, digest = str(item["uid"]), int(item["size"]), str(item["sha256"])
                except (KeyError, TypeError, ValueError):
                    raise DownloadError(f"a frame lists a malformed instance {item!r}") from None
                self.expected[uid] = (size, digest)

    def add(self, uid: str, offset: int, total: int,
            data: bytes) -> bytes | RebuiltFile | None:
        with self.lock:
            if uid not in self.expected:
                raise DownloadError(f"{uid}: a piece of an instance no frame announced")
            size, digest = self.expected[uid]
            if total != size:
                raise DownloadError(f"{uid}: pieces say {total} bytes, the frame says {size}")
            if offset == 0 and len(data) == size:
                whole: bytes | None = data
            else:
                part = self.partial.get(uid)
                if part is None:
                    spill = self.large() if self.large is not None and \
                        size > self.large_above else None
                    part = self.partial[uid] = _Partial(
                        size, digest, bytearray(size if spill is None else 0), file=spill)
                if part.file is not None:
                    part.file.write_at(offset, data)
                else:
                    part.data[offset:offset + len(data)] = data
                part.got += len(data)
                if part.got < size:
                    return None
                del self.partial[uid]
                whole = bytes(part.data) if part.file is None else None
                rebuilt = part.file
        if whole is None:  # checked outside the lock: reading it back takes a while
            return self._check_file(uid, rebuilt, size, digest)
        actual = hashlib.sha256(whole).hexdigest()
        if len(whole) != size or actual != digest:
            raise DownloadError(f"{uid}: rebuilt {len(whole)} bytes with SHA-256 {actual}, the "
                                f"region's file has {size} bytes and SHA-256 {digest}")
        return whole

    @staticmethod
    def _check_file(uid: str, file: Any, size: int, digest: str) -> RebuiltFile:
        """A large instance's file, read back a megabyte at a time against its SHA-256."""
        try:
            if file.error is not None:
                raise DownloadError(f"{uid}: cannot write the rebuilt file: {file.error}")
            actual = hashlib.sha256()
            for chunk in file.chunks():
                actual.update(chunk)
            if file.size != size or actual.hexdigest() != digest:
                raise DownloadError(f"{uid}: rebuilt {file.size} bytes with SHA-256 "
                                    f"{actual.hexdigest()}, the region's file has {size} "
                                    f"bytes and SHA-256 {digest}")
        except BaseException:
            file.discard()
            raise
        return RebuiltFile(file, actual)

    def discard(self) -> None:
        """The stream ended: files of instances it left incomplete go."""
        with self.lock:
            for part in self.partial.values():
                if part.file is not None:
                    part.file.discard()
                    part.file = None
