"""Orders that arrive together: their priors searched, chosen and downloaded in one request.

Owns: gathering the prefetch requests that resolve at about the same time (a RIS sends a
burst's orders a few ms apart) and sending them as one ``HubDownloads.fetch_priors``: the hub
searches each patient, chooses the priors by the rule the request names, and streams the ones
the site lacks in the same answer (``appliance.hub.priors``). Each request gets back the
studies chosen for it and a ticket per study to download, as from the two-step path (search,
then :class:`appliance.prefetch.batch.DownloadBatcher`). May not touch: SQL (the fetcher
passes what the site holds), files (the Receiver writes them).

Why: on a 70 ms line the search and the download request were two round trips before the
first byte of a prior moved; this is one (docs/benchmarks.md, prefetch). A request that cannot
use it (an older hub, a rule that needs series-level attributes, a retry that must name the
instances a cut attempt filed) takes the two-step path: the fetcher decides.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from appliance.prefetch.batch import QUIET_S, SEARCH_GATHER_MAX_S, DownloadBatcher, Ticket, Wanted
from appliance.prefetch.rules import Candidate
from appliance.transfer.download import (
    DownloadError,
    DownloadItem,
    DownloadRefused,
    DownloadUnavailable,
    HubDownloads,
)
from appliance.words import counted

log = logging.getLogger("pas.prefetch")

# The longest a priors request's body stays open for requests claimed with its first one that
# have not reached it yet (:meth:`PriorsBatcher.expect`). Each reads what the site holds first;
# on a loaded machine their threads got there more than the quiet time apart, and a burst of
# orders due together went as two or three priors requests.
EXPECTED_MAX_S = 2.0


def patient_key(patient_id: str, issuer: str) -> str:
    """Whose a download is, as :meth:`DownloadBatcher.downloading_for` is asked (the issuer
    as the region names it, as in the priors request)."""
    return f"{patient_id}|{issuer}"


class PriorsUnavailable(Exception):
    """The hub has no priors route (an older hub): take the two-step path."""


class PriorsRefused(PriorsUnavailable):
    """The hub refused this batch's request (422): these requests take the two-step path
    (which names each study and instance itself); the route stays in use for the next."""


@dataclass
class _Asked:
    request_id: int
    patient: dict[str, Any]  # what the hub is told of this patient (appliance.hub.priors)
    done: threading.Event = field(default_factory=threading.Event)
    chosen: list[Candidate] = field(default_factory=list)
    tickets: dict[str, Ticket | None] = field(default_factory=dict)
    error: Exception | None = None


@dataclass
class _Batch:
    """The requests of one priors request; open while its body is still being sent."""

    asked: list[_Asked] = field(default_factory=list)
    closed: bool = False


class PriorsBatcher:
    """``resolve`` from each request's thread. The first request of a burst opens a batch and
    its priors request leaves at once, its body streamed (``HubDownloads.fetch_priors``):
    the requests that resolve while it is open join it as further lines, until none came for
    ``quiet_s`` (at most ``gather_max_s``), and none of the requests claimed with it is
    still on its way (at most ``expected_max_s``), so the hub starts on the first patient
    while the burst's other orders are still arriving. The stream runs in a thread of its
    own (one of ``prefetch.download_streams``) while the requests go on with their
    tickets."""

    def __init__(self, downloads: Callable[[], HubDownloads | None], batcher: DownloadBatcher,
                 quiet_s: float = QUIET_S, gather_max_s: float = SEARCH_GATHER_MAX_S):
        self.downloads = downloads
        self.batcher = batcher
        self.quiet_s = quiet_s
        self.gather_max_s = gather_max_s
        self.cond = threading.Condition()
        self.open: _Batch | None = None
        self.requests = 0  # priors requests sent to the hub (tests read it)
        self.expected_max_s = EXPECTED_MAX_S
        # Requests claimed that may still join: until each resolves or says it will not.
        self._expected: set[int] = set()

    def expect(self, request_ids: Iterable[int]) -> None:
        """Requests the service just claimed: the open batch waits for them (at most
        ``expected_max_s`` from its first), each joining it or, through
        :meth:`not_joining`, taking the two-step path."""
        with self.cond:
            self._expected.update(request_ids)

    def not_joining(self, request_id: int) -> None:
        """The request will not join (or has done with the route): the batch stops waiting
        for it. Called for every request claimed, whatever its path."""
        with self.cond:
            if request_id in self._expected:
                self._expected.discard(request_id)
                self.cond.notify_all()

    def resolve(self, request_id: int, patient: dict[str, Any],
                stopping: threading.Event) -> tuple[list[Candidate], dict[str, Ticket | None]]:
        """The priors chosen for this request and a ticket per study to download (None: the
        site holds it whole). Raises PriorsUnavailable, or the error of the request."""
        asked = _Asked(request_id, patient)
        with self.cond:
            batch = self.open
            lead = batch is None or batch.closed
            if lead:
                batch = self.open = _Batch()
            assert batch is not None
            batch.asked.append(asked)
            self._expected.discard(request_id)
            self.cond.notify_all()
        if lead:
            threading.Thread(target=self._send, args=(batch,), name="pas-prefetch-priors",
                             daemon=True).start()
        while not asked.done.wait(0.5):
            if stopping.is_set():
                raise InterruptedError("stopping: the fetch resumes at the next start")
        if asked.error is not None:
            raise asked.error
        return asked.chosen, asked.tickets

    def _lines(self, batch: _Batch) -> Iterator[dict[str, Any]]:
        """The batch's patients as they join (the request's body), until none came for
        ``quiet_s`` or ``gather_max_s`` passed since the first, and no request claimed is
        still expected (or ``expected_max_s`` passed); then the batch is closed
        (under the lock: a request that comes later opens the next one)."""
        deadline = time.monotonic() + self.gather_max_s
        quiet_until = time.monotonic() + self.quiet_s
        expected_until = time.monotonic() + self.expected_max_s
        sent = 0
        while True:
            with self.cond:
                while sent == len(batch.asked):
                    at = time.monotonic()
                    left = min(quiet_until, deadline) - at
                    if left <= 0 and self._expected:  # claimed with it, on their way here
                        left = expected_until - at
                    if left <= 0 or self.batcher.stopping.is_set():
                        batch.closed = True
                        return
                    self.cond.wait(left)
                new = batch.asked[sent:]
                sent = len(batch.asked)
                quiet_until = time.monotonic() + self.quiet_s
            for asked in new:
                yield asked.patient

    def _close(self, batch: _Batch) -> None:
        with self.cond:
            batch.closed = True

    def _send(self, batch: _Batch) -> None:
        streams = self.batcher.streams
        try:
            while not streams.acquire(timeout=0.5):
                if self.batcher.stopping.is_set():
                    self._close(batch)
                    self._fail(batch.asked, InterruptedError("stopping"))
                    return
            self._stream(batch)
        finally:
            streams.release()

    def _stream(self, batch: _Batch) -> None:
        asked = batch.asked  # grows while the batch is open; _fail runs once it is closed
        wanted: dict[int, Wanted] = {}  # the parts of the answer, by number
        try:
            downloads = self.downloads()
            if downloads is None or not downloads.hub_has_priors:
                raise PriorsUnavailable("the hub offers no priors route")
            self.batcher.before_bucket()
            self.requests += 1
            started = time.monotonic()
            items = downloads.fetch_priors(self._lines(batch),
                                           lambda entry: self._found(asked, wanted, entry),
                                           bucket_bytes=self.batcher.bucket_bytes,
                                           before_bucket=self.batcher.before_bucket)
            log.info("priors of %s: %s downloaded in one request, %.2f s (%d failed)",
                     counted(len(asked), "request"), counted(len(items), "study", "studies"),
                     time.monotonic() - started,
                     sum(1 for i in items if i.error is not None))
            self._close(batch)
            error: Exception = DownloadError("the hub's priors answer ended without a word "
                                             "of this patient")
        except Exception as exc:  # a request never stays waiting
            self._close(batch)
            error = self._reason(exc)
        self._fail(asked, error)
        for part in list(wanted.values()):  # tickets that joined a part on its way, too
            self.batcher.settle(part, set(), error)

    @staticmethod
    def _reason(exc: Exception) -> Exception:
        """What the batch's requests are told when the priors request did not go through."""
        if isinstance(exc, DownloadUnavailable):  # an older hub: no such route
            return PriorsUnavailable(str(exc))
        if isinstance(exc, DownloadRefused):
            if exc.status in (404, 405):  # no such route after all
                return PriorsUnavailable(str(exc))
            if exc.status == 422:
                log.warning("the hub refused a priors request (%s): two round trips for "
                            "these requests", exc)
                return PriorsRefused(str(exc))
        elif not isinstance(exc, (DownloadError, PriorsUnavailable)):
            log.exception("priors request failed")
        return exc

    def _found(self, batch: list[_Asked], wanted: dict[int, Wanted],
               entry: dict[str, Any]) -> list[DownloadItem]:
        """One patient's "found" frame: that request's chosen studies and tickets (it goes on
        at once), and the items of the parts it adds to the stream (a part another request
        added first gets this request's ticket too)."""
        asked = batch[entry["patient"]]
        new: list[DownloadItem] = []
        if "studies" not in entry:
            asked.error = DownloadError(f"search of patient {asked.patient['patient_id']}: "
                                        f"{entry.get('error', 'bad answer')}: "
                                        f"{entry.get('detail', '')}")
            asked.done.set()
            return new
        try:
            for study in entry["studies"]:
                candidate = Candidate(str(study["study_uid"]), str(study["study_date"]),
                                      str(study["accession_number"]),
                                      frozenset(study["modalities"]), study["instances"])
                part = study["part"]
                if part is None:
                    asked.chosen.append(candidate)
                    asked.tickets[candidate.study_uid] = None  # held whole
                    continue
                if part not in wanted and part != len(wanted):
                    raise DownloadError(f"the hub's priors answer adds part {part} after "
                                        f"{counted(len(wanted), 'part')}")
                ticket = Ticket(asked.request_id, candidate.study_uid)
                if part in wanted:
                    wanted[part].tickets.append(ticket)
                else:
                    held = set(asked.patient["held"].get(candidate.study_uid, ()))
                    wanted[part] = Wanted(candidate.study_uid, held, [ticket],
                                          patient_key(asked.patient["patient_id"],
                                                      asked.patient["issuer"]))
                    self.batcher.left(wanted[part])  # a later request joins it
                    new.append(self.batcher.item_for(wanted[part]))
                asked.chosen.append(candidate)
                asked.tickets[candidate.study_uid] = ticket
        except (KeyError, TypeError, ValueError) as exc:
            raise DownloadError(f"the hub's priors answer: {exc!r}") from None
        asked.done.set()  # the request records what was chosen and waits on its tickets
        return new

    @staticmethod
    def _fail(batch: list[_Asked], error: Exception) -> None:
        for asked in batch:
            if not asked.done.is_set():
                asked.error = error
                asked.done.set()
            for ticket in asked.tickets.values():
                if ticket is not None and not ticket.done.is_set():
                    ticket.error = error
                    ticket.done.set()
