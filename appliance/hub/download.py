"""Bucketed downloads: ``POST /api/v1/downloads``, a study (or series) of the region packed as
the upload packs (JPEG-LS + solid zstd, ``appliance.transfer.pack``) and streamed to the site.

Owns: reading the study from the archive (``dicomweb``: one WADO-RS request for the study or
series, ``transfer-syntax=*``, each part streamed to a file in a private folder under
``$PAS_HUB_HOME/downloads``; ``embedded``: the archive's own spool files), cutting the
instances into buckets as they arrive, packing them, and writing the frames of
``appliance.transfer.download`` (which documents the format). May not touch: SQL, the upload
side's transfers, the archive's files (read only).

Three stages run side by side, so that the WAN never waits for the whole study: the archive
read (one thread), the packing (one thread; the band encoding uses pack.py's pool), and the
answer. Queues of two buckets between them bound memory and disk to a few buckets whatever the
size of the study (invariant 8); staged files are deleted once their bucket is packed, the
folder when the answer ends (or at the next start). Not sealed: the stream is inside TLS 1.3
with the site's client certificate, no bucket is stored anywhere, and the appliance checks
each rebuilt file's SHA-256 against the one computed here from the archive's file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from appliance.hub.app import problem
from appliance.transfer.download import DOWNLOADS_PATH, MEDIA_TYPE, encode_frame
from appliance.transfer.pack import BucketPlan, PackItem, pack_bucket

if TYPE_CHECKING:
    from appliance.hub.app import Hub

log = logging.getLogger("pas.hub.download")

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DEFAULT_BUCKET_BYTES = 4 * 1024 * 1024
MIN_BUCKET_BYTES = 64 * 1024
MULTIPART_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
AHEAD = 2  # buckets staged or packed ahead of the answer
MAX_BUCKET_BYTES = 16 * 1024 * 1024
# Packing is CPU and a bucket's bytes in memory (at most MAX_BUCKET_BYTES read + packed): at
# most this many downloads pack at once. Measured on 10 CT priors at once (2 cores): 2 -> 3.6 s,
# 4 -> 3.2 s, 8 -> 3.4 s mean of four runs each (a study's first byte waits for its packing).
_PACKING = threading.Semaphore(4)


class ArchiveFailed(Exception):
    """The archive did not deliver the study; ``status`` is the answer to give."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


@dataclass(frozen=True)
class Staged:
    item: PackItem
    owned: bool  # a staged copy to delete once packed (not an archive's own file)


class _Planner:
    """``pack.plan_buckets`` one file at a time: the same cuts, emitted as soon as known."""

    def __init__(self, target: int):
        self.target = target
        self.index = 0
        self.entries: list[tuple[PackItem, int, int]] = []
        self.used = 0

    def add(self, item: PackItem) -> list[BucketPlan]:
        out: list[BucketPlan] = []
        if self.used + item.size > self.target and self.entries:
            out.append(self._close())
        offset = 0
        while item.size - offset > self.target:
            self.entries.append((item, offset, self.target))
            out.append(self._close())
            offset += self.target
        self.entries.append((item, offset, item.size - offset))
        self.used += item.size - offset
        if self.used >= self.target:
            out.append(self._close())
        return out

    def finish(self) -> list[BucketPlan]:
        return [self._close()] if self.entries else []

    def _close(self) -> BucketPlan:
        plan = BucketPlan(self.index, self.entries)
        self.index += 1
        self.entries, self.used = [], 0
        return plan


