"""Priors wanted at about the same time come down in one bucketed download.

Owns: gathering the studies that prefetch requests hand over (a RIS often sends a day's orders
in one burst: ten ORMs within milliseconds), and sending each gathered batch as one request to
the hub (``HubDownloads.fetch_many``): one TCP stream, one slow start, one queue on the WAN,
instead of one download per study overshooting the link's queue together (measured: 0.7-0.9
MB of 5.6 MB resent with ten at once, docs/benchmarks.md). May not touch: SQL (the fetcher's
callbacks do the bookkeeping), files (the Receiver writes them).

When a batch leaves: as soon as no request is still resolving its priors (QIDO through the
hub) and none is due but unclaimed, or ``GATHER_MAX_S`` after its first study, whichever comes
first. A request that hands its studies over no longer holds a resolving slot, so the next due
requests are claimed and join the same batch. Nothing waits on a timer when nothing else is
coming: a lone order's study leaves at once. Batches run side by side up to
``prefetch.download_streams``; a study already waiting in the gathering batch is not asked for
twice (both requests are told).

A study already on its way down (its batch left: on a slow link for minutes) is not asked for
again either: a later request that wants it, and lacks nothing that download does not bring,
joins it (``in_flight``): its ticket is told as the first ones are, and credited with the
buckets already filed. Should that download fail, the joined ticket is not failed with it: it
is handed to the gathering batch once, for a download of its own (what the failed one filed
counts as held), and fails only if that one does too. The priors route's parts are on their
way too (``left``); a request whose patient has a download under way takes the two-step path
to join it (``downloading_for``). Before: two orders a few seconds apart for one patient had
the hub send the prior, then again all of it not filed yet (tests/test_prefetch_inflight.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from appliance.prefetch.identifiers import identifier_problem
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
    ``unavailable`` (the hub offers no bucketed download: use WADO-RS) or ``error``.
    ``joined_with``: what the site held when this ticket joined a download already on its way
    (None otherwise); kept so that, if that download fails, this one can ask for the rest
    itself."""

    request_id: int
    study_uid: str
    done: threading.Event = field(default_factory=threading.Event)
    filed: set[str] = field(default_factory=set)
    unavailable: bool = False
    error: Exception | None = None
    joined_with: set[str] | None = None

    def wait(self, stopping: threading.Event) -> None:
        while not self.done.wait(0.5):
            if stopping.is_set():
                raise InterruptedError("stopping: the fetch resumes at the next start")


