"""Priors wanted at about the same time come down in one bucketed download.

Owns: gathering the studies that prefetch requests hand over (a RIS often sends a day's orders
in one burst: ten ORMs within milliseconds), and sending each gathered batch as one request to
the hub (``HubDownloads.fetch_many``): one TCP stream, one slow start, one queue on the WAN,
instead of one download per study overshooting the link's queue together (measured: 0.7-0.9
MB of 5.6 MB resent with ten at once, docs/benchmarks.md). May not touch: SQL (the service's
callbacks do the bookkeeping), files (the Receiver writes them).

When a batch leaves: as soon as no request is still resolving its priors (QIDO through the
hub) and none is due but unclaimed, or ``GATHER_MAX_S`` after its first study, whichever comes
first. A request that hands its studies over no longer holds a resolving slot, so the next due
requests are claimed and join the same batch. Nothing waits on a timer when nothing else is
coming: a lone order's study leaves at once. Batches run side by side up to
``prefetch.download_streams``; a study already waiting in the gathering batch is not asked for
twice (both requests are told).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from appliance.transfer.download import (
    BatchUnavailable,
    DownloadItem,
    DownloadUnavailable,
    HubDownloads,
)
from appliance.words import counted

log = logging.getLogger("pas.prefetch")

GATHER_MAX_S = 0.5  # the longest a study waits for others to join its batch
QUIET_S = 0.012  # a search leaves once no other was asked for this long...
SEARCH_GATHER_MAX_S = 0.05  # ... or this long after it was asked for


@dataclass
class Ticket:
    """One request's wish for one study; ``done`` is set with ``filed`` (the UIDs filed),
    ``unavailable`` (the hub offers no bucketed download: use WADO-RS) or ``error``."""

    request_id: int
    study_uid: str
    done: threading.Event = field(default_factory=threading.Event)
    filed: set[str] = field(default_factory=set)
    unavailable: bool = False
    error: Exception | None = None

    def wait(self, stopping: threading.Event) -> None:
        while not self.done.wait(0.5):
            if stopping.is_set():
                raise InterruptedError("stopping: the fetch resumes at the next start")


@dataclass
class Wanted:
    study_uid: str
    held: set[str]
    tickets: list[Ticket]


class DownloadBatcher:
    """``submit`` studies from any thread; a dispatcher thread sends them in batches."""

    def __init__(self, downloads: Callable[[], HubDownloads | None],
                 file: Callable[[str, bytes], Any],
                 record: Callable[[int, list[Any]], None],
                 others_coming: Callable[[], bool],
                 before_bucket: Callable[[], None],
                 streams: threading.Semaphore, bucket_bytes: int,
                 stopping: threading.Event):
        self.downloads = downloads
        self.file = file                    # (uid, bytes) -> what record() gets per instance
        self.record = record                # (request id, filed) once per bucket
        self.others_coming = others_coming  # requests still resolving or due, unclaimed
        self.before_bucket = before_bucket  # steps aside for urgent uploads
        self.streams = streams
        self.bucket_bytes = bucket_bytes
        self.stopping = stopping
        self.cond = threading.Condition()
        self.wanted: dict[str, Wanted] = {}
        self.first_at = 0.0
        self.gather_max_s = GATHER_MAX_S
        self.batches = 0      # batches sent (tests and logs read it)
        self._thread: threading.Thread | None = None

    def submit(self, request_id: int, study_uid: str, held: set[str]) -> Ticket:
        ticket = Ticket(request_id, study_uid)
        with self.cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._dispatch, name="pas-prefetch-batch",
                                                daemon=True)
                self._thread.start()
            if not self.wanted:
                self.first_at = time.monotonic()
            wanted = self.wanted.get(study_uid)
            if wanted is None:
                self.wanted[study_uid] = Wanted(study_uid, set(held), [ticket])
            else:
                wanted.held &= held  # ask for what either request lacks
                wanted.tickets.append(ticket)
            self.cond.notify_all()
        return ticket

    def poke(self) -> None:
        """Something changed that may let the gathering batch leave."""
        with self.cond:
            self.cond.notify_all()

    def _dispatch(self) -> None:
        while not self.stopping.is_set():
            with self.cond:
                while not self.wanted and not self.stopping.is_set():
                    self.cond.wait(1.0)
                deadline = self.first_at + self.gather_max_s
                while (self.others_coming() and time.monotonic() < deadline
                       and not self.stopping.is_set()):
                    self.cond.wait(max(0.0, min(0.05, deadline - time.monotonic())))
                batch = list(self.wanted.values())
                self.wanted = {}
            if not batch:
                continue
            while not self.streams.acquire(timeout=0.5):
                if self.stopping.is_set():
                    self._fail(batch, InterruptedError("stopping"))
                    return
            self.batches += 1
            threading.Thread(target=self._send, args=(batch,), name="pas-prefetch-stream",
                             daemon=True).start()
        with self.cond:
            batch, self.wanted = list(self.wanted.values()), {}
        self._fail(batch, InterruptedError("stopping"))

    @staticmethod
    def _fail(batch: list[Wanted], error: Exception) -> None:
        for wanted in batch:
            for ticket in wanted.tickets:
                if not ticket.done.is_set():
                    ticket.error = error
                    ticket.done.set()

    def item_for(self, wanted: Wanted) -> DownloadItem:
        def on_bucket(filed: list[Any]) -> None:
            for ticket in wanted.tickets:
                self.record(ticket.request_id, filed)

        def on_done(item: DownloadItem) -> None:
            for ticket in wanted.tickets:
                ticket.filed, ticket.error = set(item.result.filed), item.error
                ticket.done.set()

        return DownloadItem(wanted.study_uid, self.file, set(wanted.held),
                            on_bucket=on_bucket, on_done=on_done)

    def _send(self, batch: list[Wanted]) -> None:
        try:
            downloads = self.downloads()
            if downloads is None:
                raise DownloadUnavailable("no hub download")
            self.before_bucket()
            items = [self.item_for(w) for w in batch]
            started = time.monotonic()
            if len(items) == 1:
                self._one(downloads, items[0])
            else:
                try:
                    downloads.fetch_many(items, bucket_bytes=self.bucket_bytes,
                                         before_bucket=self.before_bucket)
                except BatchUnavailable as exc:
                    log.info("%s: one download per study", exc)
                    with ThreadPoolExecutor(len(items), thread_name_prefix="pas-dl-one") as pool:
                        list(pool.map(lambda item: self._one(downloads, item), items))
            log.info("prefetch batch of %s downloaded in %.2f s (%d failed)",
                     counted(len(items), "study", "studies"), time.monotonic() - started,
                     sum(1 for i in items if i.error is not None))
        except DownloadUnavailable as exc:
            log.info("the hub offers no bucketed download (%s): WADO-RS from now on", exc)
            for wanted in batch:
                for ticket in wanted.tickets:
                    ticket.unavailable = True
                    ticket.done.set()
        except Exception as exc:  # a ticket never stays open
            log.exception("prefetch batch failed")
            self._fail(batch, exc)
        finally:
            self.streams.release()
            self._fail(batch, RuntimeError("the download ended without this study"))

    def _one(self, downloads: HubDownloads, item: DownloadItem) -> None:
        """One study by the single-study form (the stream counts are the study's)."""
        try:
            result = downloads.fetch(item.study_uid, item.on_instance, have=item.have,
                                     bucket_bytes=self.bucket_bytes,
                                     before_bucket=self.before_bucket, on_bucket=item.on_bucket)
            item.result = result
        except DownloadUnavailable:
            raise
        except Exception as exc:
            item.error = exc
        item.done.set()
        item.on_done(item)


@dataclass
class _Search:
    patient_id: str
    issuer: str
    done: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: Exception | None = None


class SearchBatcher:
    """Patients' study searches wanted at the same time go to the hub as one request
    (``HubDownloads.search``): a burst of orders pays one round trip on the WAN, on the one
    kept-alive connection, instead of one each on as many new connections (each a TCP and a
    TLS handshake). Group commit: the first search waits until no other came for
    ``QUIET_S`` (at most ``SEARCH_GATHER_MAX_S``), then leaves with all those asked for;
    the ones asked for while it is on the way leave together as soon as it is back.

    Why the short wait: a RIS sends a burst's orders one by one, each after the previous
    one's ACK (3-4 ms apart here); leaving at once split ten orders into a search of one
    and a search of nine, two round trips (0.2 s on a 70 ms line) where one does. A lone
    order pays ``QUIET_S``."""

    def __init__(self, downloads: Callable[[], HubDownloads | None],
                 quiet_s: float = QUIET_S, gather_max_s: float = SEARCH_GATHER_MAX_S):
        self.downloads = downloads
        self.quiet_s = quiet_s
        self.gather_max_s = gather_max_s
        self.cond = threading.Condition()
        self.pending: list[_Search] = []
        self.busy = False
        self.requests = 0  # searches sent to the hub (tests read it)

    def search(self, patient_id: str, issuer: str) -> list[dict[str, Any]]:
        """The patient's studies; raises DownloadUnavailable (the hub has no such search: use
        QIDO-RS) or the error of this patient's search."""
        wanted = _Search(patient_id, issuer)
        with self.cond:
            self.pending.append(wanted)
            self.cond.notify_all()  # a gathering sender counts it
            while self.busy and not wanted.done:
                self.cond.wait()
            if not wanted.done:  # this thread sends the batch, its own search among them
                self.busy = True
                self._gather()
                # All of them: no more than the requests in flight (the hub takes 256).
                batch, self.pending = self.pending, []
        if not wanted.done:
            try:
                downloads = self.downloads()
                if downloads is None:
                    raise DownloadUnavailable("no hub download")
                self.requests += 1
                results = downloads.search([(s.patient_id, s.issuer) for s in batch])
                for one, result in zip(batch, results, strict=True):
                    if isinstance(result, Exception):
                        one.error = result
                    else:
                        one.rows = result
            except Exception as exc:
                for one in batch:
                    one.error = exc
            finally:
                with self.cond:
                    for one in batch:
                        one.done = True
                    self.busy = False
                    self.cond.notify_all()
        if wanted.error is not None:
            raise wanted.error
        return wanted.rows

    def _gather(self) -> None:
        """Wait (holding the condition's lock between waits) until no search came for
        ``quiet_s``, or ``gather_max_s`` passed."""
        deadline = time.monotonic() + self.gather_max_s
        quiet_until = time.monotonic() + self.quiet_s
        count = len(self.pending)
        while (now := time.monotonic()) < min(quiet_until, deadline):
            self.cond.wait(min(quiet_until, deadline) - now)
            if len(self.pending) != count:
                count, quiet_until = len(self.pending), time.monotonic() + self.quiet_s