class _PartsToFiles:
    """Incremental ``multipart/related`` parser writing each part's body to its own file while
    hashing it: memory holds one chunk, whatever the size of an instance."""

    def __init__(self, boundary: bytes, folder: Path, on_part: Callable[[Path, int, str], None]):
        self.opening = b"--" + boundary
        self.delimiter = b"\r\n--" + boundary
        self.folder = folder
        self.on_part = on_part
        self.buffer = bytearray()
        self.state = "preamble"  # preamble | after | headers | body | closed
        self.handle: Any = None
        self.path: Path | None = None
        self.digest: Any = None
        self.size = 0

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
                    if len(self.buffer) > 64 * 1024:
                        raise ArchiveFailed(502, "archive_bad_answer",
                                            "a multipart part's headers exceed 64 KiB")
                    return
                del self.buffer[: end + 4]
                self.path = self.folder / f"{uuid.uuid4().hex}.dcm"
                self.handle = open(self.path, "wb")
                self.digest, self.size = hashlib.sha256(), 0
                self.state = "body"
            elif self.state == "body":
                at = self.buffer.find(self.delimiter)
                if at < 0:
                    keep = len(self.delimiter) - 1
                    if len(self.buffer) > keep:
                        self._write(bytes(self.buffer[: len(self.buffer) - keep]))
                        del self.buffer[: len(self.buffer) - keep]
                    return
                self._write(bytes(self.buffer[:at]))
                del self.buffer[: at + len(self.delimiter)]
                self.handle.close()
                assert self.path is not None
                self.on_part(self.path, self.size, self.digest.hexdigest())
                self.state = "after"
            else:
                return

    def _write(self, data: bytes) -> None:
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)

    def close(self) -> None:
        if self.handle is not None and not self.handle.closed:
            self.handle.close()


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode()
    raise ArchiveFailed(502, "archive_bad_answer",
                        f"the archive answered {content_type!r}, not multipart with a boundary")


def _uid_of(path: Path) -> str:
    """The instance's label in the stream: the file meta's Media Storage SOP Instance UID (the
    dataset's header parse cost 15 % of the hub's time on 520 small MR files), else the
    dataset's. Only a label: the site checks the bytes by SHA-256, its index reads the
    dataset."""
    try:
        meta = read_file_meta_info(path)
        uid = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    except Exception:  # no or damaged meta: the dataset says
        uid = ""
    if uid:
        return uid
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"], force=True)
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid:
        raise ArchiveFailed(502, "archive_bad_answer", "the archive sent an instance without "
                            "a SOP Instance UID")
    return uid


