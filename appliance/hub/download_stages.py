"""One bucketed download's work: the archive read, the packing and the frames of the answer
(``Download``), for ``appliance.hub.download`` (the routes: requests parsed, the answer sent
over one connection or over lanes) and ``appliance.hub.priors`` (the priors route's feed).

Owns: reading the study from the archive (``dicomweb``: one WADO-RS request for the study or
series, ``transfer-syntax=*``, each part streamed to a file in a private folder under
``$PAS_HUB_HOME/downloads``; ``embedded``: the archive's own spool files), cutting the
instances into buckets as they arrive (``appliance.hub.staging``'s Planner), packing them, and
writing the frames of ``appliance.transfer.download_frames`` (which documents the format). May
not touch: SQL, the upload side's transfers, the archive's files (read only), HTTP requests
and responses (the routes parse and answer; a stage only hands out bytes), the lanes.

Three stages run side by side, so that the WAN never waits for the whole study: the archive
read (one thread), the packing (one thread; the band encoding uses pack.py's pool), and the
answer. Queues of two buckets between them bound memory and disk to a few buckets whatever the
size of the study (invariant 8); staged files are deleted once their bucket is packed, the
folder when the answer ends (or at the next start). Not sealed: the stream is inside TLS 1.3
with the site's client certificate, no bucket is stored anywhere, and the appliance checks
each rebuilt file's SHA-256 against the one computed here from the archive's file.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from starlette.concurrency import run_in_threadpool

from appliance.hub.archive import archive_client_options, trust_problem
from appliance.hub.staging import ArchiveFailed, PartsToFiles, Planner, boundary, uid_of
from appliance.transfer.download_frames import encode_frame
from appliance.transfer.http import http_client
from appliance.transfer.pack import PackItem, pack_bucket
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.hub.app import Hub

log = logging.getLogger("pas.hub.download")

MULTIPART_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
AHEAD = 2  # buckets staged or packed ahead of the answer
# The stream's first bucket closes after this many original bytes (a whole instance is never
# split for it): the first byte crosses the WAN after one small packing, not a whole bucket's.
FIRST_BUCKET_BYTES = 256 * 1024
# And the stream's last one: what is left at the end is cut in buckets of about this size, so
# that the site, which unpacks and files a bucket once it is whole, has little to do after the
# last byte (a 4 MiB bucket of 86 kB MR files is ~0.15 s of decoding and fsyncs there).
LAST_BUCKET_BYTES = 1024 * 1024
# Packing is CPU and a bucket's bytes in memory (at most download.MAX_BUCKET_BYTES read + packed):
# at most this many downloads pack at once. Measured on 10 CT priors at once (2 cores): 2 -> 3.6 s,
# 4 -> 3.2 s, 8 -> 3.4 s mean of four runs each (a study's first byte waits for its packing).
_PACKING = threading.Semaphore(4)


@dataclass(frozen=True)
class Part:
    """One study (or series) of a request, minus what the site holds."""

    study_uid: str
    series_uid: str | None
    have: frozenset[str]


@dataclass(frozen=True)
class Staged:
    item: PackItem
    owned: bool  # a staged copy to delete once packed (not an archive's own file)


@dataclass
class _PartStats:
    instances: int = 0
    skipped: int = 0
    original: int = 0
    packed: int = 0
    buckets: int = 0
    sent: bool = False
    error: str = ""


class Download:
    """One answer: stage -> pack -> frames, each stage a thread or the response's loop.

    The parts (studies) follow one another in the same stream, so that a site asking for ten
    priors at once gets one TCP stream (one slow start, no ten-way overshoot of the WAN's
    queue) while the hub reads and packs the next study during the send of the current one.
    ``batched`` (the request named ``studies``): each bucket names its part, each part ends
    with a frame of its own, and a part the archive cannot deliver gets an error frame of its
    own while the others go on."""

    def __init__(self, hub: Hub, site: str, parts: list[Part], target: int, batched: bool,
                 feed: queue.Queue[Any] | None = None):
        self.hub = hub
        # ``feed`` (the priors route): the parts are not known yet; the feed brings
        # ("frame", bytes) to send as they are, ("part", Part) to stream, then None.
        self.feed = feed
        self.fed_all = feed is None
        self.ahead: list[tuple[str, Any]] = []  # what the feed brought, not yet staged
        self.feeding: Any = None  # the task that fills the feed (kept referenced)
        self.site = site
        self.parts = parts
        self.batched = batched
        self.target = target
        self.folder = downloads_dir(hub) / uuid.uuid4().hex  # made by start()
        self.plans: queue.Queue[Any] = queue.Queue(AHEAD)
        self.frames: queue.Queue[Any] = queue.Queue(AHEAD)
        self.cancel = threading.Event()
        self.first = threading.Event()  # the archive answered (or failed)
        self.failure: ArchiveFailed | None = None
        self.stats = [_PartStats() for _ in parts]
        if feed is not None and parts:
            raise ValueError("a download has parts or a feed, not both")
        self.over = False      # the answer's last bytes were handed out
        self.finished = False  # ... and it was the end frame (not an error, not a cut)
        self.ended = False     # end() ran
        self.started = time.monotonic()
        self.threads = [threading.Thread(target=self._stage, name="pas-dl-stage", daemon=True),
                        threading.Thread(target=self._pack, name="pas-dl-pack", daemon=True)]

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.stats)

    def start(self) -> Download:
        self.folder.mkdir(parents=True)
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
        index = 0
        try:
            for number, part in self._parts():
                # The stream's first bucket is small: its packing is all the WAN waits for.
                planner = Planner(self.target, FIRST_BUCKET_BYTES if number == 0 else None,
                                   index)
                stats = self.stats[number]
                try:
                    for staged in self._source(part):
                        if self.cancel.is_set():
                            return
                        if staged.item.sop_instance_uid in part.have:
                            stats.skipped += 1
                            if staged.owned:
                                staged.item.path.unlink(missing_ok=True)
                            continue
                        stats.instances += 1
                        for plan in planner.add(staged.item):
                            if not self._put(self.plans, ("bucket", number, plan)):
                                return
                    if stats.instances == 0 and stats.skipped == 0:
                        raise ArchiveFailed(404, "unknown_study",
                                            self._what(part) + " has no instances")
                except ArchiveFailed as exc:
                    if not self.batched:
                        raise
                    # This part only: what it already sent stays valid, the next part goes on.
                    stats.error = exc.error
                    self.first.set()
                    index = planner.index
                    if not self._put(self.plans, ("part_error", number, exc)):
                        return
                    continue
                final = self._is_last(number)
                for plan in planner.finish(LAST_BUCKET_BYTES if final else None):
                    if not self._put(self.plans, ("bucket", number, plan)):
                        return
                index = planner.index
                if not self._put(self.plans, ("part_end", number, None)):
                    return
            self._put(self.plans, None)
        except ArchiveFailed as exc:
            self.failure = exc
            self._put(self.plans, exc)
        except Exception as exc:  # any other failure ends the answer with an error frame
            log.exception("download for %s: staging failed", self.site)
            self.failure = ArchiveFailed(502, "archive_failed", f"{type(exc).__name__}: {exc}")
            self._put(self.plans, self.failure)
        finally:
            self.first.set()

    def _parts(self) -> Iterator[tuple[int, Part]]:
        """(number, part) in stream order; from the feed, its frames passed on in their
        place as they come."""
        if self.feed is None:
            yield from enumerate(self.parts)
            return
        while not self.cancel.is_set():
            self._read_feed(wait=not self.ahead)
            if not self.ahead:
                if self.fed_all:
                    return
                continue
            kind, value = self.ahead.pop(0)
            if kind == "frame":
                if not self._put(self.plans, ("frame", None, value)):
                    return
                continue
            self.parts.append(value)
            self.stats.append(_PartStats())
            yield len(self.parts) - 1, value

    def _read_feed(self, wait: bool) -> None:
        """Move what the feed holds into ``ahead``; ``wait``: up to 0.5 s for the first."""
        assert self.feed is not None
        while not self.fed_all:
            try:
                got = self.feed.get(timeout=0.5) if wait else self.feed.get_nowait()
            except queue.Empty:
                return
            wait = False
            if got is None:
                self.fed_all = True
            else:
                self.ahead.append(got)

    def _is_last(self, number: int) -> bool:
        """No part follows this one (its tail is cut in small buckets)."""
        if self.feed is None:
            return number == len(self.parts) - 1
        self._read_feed(wait=False)
        return self.fed_all and not any(kind == "part" for kind, _ in self.ahead)

    def _source(self, part: Part) -> Iterator[Staged]:
        spool = getattr(self.hub.archive, "spool", None)
        if self.hub.settings.archive.kind == "embedded" and spool is not None:
            yield from self._embedded(part, spool)
        else:
            yield from self._dicomweb(part)

    def _embedded(self, part: Part, spool: Any) -> Iterator[Staged]:
        from appliance.store import retrieve

        keys = {"StudyInstanceUID": part.study_uid}
        level = "STUDY"
        if part.series_uid:
            keys["SeriesInstanceUID"], level = part.series_uid, "SERIES"
        db = self.hub.archive.db  # type: ignore[attr-defined]
        # The row ids (8 bytes an instance), the rows a page at a time as they are packed:
        # every row of the study was read first (about 1.2 kB each in Python).
        plan = retrieve.retrieve_plan(db, level, keys)
        if not plan.instance_ids:
            raise ArchiveFailed(404, "unknown_study", self._what(part) + " is not in the archive")
        self.first.set()
        for page in retrieve.instance_pages(db, plan.instance_ids):
            for row in page:
                yield Staged(PackItem(row["sop_instance_uid"], spool.path(row["path"]),
                                      int(row["size"]), row["sha256"]), owned=False)

    def _dicomweb(self, part: Part) -> Iterator[Staged]:
        archive = self.hub.settings.archive
        path = f"studies/{part.study_uid}"
        if part.series_uid:
            path += f"/series/{part.series_uid}"
        arrived: list[Staged] = []

        def on_part(file: Path, size: int, digest: str) -> None:
            arrived.append(Staged(PackItem(uid_of(file), file, size, digest), owned=True))

        parser: PartsToFiles | None = None
        try:
            # identity: the archive is on the hub's LAN; gzip would only cost its CPU.
            with http_client(**archive_client_options(archive)) as client, \
                    client.stream("GET", f"{archive.url}/{path}",
                                  headers={"Accept": MULTIPART_DICOM,
                                           "Accept-Encoding": "identity"}) as answer:
                if answer.status_code == 404:
                    raise ArchiveFailed(404, "unknown_study",
                                        self._what(part) + " is not in the archive")
                if answer.status_code >= 400:
                    answer.read()
                    raise ArchiveFailed(502, "archive_refused",
                                        f"the archive answered HTTP {answer.status_code}: "
                                        f"{answer.text[:200]}")
                parser = PartsToFiles(boundary(answer.headers.get("content-type", "")),
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
            why = trust_problem(exc, archive) or f"{type(exc).__name__}: {exc}"
            raise ArchiveFailed(502, "archive_unreachable",
                                f"the regional archive: {why}") from exc
        finally:
            if parser is not None:
                parser.close()

    @staticmethod
    def _what(part: Part) -> str:
        return f"study {part.study_uid}" + (f" series {part.series_uid}"
                                            if part.series_uid else "")

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
                    self._put(self.frames, (encode_frame(
                        {"end": True, "instances": self.instances, "buckets": buckets}), None))
                    self._put(self.frames, None)
                    return
                if isinstance(got, ArchiveFailed):
                    self._put(self.frames, got)
                    return
                kind, number, plan = got
                if kind == "frame":  # the feed's own frames (the priors route's "found")
                    if not self._put(self.frames, (plan, None)):
                        return
                    continue
                stats = self.stats[number]
                if kind == "part_end":
                    if self.batched and not self._put(self.frames, (encode_frame(
                            {"study_end": number, "instances": stats.instances,
                             "buckets": stats.buckets}), number)):
                        return
                    if not self.batched:
                        stats.sent = True  # the end frame of a single study says it
                    continue
                if kind == "part_error":
                    log.warning("download of %s for %s failed: %s", self._what(
                        self.parts[number]), self.site, plan.detail, extra={"SITE": self.site})
                    if not self._put(self.frames, (encode_frame(
                            {"error": plan.error, "study": number, "detail": plan.detail}),
                            None)):
                        return
                    continue
                with _PACKING:
                    payload, _stats = pack_bucket(plan, "default")
                stats.original += sum(length for _, _, length in plan.entries)
                stats.packed += len(payload)
                seen: dict[str, PackItem] = {}
                for item, offset, length in plan.entries:
                    seen[item.sop_instance_uid] = item
                    if item.path.parent == self.folder and offset + length == item.size:
                        # A staged copy whose last piece is packed: no longer needed.
                        item.path.unlink(missing_ok=True)
                header: dict[str, Any] = {
                    "index": plan.index, "payload": len(payload), "instances": [
                        {"uid": i.sop_instance_uid, "size": i.size, "sha256": i.sha256}
                        for i in seen.values()]}
                if self.batched:
                    header["study"] = number
                if not self._put(self.frames, (encode_frame(header, payload), None)):
                    return
                buckets += 1
                stats.buckets += 1
        except Exception as exc:
            log.exception("download for %s: packing failed", self.site)
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

    def next_bytes(self) -> Any:
        """The answer's next bytes (a frame, or the error frame that ends it), None at the
        end, ... after a quiet second. One reader at a time (the answer, or the lanes' lock)."""
        if self.over:
            return None
        frame = self.next_frame()
        if frame is ...:
            return None if self.cancel.is_set() else ...
        if frame is None:
            self.over = self.finished = True
            return None
        if isinstance(frame, ArchiveFailed):
            log.warning("download for %s failed: %s", self.site, frame.detail,
                        extra={"SITE": self.site})
            self.over = True
            return encode_frame({"error": frame.error, "detail": frame.detail})
        data, done = frame
        if done is not None:
            self.stats[done].sent = True
        return data

    async def body(self) -> AsyncIterator[bytes]:
        try:
            while True:
                data = await run_in_threadpool(self.next_bytes)
                if data is ...:
                    continue
                if data is None:
                    return
                yield data
        finally:
            self.end()

    def end(self) -> None:
        """The answer is over (sent, failed or cut): stop the stages, log once per part."""
        if self.ended:
            return
        self.ended = True
        self.close()
        finished = self.finished
        if self.batched:
            log.info("batched download for %s %s: %s in one stream, %.2f s",
                     self.site, "sent" if finished else "ended early",
                     counted(len(self.parts), "study", "studies"),
                     time.monotonic() - self.started, extra={"SITE": self.site})
        parts = list(self.parts)  # a feed's stage may still be adding
        for part, stats in zip(parts, self.stats[:len(parts)], strict=True):
            sent = stats.sent and (finished or self.batched)
            log.info("download of %s for %s %s: %s (%d held at the site, "
                     "skipped), %.1f MB -> %.1f MB packed, %.2f s", self._what(part),
                     self.site, "failed" if stats.error else "sent" if sent
                     else "ended early", counted(stats.instances, "instance"), stats.skipped,
                     stats.original / 1e6, stats.packed / 1e6,
                     time.monotonic() - self.started,
                     extra={"SITE": self.site, "STUDY_UID": part.study_uid})

    def close(self) -> None:
        self.cancel.set()
        threading.Thread(target=self._clean, name="pas-dl-clean", daemon=True).start()

    def _clean(self) -> None:
        for thread in self.threads:
            thread.join(30)
        shutil.rmtree(self.folder, ignore_errors=True)


def downloads_dir(hub: Hub) -> Path:
    return hub.settings.home / "downloads"

