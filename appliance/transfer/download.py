"""The bucketed download: a study of the region, packed as the upload packs, streamed by the hub.

Owns: the download stream's wire format (frames, shared with ``appliance.hub.download``) and
the appliance's client: ``POST {hub}/api/v1/downloads`` over the enrolment's mutual TLS, frames
read as they arrive, each bucket unpacked (``appliance.transfer.unpack``), instances rebuilt
and checked against the size and SHA-256 the hub computed from the region's file, then handed
to the caller, who files them (the prefetch, through the ingest Receiver). May not touch: the
database or the spool.

Why a stream of frames and not a manifest first: the hub learns each instance's size and
SHA-256 only once it has read the file from the archive, so a manifest up front would make the
whole study wait on the hub's disk before the first byte crosses the WAN. Each frame carries
one bucket and the metadata of the instances it holds; the last frame says how many instances
and buckets the stream carried, so a stream cut short is always noticed.

Resuming: the request names the instances the appliance already holds (``have``); the hub
packs only the others. A cut costs at most the buckets in flight (and the earlier buckets of an
instance split across buckets that was not complete yet).

Memory (invariant 8): one frame being read, at most ``workers`` buckets being unpacked, and the
instances they complete (the Receiver takes a whole file, as for WADO-RS).

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
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from appliance.transfer.enrolment import load_enrolment
from appliance.transfer.region import RegionError
from appliance.transfer.unpack import BucketFormatError, unpack_bucket

DOWNLOADS_PATH = "/api/v1/downloads"
MEDIA_TYPE = "application/vnd.pas.download-stream"
FRAME_MAGIC = b"PASDL\x01"
FRAME_LEN = struct.Struct(">I")
MAX_FRAME_HEADER = 16 * 1024 * 1024
MAX_FRAME_PAYLOAD = 256 * 1024 * 1024


class DownloadUnavailable(Exception):
    """The hub does not offer bucketed downloads (an older hub): use WADO-RS instead."""


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


@dataclass
class DownloadResult:
    instances: int = 0
    buckets: int = 0
    wire_bytes: int = 0
    filed: set[str] = field(default_factory=set)


class HubDownloads:
    """The client side of ``POST /api/v1/downloads``. Thread-safe (one httpx.Client)."""

    def __init__(self, hub_url: str, verify: Any, timeout_s: float = 60.0,
                 on_downloaded: Callable[[int], None] | None = None, workers: int = 4,
                 client: httpx.Client | None = None):
        self.url = hub_url.rstrip("/") + DOWNLOADS_PATH
        self.on_downloaded = on_downloaded
        self.workers = workers
        self.owns_client = client is None
        self.client = client or httpx.Client(verify=verify, timeout=timeout_s)

    @classmethod
    def from_home(cls, home: Path, timeout_s: float = 60.0,
                  on_downloaded: Callable[[int], None] | None = None,
                  client: httpx.Client | None = None) -> HubDownloads | None:
        """The enrolled hub's download route, or None when not enrolled. ``client``: an
        existing client for the same hub and certificate (its connections are reused)."""
        enrolment = load_enrolment(home)
        if enrolment is None:
            return None
        return cls(enrolment.url, None if client else enrolment.ssl_context(), timeout_s,
                   on_downloaded, client=client)

    def close(self) -> None:
        if self.owns_client:
            self.client.close()

    def fetch(self, study_uid: str, on_instance: Callable[[str, bytes], Any], *,
              series_uid: str | None = None, have: set[str] | None = None,
              bucket_bytes: int | None = None,
              before_bucket: Callable[[], None] = lambda: None,
              on_bucket: Callable[[list[Any]], None] = lambda done: None) -> DownloadResult:
        """Download the study (or series) but ``have``; ``on_instance(uid, file)`` is called
        once per verified instance, from worker threads, then ``on_bucket`` with what those
        calls returned for the instances a bucket completed (one commit per bucket for the
        caller's bookkeeping). Raises DownloadUnavailable (fall back to WADO-RS) or
        DownloadError; instances handed over before an error stay."""
        body: dict[str, Any] = {"study_uid": study_uid, "have": sorted(have or ())}
        if series_uid:
            body["series_uid"] = series_uid
        if bucket_bytes:
            body["bucket_bytes"] = bucket_bytes
        result = DownloadResult()
        reader = FrameReader()
        assembler = Assembler()
        pending: list[Future[int]] = []
        slots = threading.Semaphore(self.workers)
        ended: dict[str, Any] | None = None
        # Unpacking and filing run beside the reading, so the link keeps flowing while a
        # bucket's JPEG-LS decodes and its files are fsynced; ``slots`` bounds the buckets held.
        with ThreadPoolExecutor(self.workers, thread_name_prefix="pas-download") as pool:
            try:
                with self.client.stream("POST", self.url, json=body) as answer:
                    if answer.status_code != 200:
                        answer.read()
                        self._refused(answer, study_uid)
                    for chunk in answer.iter_bytes(256 * 1024):
                        result.wire_bytes = answer.num_bytes_downloaded  # also if cut later
                        for header, payload in reader.feed(chunk):
                            if "error" in header:
                                raise DownloadError(f"the hub: {header['error']}: "
                                                    f"{header.get('detail', '')}")
                            if header.get("end"):
                                ended = header
                                continue
                            assembler.announce(header.get("instances") or [])
                            before_bucket()
                            slots.acquire()
                            pending.append(pool.submit(self._unpack, payload, assembler,
                                                       on_instance, on_bucket, result, slots))
                            result.buckets += 1
            except httpx.HTTPError as exc:
                raise DownloadError(f"download of {study_uid} cut after {result.buckets} "
                                    f"buckets: {type(exc).__name__}: {exc}") from exc
            finally:
                if self.on_downloaded is not None and result.wire_bytes:
                    self.on_downloaded(result.wire_bytes)
                errors = [f.exception() for f in pending if f.exception() is not None]
            if errors:
                raise DownloadError(str(errors[0])) from errors[0]
        if ended is None:
            raise DownloadError(f"download of {study_uid} cut after {result.buckets} buckets "
                                "(no end frame)")
        if ended.get("buckets") != result.buckets or ended.get("instances") != result.instances:
            raise DownloadError(
                f"download of {study_uid}: the hub sent {ended.get('instances')} instances in "
                f"{ended.get('buckets')} buckets, {result.instances} in {result.buckets} arrived")
        return result

    @staticmethod
    def _unpack(payload: bytes, assembler: Assembler, on_instance: Callable[[str, bytes], Any],
                on_bucket: Callable[[list[Any]], None], result: DownloadResult,
                slots: threading.Semaphore) -> int:
        done: list[Any] = []
        try:
            for piece in _pieces(payload):
                whole = assembler.add(piece.sop_instance_uid, piece.offset, piece.total_size,
                                      piece.data)
                if whole is not None:
                    done.append(on_instance(piece.sop_instance_uid, whole))
                    with assembler.lock:
                        result.instances += 1
                        result.filed.add(piece.sop_instance_uid)
            return len(done)
        finally:
            try:
                on_bucket(done)  # also after a failure: what was filed is accounted for
            finally:
                slots.release()

    @staticmethod
    def _refused(answer: httpx.Response, study_uid: str) -> None:
        try:
            problem = answer.json()
        except ValueError:
            problem = None
        if not isinstance(problem, dict) or "error" not in problem:
            if answer.status_code in (404, 405):  # no such route: a hub without downloads
                raise DownloadUnavailable(f"the hub answers {answer.status_code} to "
                                          f"{DOWNLOADS_PATH}")
            raise DownloadError(f"download of {study_uid}: HTTP {answer.status_code} "
                                f"{answer.text[:200]}")
        raise DownloadError(f"download of {study_uid}: HTTP {answer.status_code} "
                            f"{problem['error']}: {problem.get('detail', '')}")


def _pieces(payload: bytes) -> Iterator[Any]:
    try:
        yield from unpack_bucket(payload)
    except BucketFormatError as exc:
        raise DownloadError(f"a bucket does not unpack: {exc}") from None