@dataclass
class Wanted:
    """One study to download for one or more tickets. ``held``: what the download does not
    ask for; ``patient``: whose it is (``patient_id|issuer``, so that a request can tell that
    a download of its patient is under way); ``recorded``: what each bucket filed so far (a
    ticket that joins late is credited with it); ``settled``: its tickets were told."""

    study_uid: str
    held: set[str]
    tickets: list[Ticket]
    patient: str = ""
    recorded: list[Any] = field(default_factory=list)
    settled: bool = False


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
        self.wanted: dict[str, Wanted] = {}     # the gathering batch
        self.in_flight: dict[str, Wanted] = {}  # on their way down, until their tickets are told
        self.first_at = 0.0
        self.gather_max_s = GATHER_MAX_S
        self.batches = 0      # batches sent (tests and logs read it)
        self._thread: threading.Thread | None = None

    def submit(self, request_id: int, study_uid: str, held: set[str],
               patient: str = "") -> Ticket:
        """A ticket for ``study_uid`` but ``held``: it joins the study waiting in the gathering
        batch, or the download of it already on its way when that one asks for all this
        request lacks, or the study joins the gathering batch."""
        ticket = Ticket(request_id, study_uid)
        with self.cond:
            going = self.in_flight.get(study_uid)
            if study_uid in self.wanted or going is None or not going.held <= held:
                self._want(ticket, held, patient)
                return ticket
            ticket.joined_with = set(held)
            going.tickets.append(ticket)
            earlier = list(going.recorded)  # later buckets are recorded for it by on_bucket
            first = going.tickets[0].request_id
        log.info("prefetch %d: prior %s is already on its way down (request %d's download, "
                 "%s filed so far): waits for it", request_id, study_uid, first,
                 counted(len(earlier), "instance"), extra={"STUDY_UID": study_uid})
        if earlier:
            self.record(request_id, earlier)
        return ticket

    def _want(self, ticket: Ticket, held: set[str], patient: str) -> None:
        """Into the gathering batch (under ``cond``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._dispatch, name="pas-prefetch-batch",
                                            daemon=True)
            self._thread.start()
        if not self.wanted:
            self.first_at = time.monotonic()
        wanted = self.wanted.get(ticket.study_uid)
        if wanted is None:
            self.wanted[ticket.study_uid] = Wanted(ticket.study_uid, set(held), [ticket],
                                                   patient)
        else:
            wanted.held &= held  # ask for what either request lacks
            wanted.tickets.append(ticket)
        self.cond.notify_all()

    def downloading_for(self, patient: str) -> bool:
        """Whether a study of ``patient`` is gathered or on its way down: a request of that
        patient then searches and joins it rather than ask the hub's priors route, which
        would send the study again."""
        with self.cond:
            return any(w.patient == patient for w in (*self.wanted.values(),
                                                      *self.in_flight.values()))

    def left(self, wanted: Wanted) -> None:
        """``wanted`` is on its way down (a batch or a priors answer carries it): later
        requests join it until it is settled. A second download of the same study (one that
        was asked for before this one was known) does not replace the first."""
        with self.cond:
            self.in_flight.setdefault(wanted.study_uid, wanted)

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
                for wanted in batch:
                    self.in_flight.setdefault(wanted.study_uid, wanted)
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

    def _fail(self, batch: list[Wanted], error: Exception) -> None:
        for wanted in batch:
            self.settle(wanted, set(), error)

    def settle(self, wanted: Wanted, filed: set[str], error: Exception | None,
               unavailable: bool = False) -> None:
        """The download of ``wanted`` is over: it is no longer on its way, and each ticket not
        told yet is told, except that one which joined it on its way is handed back to the
        gathering batch after a failure (once; not when stopping, nor when the hub has no
        bucketed download), with what this one filed counted as held. Runs once."""
        again: list[Ticket] = []
        told: list[Ticket] = []
        with self.cond:
            if wanted.settled:
                return
            wanted.settled = True
            if self.in_flight.get(wanted.study_uid) is wanted:
                del self.in_flight[wanted.study_uid]
            for ticket in wanted.tickets:
                if ticket.done.is_set():
                    continue
                if (error is not None and not unavailable and ticket.joined_with is not None
                        and not self.stopping.is_set()):
                    ticket.filed |= filed
                    held, ticket.joined_with = ticket.joined_with | filed, None
                    self._want(ticket, held, wanted.patient)
                    again.append(ticket)
                else:
                    told.append(ticket)
        for ticket in again:
            log.warning("prefetch %d: the download of prior %s it waited for failed (%s): "
                        "its own download now", ticket.request_id, ticket.study_uid, error,
                        extra={"STUDY_UID": ticket.study_uid})
        for ticket in told:
            ticket.filed |= filed
            ticket.error, ticket.unavailable = error, unavailable
            ticket.done.set()

    def item_for(self, wanted: Wanted) -> DownloadItem:
        def on_bucket(filed: list[Any]) -> None:
            with self.cond:  # a ticket joining now is credited with this bucket or the next
                wanted.recorded.extend(filed)
                tickets = list(wanted.tickets)
            for ticket in tickets:
                self.record(ticket.request_id, filed)

        def on_done(item: DownloadItem) -> None:
            self.settle(wanted, set(item.result.filed), item.error)

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
                self.settle(wanted, set(), None, unavailable=True)
        except Exception as exc:  # a ticket never stays open
            log.exception("prefetch batch failed")
            self._fail(batch, exc)
        finally:
            self.streams.release()
            self._fail(batch, RuntimeError("the download ended without this study"))

    def _one(self, downloads: HubDownloads, item: DownloadItem) -> None:
        """One study by the single-study form (the stream counts are the study's). What it
        filed is noted as it goes: after a cut, a ticket that joined it asks for the rest
        only."""
        def on_instance(uid: str, content: Any) -> Any:
            filed = item.on_instance(uid, content)
            item.result.filed.add(uid)
            return filed

        try:
            result = downloads.fetch(item.study_uid, on_instance, have=item.have,
                                     bucket_bytes=self.bucket_bytes,
                                     before_bucket=self.before_bucket, on_bucket=item.on_bucket)
            item.result = result
        except DownloadUnavailable:
            raise
        except Exception as exc:
            item.error = exc
        item.done.set()
        item.on_done(item)


# What the hub refuses in a prior search's patient_id or issuer (appliance/hub/priors.py, 422
# naming the field): QIDO-RS wildcards, and the list separator. Such an ID (a RIS or worklist
# sending ``*``) would match other patients' studies.
WILDCARDS = ("*", "?", "\\")


class Unsearchable(ValueError):
    """A patient_id or issuer the region cannot be searched by: one that would match more
    than one patient (a wildcard), or that is no DICOM LO value (over 64 characters, a
    control character). Refused on the site, alone, before it joins a batch: the hub refuses
    the whole batched request with a 422, and every patient of the burst failed with it.
    Another try would search the same: the request fails at its first."""


def refuse_unsearchable(patient_id: str, issuer: str) -> None:
    """Raise :class:`Unsearchable` naming the field and what is wrong with it (the wildcard
    character, the length, the control character), if either cannot be searched by."""
    for name, value in (("patient_id", patient_id), ("issuer", issuer)):
        for char in WILDCARDS:
            if char in (value or ""):
                raise Unsearchable(
                    f"{name} {value!r} holds {char!r}: wildcards (* ?) and \\ are not searched "
                    f"for priors (they would match other patients' studies); correct the "
                    f"{name} at the RIS or worklist")
        problem = identifier_problem(value or "")
        if problem is not None:
            # Not quoted: 65 characters or more, or a control character, in a log line.
            raise Unsearchable(f"{name} {problem}; not searched for priors (no study can "
                               f"carry it); correct the {name} at the RIS or worklist")


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
        QIDO-RS), :class:`Unsearchable` (alone: the others of the batch go on) or the error
        of this patient's search."""
        refuse_unsearchable(patient_id, issuer)
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