class Download:
    """One answer: stage -> pack -> frames, each stage a thread or the response's loop."""

    def __init__(self, hub: Hub, site: str, study_uid: str, series_uid: str | None,
                 have: set[str], target: int):
        self.hub = hub
        self.site = site
        self.study_uid = study_uid
        self.series_uid = series_uid
        self.have = have
        self.target = target
        self.folder = downloads_dir(hub) / uuid.uuid4().hex
        self.folder.mkdir(parents=True)
        self.plans: queue.Queue[Any] = queue.Queue(AHEAD)
        self.frames: queue.Queue[Any] = queue.Queue(AHEAD)
        self.cancel = threading.Event()
        self.first = threading.Event()  # the archive answered (or failed)
        self.failure: ArchiveFailed | None = None
        self.instances = 0
        self.skipped = 0
        self.original = 0
        self.packed = 0
        self.started = time.monotonic()
        self.threads = [threading.Thread(target=self._stage, name="pas-dl-stage", daemon=True),
                        threading.Thread(target=self._pack, name="pas-dl-pack", daemon=True)]

    def start(self) -> Download:
        for thread in self.threads:
            thread.start()
        return self

    def _put(self, target: queue.Queue[Any], item: Any) -> bool:
        while not self.cancel.is_set():
            try:
                target.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    # --- stage 1: the archive's files, cut into buckets ---------------------------------------

    def _stage(self) -> None:
        planner = _Planner(self.target)
        try:
            for staged in self._source():
                if self.cancel.is_set():
                    return
                if staged.item.sop_instance_uid in self.have:
                    self.skipped += 1
                    if staged.owned:
                        staged.item.path.unlink(missing_ok=True)
                    continue
                self.instances += 1
                for plan in planner.add(staged.item):
                    if not self._put(self.plans, plan):
                        return
            for plan in planner.finish():
                if not self._put(self.plans, plan):
                    return
            self._put(self.plans, None)
        except ArchiveFailed as exc:
            self.failure = exc
            self._put(self.plans, exc)
        except Exception as exc:  # any other failure ends the answer with an error frame
            log.exception("download of %s for %s: staging failed", self.study_uid, self.site)
            self.failure = ArchiveFailed(502, "archive_failed", f"{type(exc).__name__}: {exc}")
            self._put(self.plans, self.failure)
        finally:
            self.first.set()

    def _source(self) -> Iterator[Staged]:
        spool = getattr(self.hub.archive, "spool", None)
        if self.hub.settings.archive.kind == "embedded" and spool is not None:
            yield from self._embedded(spool)
        else:
            yield from self._dicomweb()

    def _embedded(self, spool: Any) -> Iterator[Staged]:
        from appliance.store import query

        keys = {"StudyInstanceUID": self.study_uid}
        level = "STUDY"
        if self.series_uid:
            keys["SeriesInstanceUID"], level = self.series_uid, "SERIES"
        rows = query.instances_for(self.hub.archive.db, level, keys)  # type: ignore[attr-defined]
        if not rows:
            raise ArchiveFailed(404, "unknown_study", self._what() + " is not in the archive")
        self.first.set()
        for row in rows:
            yield Staged(PackItem(row["sop_instance_uid"], spool.path(row["path"]),
                                  int(row["size"]), row["sha256"]), owned=False)

    def _dicomweb(self) -> Iterator[Staged]:
        archive = self.hub.settings.archive
        path = f"studies/{self.study_uid}"
        if self.series_uid:
            path += f"/series/{self.series_uid}"
        arrived: list[Staged] = []

        def on_part(file: Path, size: int, digest: str) -> None:
            arrived.append(Staged(PackItem(_uid_of(file), file, size, digest), owned=True))

        parser: _PartsToFiles | None = None
        try:
            # identity: the archive is on the hub's LAN; gzip would only cost its CPU.
            with httpx.stream("GET", f"{archive.url}/{path}", timeout=archive.timeout_s,
                              headers={"Accept": MULTIPART_DICOM,
                                       "Accept-Encoding": "identity"}) as answer:
                if answer.status_code == 404:
                    raise ArchiveFailed(404, "unknown_study",
                                        self._what() + " is not in the archive")
                if answer.status_code >= 400:
                    answer.read()
                    raise ArchiveFailed(502, "archive_refused",
                                        f"the archive answered HTTP {answer.status_code}: "
                                        f"{answer.text[:200]}")
                parser = _PartsToFiles(_boundary(answer.headers.get("content-type", "")),
                                       self.folder, on_part)
                for chunk in answer.iter_raw(256 * 1024):
                    if self.cancel.is_set():
                        return
                    parser.feed(chunk)
                    if arrived:
                        self.first.set()
                    while arrived:
                        yield arrived.pop(0)
                if parser.state != "closed":
                    raise ArchiveFailed(502, "archive_cut", "the archive's answer was cut short")
        except httpx.HTTPError as exc:
            raise ArchiveFailed(502, "archive_unreachable",
                                f"the regional archive: {type(exc).__name__}: {exc}") from exc
        finally:
            if parser is not None:
                parser.close()
        if self.instances == 0 and self.skipped == 0:
            raise ArchiveFailed(404, "unknown_study", self._what() + " has no instances")

    def _what(self) -> str:
        return f"study {self.study_uid}" + (f" series {self.series_uid}"
                                            if self.series_uid else "")

    # --- stage 2: packing ---------------------------------------------------------------------

    def _pack(self) -> None:
        buckets = 0
        try:
            while not self.cancel.is_set():
                try:
                    got = self.plans.get(timeout=0.5)
                except queue.Empty:
                    continue
                if got is None:
                    self._put(self.frames, encode_frame(
                        {"end": True, "instances": self.instances, "buckets": buckets}))
                    self._put(self.frames, None)
                    return
                if isinstance(got, ArchiveFailed):
                    self._put(self.frames, got)
                    return
                plan = got
                with _PACKING:
                    payload, _stats = pack_bucket(plan, "default")
                self.original += sum(length for _, _, length in plan.entries)
                self.packed += len(payload)
                seen: dict[str, PackItem] = {}
                for item, offset, length in plan.entries:
                    seen[item.sop_instance_uid] = item
                    if item.path.parent == self.folder and offset + length == item.size:
                        # A staged copy whose last piece is packed: no longer needed.
                        item.path.unlink(missing_ok=True)
                header = {"index": plan.index, "payload": len(payload), "instances": [
                    {"uid": i.sop_instance_uid, "size": i.size, "sha256": i.sha256}
                    for i in seen.values()]}
                if not self._put(self.frames, encode_frame(header, payload)):
                    return
                buckets += 1
        except Exception as exc:
            log.exception("download of %s for %s: packing failed", self.study_uid, self.site)
            self._put(self.frames, ArchiveFailed(500, "pack_failed",
                                                 f"{type(exc).__name__}: {exc}"))

    # --- stage 3: the answer ------------------------------------------------------------------

    def next_frame(self) -> Any:
        """The next frame, None at the end, an ArchiveFailed, or ... after a quiet second (so
        a thread never stays blocked once the client went away)."""
        try:
            return self.frames.get(timeout=1.0)
        except queue.Empty:
            return ...

    async def body(self) -> AsyncIterator[bytes]:
        finished = False
        try:
            while True:
                frame = await run_in_threadpool(self.next_frame)
                if frame is ...:
                    continue
                if frame is None:
                    finished = True
                    return
                if isinstance(frame, ArchiveFailed):
                    log.warning("download of %s for %s failed: %s", self._what(), self.site,
                                frame.detail, extra={"SITE": self.site})
                    yield encode_frame({"error": frame.error, "detail": frame.detail})
                    return
                yield frame
        finally:
            self.close()
            log.info("download of %s for %s %s: %d instances (%d held at the site, skipped), "
                     "%.1f MB -> %.1f MB packed, %.2f s", self._what(), self.site,
                     "sent" if finished else "ended early", self.instances, self.skipped,
                     self.original / 1e6, self.packed / 1e6, time.monotonic() - self.started,
                     extra={"SITE": self.site, "STUDY_UID": self.study_uid})

    def close(self) -> None:
        self.cancel.set()
        threading.Thread(target=self._clean, name="pas-dl-clean", daemon=True).start()

    def _clean(self) -> None:
        for thread in self.threads:
            thread.join(30)
        shutil.rmtree(self.folder, ignore_errors=True)


def downloads_dir(hub: Hub) -> Path:
    return hub.settings.home / "downloads"


def _parse(body: Any, max_bucket: int) -> tuple[str, str | None, set[str], int] | str:
    """(study, series, have, bucket bytes), or what is wrong with the request."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    study = body.get("study_uid")
    if not isinstance(study, str) or not UID.match(study) or len(study) > 64:
        return f"study_uid: not a DICOM UID: {study!r}"[:200]
    series = body.get("series_uid")
    if series is not None and (not isinstance(series, str) or not UID.match(series)
                               or len(series) > 64):
        return f"series_uid: not a DICOM UID: {series!r}"[:200]
    have = body.get("have", [])
    if not isinstance(have, list) or not all(isinstance(u, str) and len(u) <= 64 for u in have):
        return "have: must be a list of SOP Instance UIDs"
    target = body.get("bucket_bytes", DEFAULT_BUCKET_BYTES)
    if not isinstance(target, int) or not MIN_BUCKET_BYTES <= target <= max_bucket:
        return f"bucket_bytes: must be an integer from {MIN_BUCKET_BYTES} to {max_bucket}"
    return study, series, set(have), target


def download_routes(hub: Hub) -> list[BaseRoute]:
    folder = downloads_dir(hub)
    with contextlib.suppress(FileNotFoundError):  # folders of answers a stop interrupted
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    limits = hub.settings.limits

    async def download(request: Request) -> Response:
        """A study (or series) of the region, packed in buckets and streamed (frames)."""
        site = request.state.site
        if int(request.headers.get("content-length") or 0) > limits.max_manifest_bytes:
            return problem(413, "too_large", f"request over {limits.max_manifest_bytes} bytes")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            log.warning("download refused for %s: body is not JSON", site)
            return problem(400, "bad_json", "the body must be JSON {\"study_uid\": ...}")
        parsed = _parse(body, min(limits.max_bucket_bytes, MAX_BUCKET_BYTES))
        if isinstance(parsed, str):
            log.warning("download refused for %s: %s", site, parsed)
            return problem(422, "bad_request", parsed)
        study, series, have, target = parsed
        job = Download(hub, site, study, series, have, target).start()
        # The status line waits for the archive's first answer: an unknown study is a 404,
        # not a 200 followed by an error frame.
        await run_in_threadpool(job.first.wait, hub.settings.archive.timeout_s)
        if job.failure is not None and job.instances == 0:
            job.close()
            log.warning("download refused for %s: %s", site, job.failure.detail)
            return problem(job.failure.status, job.failure.error, job.failure.detail)
        return StreamingResponse(job.body(), media_type=MEDIA_TYPE)

    return [Route(DOWNLOADS_PATH, download, methods=["POST"])]
