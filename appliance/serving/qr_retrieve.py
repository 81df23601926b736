"""Retrieves: the C-MOVE and C-GET handlers, from the identifier to the last sub-operation.

Owns: turning a C-MOVE/C-GET identifier into the instances it names
(:func:`appliance.store.retrieve.retrieve_plan`, after fetching through ``fetcher`` a study
missing here, or at any level the studies of the instances asked whose file is lost), refusing
one that cannot be served before any sub-operation (the status PS3.4 gives the problem),
reporting the instances whose file is lost here and that the region did not give back as failed
sub-operations of a retrieve that serves the rest (0xB000, the Failed SOP Instance UID List;
every instance lost so: refused), opening a C-MOVE's sub-association to a configured
destination (its contexts, TLS, and why it did not come up are ``qr_associations.py``'s) and,
when it does not come up, counting every sub-operation failed (0xA702, not pynetdicom's
0xA801 "move destination unknown": PS3.4 C.4.2.3.1),
choosing per instance whether to send the stored bytes as they are (the viewer accepted the
stored transfer syntax) or a copy in explicit/implicit little endian (never fail because a
viewer lacks JPEG-LS), and the outcome each retrieve's audit row says. Split from ``qr.py``,
which keeps the C-FIND handler, registers these handlers and writes the audit rows (``audit``,
given here). May not touch: SQL, spool writes (the copy is ``appliance.store.transcode``'s temp
file), the audit table but through ``audit``.

How the sub-operations are sent and counted is ``suboperations.py``'s; how often Pending
responses go, the Error Comment of a refusal pynetdicom sends itself, the status of one PAS
makes (:class:`RetrieveRefused`) and the final response of a C-MOVE whose sub-association did
not come up are ``qr_responses.py``'s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt

from appliance.config import DicomTlsSection, ServingSection
from appliance.locks import READERS, StudyReaders
from appliance.ops.metrics import count_retrieve
from appliance.ops.security import OutgoingDicomTls
from appliance.serving.qr_associations import (
    UNCOMPRESSED,
    SubAssociationWatch,
    accepted_contexts,
    contexts_for,
    peer,
    reactor_takes_no_messages,
)
from appliance.serving.qr_identifiers import identifier_keys, level_problem, request_summary
from appliance.serving.qr_responses import (
    CANCELLED,
    IDENTIFIER_DOES_NOT_MATCH,
    MOVE_DESTINATION_UNKNOWN,
    PENDING,
    UNABLE_TO_PROCESS,
    RetrieveRefused,
    explain_refusal,
    fail_every_suboperation,
    refuse,
    throttle_pending,
)
from appliance.serving.suboperations import (
    LostInstance,
    RemovedInstance,
    SpoolFile,
    SubOperationTally,
    TranscodedFile,
    stream_spool_files,
)
from appliance.store import cache as cache_store
from appliance.store import retrieve as store_retrieve
from appliance.store.db import Database
from appliance.store.query import QueryError
from appliance.store.spool import Spool
from appliance.words import counted

log = logging.getLogger("pas.serving")

# The Number of ... Sub-operations of a C-MOVE/C-GET response are US (PS3.4 C.4.2.1.6).
MAX_SUB_OPERATIONS = 65535

# How many instances' SOP Instance UIDs a retrieve reads ahead of their C-STOREs.
_UID_PAGE = 500

# Fetch-through: study UID -> instances fetched from the region (raises on failure).
Fetcher = Callable[[str], int]
# Writes one access audit row: (event, calling, address, target, outcome, count, detail).
AuditWriter = Callable[..., None]


@dataclass
class LostFiles:
    """The instances of a retrieve whose file is lost here (flagged missing) and that the
    region did not give back: row id -> SOP Instance UID, and why, said once for all of
    them. The retrieve serves the rest; these are its failed sub-operations."""

    uids: dict[int, str]
    reason: str
    by_study: dict[str, int]  # study UID -> how many of its instances asked are lost

    @property
    def studies(self) -> list[str]:
        return sorted(self.by_study)

    @property
    def per_study(self) -> str:
        """``3 of study 1.2.3, 1 of study 1.2.4``: what the journal's line names."""
        return ", ".join(f"{n} of study {uid}" for uid, n in sorted(self.by_study.items()))


class RetrieveHandlers:
    """The C-MOVE and C-GET handlers, over one (Database, Spool)."""

    def __init__(self, settings: ServingSection, db: Database, spool: Spool,
                 audit: AuditWriter, fetcher: Fetcher | None = None,
                 tls: DicomTlsSection | None = None, readers: StudyReaders = READERS):
        self.settings = settings
        # C-MOVE sub-associations over DICOM TLS to the destinations that use it.
        self.listener_tls = tls is not None and tls.enabled
        self.outgoing_tls = OutgoingDicomTls(tls.ca, tls.cert, tls.key) if tls else None
        self.db = db
        self.spool = spool
        self.audit = audit
        self.fetcher = fetcher
        self.destinations = {d.title: d for d in settings.move_destinations}
        self.readers = readers  # the studies being read, which eviction leaves alone

    def _resolve(self, event: Any, what: str
                 ) -> tuple[str, store_retrieve.RetrievePlan, list[str], LostFiles | None]:
        """The instances a retrieve names (their row ids: memory does not grow with whole rows
        per instance), after fetching a study that is missing here, the studies registered
        as being read (the caller releases them when the retrieve ends), and those of the
        instances whose file is lost here and that the region did not give back (None: no
        such one): the retrieve serves the others and reports these as failed
        sub-operations (PS3.4 C.4.2.1.4, C.4.3: 0xB000, the Failed SOP Instance UID List).
        A viewer reading an emergency with the WAN down gets the images on site; the whole
        retrieve was refused. Raises :class:`RetrieveRefused` with the status PS3.4
        C.4.2.1.5/C.4.3.1.5 gives the problem: 0xA900 for an identifier that does not match
        the SOP class (no, unknown or foreign level, no unique key, a malformed or wildcard
        one), 0xC000 (unable to process) for one that does not decode, too many matches, a
        failed fetch, and a retrieve every instance of which is lost so (nothing to serve:
        the cause in the Error Comment says more than 0xA702 would)."""
        try:
            level, keys, _ = identifier_keys(event.identifier)
        except Exception as exc:
            raise RetrieveRefused(UNABLE_TO_PROCESS, f"identifier does not decode: {exc}",
                                  ) from exc
        problem = level_problem(level, str(event.request.AffectedSOPClassUID))
        if problem:
            raise RetrieveRefused(IDENTIFIER_DOES_NOT_MATCH, problem)
        study_uids = [u for u in (keys.get("StudyInstanceUID") or "").split("\\") if u]
        try:
            # The identifier is checked before any fetch: a wildcard UID went to the region.
            store_retrieve.check_retrieve_keys(level, keys)
        except QueryError as exc:
            raise RetrieveRefused(IDENTIFIER_DOES_NOT_MATCH, str(exc)) from exc
        fetched = 0
        fetching = self.fetcher is not None and self.settings.fetch_through
        # Files flagged missing (a lost disk under a restored index): looked for only when
        # some are, one probe otherwise.
        lost_files = cache_store.any_file_missing(self.db)
        if level == "STUDY":
            to_fetch = study_uids if fetching else []
        elif fetching and lost_files:
            # A series, an instance or a patient whose files are lost: the studies holding
            # them have their missing instances fetched from the region first, as for a
            # study-level retrieve. Counted as on site, they were sent from files that are
            # not there (every sub-operation failed: No such file or directory). Planned
            # here first: an identifier the plan refuses (a PatientID several issuers share)
            # is refused as below, 0xA900 and its comment (it was pynetdicom's 0xC413/0xC514,
            # no comment, no audit row).
            try:
                to_fetch = self._studies_with_lost_files(level, keys)
            except QueryError as exc:
                raise RetrieveRefused(IDENTIFIER_DOES_NOT_MATCH, str(exc)) from exc
        else:
            to_fetch = []
        calling, address = peer(event)
        who = f"{what} by {calling} at {address}"  # named to pas cache purge, refused
        failures: dict[str, Exception] = {}  # study UID -> why the region could not help
        # Held from before the fetch: each fetched instance is confirmed as it is filed, and
        # eviction took a study half fetched before the plan below (the viewer got the rest).
        with self.readers.holding(to_fetch, who):
            try:
                for study_uid in to_fetch:
                    fetched += self._fetch_if_missing(study_uid, failures)
            except RuntimeError as exc:
                raise RetrieveRefused(UNABLE_TO_PROCESS, str(exc)) from exc
            try:  # its studies registered as being read: the cache does not evict them
                plan, reading = self.readers.planned(
                    lambda: store_retrieve.retrieve_plan(self.db, level, keys), who)
            except QueryError as exc:
                raise RetrieveRefused(IDENTIFIER_DOES_NOT_MATCH, str(exc)) from exc
        lost = self._lost_files(plan, failures) if lost_files else None
        if lost is not None and len(lost.uids) == len(plan.instance_ids):
            # Said before any sub-operation, as WADO-RS says it before its status line.
            self.readers.release(reading)
            raise RetrieveRefused(UNABLE_TO_PROCESS, lost.reason)
        for study_uid, exc in sorted(failures.items()):
            if lost is None or study_uid not in lost.studies:  # else said with the lost
                log.warning("fetch-through of %s failed (%s); serving the instances held",
                            study_uid, exc, extra={"STUDY_UID": study_uid})
        if len(plan.instance_ids) > MAX_SUB_OPERATIONS:
            self.readers.release(reading)
            # pynetdicom refuses such a retrieve itself (0xC416/0xC516, no comment), and the
            # audit row then said "did not complete (association lost)".
            raise RetrieveRefused(
                UNABLE_TO_PROCESS,
                f"{len(plan.instance_ids)} instances match, more than the "
                f"{MAX_SUB_OPERATIONS} sub-operations a C-MOVE/C-GET response can count "
                "(US); retrieve the series one by one")
        # pas_retrieve_requests_total{channel="dicom",result=hit|miss}: served from the cache
        # alone, or not (WADO-RS counts its own, channel="wado-rs": wado_rs.py).
        # One that needed the region and did not get it (a fetch that failed, instances lost
        # here: served without them, 0xB000) is a miss: counted a hit, a site whose lost
        # disk left every study partly served showed a hit ratio of 1.0.
        count_retrieve(hit=bool(plan.instance_ids) and not fetched and not failures
                       and lost is None, channel="dicom")
        try:
            store_retrieve.touch_studies(self.db, plan.study_uids, time.time())
        except BaseException:
            self.readers.release(reading)
            raise
        if lost is not None:  # the one line of the journal that says it (no line per file)
            log.warning("%s: serving the %s on site; %s (%s) reported as failed "
                        "sub-operations: %s", who,
                        counted(len(plan.instance_ids) - len(lost.uids), "instance"),
                        counted(len(lost.uids), "instance"), lost.per_study, lost.reason,
                        extra={"STUDY_UID": ",".join(lost.studies)})
        return request_summary(level, keys), plan, reading, lost

    def _fetch_if_missing(self, study_uid: str, failures: dict[str, Exception]) -> int:
        """Instances fetched from the region for this study (0: all were on site). A study
        partly held whose fetch failed is served as held, its failure kept in ``failures``
        (the reason of a refusal if some of what was asked lost its file)."""
        assert self.fetcher is not None
        held = store_retrieve.study_instance_count(self.db, study_uid)
        try:
            fetched = self.fetcher(study_uid)
        except Exception as exc:
            if held:  # logged once the plan says whether some of what is asked is lost
                failures[study_uid] = exc
                return 0
            raise RuntimeError(f"study {study_uid} is not on site and the region could not "
                               f"provide it: {exc}") from exc
        log.info("fetch-through: %s of %s from the region", counted(fetched, "instance"),
                 study_uid, extra={"STUDY_UID": study_uid})
        return fetched

    def _lost_in(self, plan: store_retrieve.RetrievePlan) -> dict[str, dict[int, str]]:
        """Study UID -> the planned instances of that study (row id -> SOP Instance UID)
        whose file is flagged missing and still not in the spool."""
        planned = set(plan.instance_ids)
        lost: dict[str, dict[int, str]] = {}
        for study_uid in plan.study_uids:
            rows = {r["id"]: r["sop_instance_uid"] for r in
                    cache_store.files_still_missing(self.db, self.spool, study_uid)
                    if r["id"] in planned}
            if rows:
                lost[study_uid] = rows
        return lost

    def _studies_with_lost_files(self, level: str, keys: dict[str, str]) -> list[str]:
        """The studies of the instances a SERIES, IMAGE or PATIENT-level retrieve names of
        which some lost their file: those the region is asked for first."""
        return sorted(self._lost_in(store_retrieve.retrieve_plan(self.db, level, keys)))

    def _lost_files(self, plan: store_retrieve.RetrievePlan,
                    failures: dict[str, Exception]) -> LostFiles | None:
        """The instances a retrieve names whose file is lost and was not fetched again, and
        why they cannot be served; None when none is. The cause comes first: an Error
        Comment keeps 64 characters (the audit row and the log keep it all)."""
        lost = self._lost_in(plan)
        if not lost:
            return None
        uids = {i: uid for rows in lost.values() for i, uid in rows.items()}
        by_study = {study_uid: len(rows) for study_uid, rows in lost.items()}
        return LostFiles(uids, self._lost_reason(lost, failures), by_study)

    def _lost_reason(self, lost: dict[str, dict[int, str]],
                     failures: dict[str, Exception]) -> str:
        """Why the lost instances of ``lost`` (study UID -> its lost instances) cannot be
        served: the region could not be asked, there is none, or it does not hold them."""
        count = counted(sum(len(rows) for rows in lost.values()), "instance")
        studies = ", ".join(sorted(lost))
        failed = [f"{uid}: {failures[uid]}" for uid in sorted(lost) if uid in failures]
        why = "their file flagged missing: pas cache status"
        if failed:
            return (f"{count} lost here, the region could not be asked: try again later "
                    f"({why}; {'; '.join(failed)})")
        if self.fetcher is None or not self.settings.fetch_through:
            return (f"{count} lost here, no region to fetch from: send study {studies} again "
                    f"from its modality ({why})")
        return (f"{count} lost here, not at the region: send study {studies} again from its "
                f"modality ({why}; never confirmed by the region)")

    def _refused(self, event: Any, what: str, refusal: RetrieveRefused) -> Iterator[Any]:
        """End a retrieve before any sub-operation: logged, audited, and answered with the
        refusal's status, Error Comment and Offending Element (qr_responses.refuse: the one
        way pynetdicom lets a handler choose that status). What this yields is what
        pynetdicom needs for "no sub-operations": a C-MOVE's destination first (not used:
        with no sub-operation, no sub-association is opened), then 0. The association stays
        up for the viewer's next request."""
        calling, address = peer(event)
        log.warning("%s from %s refused (0x%04X): %s", what, calling, refusal.status,
                    refusal.reason)
        self.audit("retrieve", calling, address, _asked(event), f"failure: {refusal.reason}")
        refuse(event.assoc, refusal.status, refusal.reason, refusal.offending)
        if what == "C-MOVE":
            yield "", 0
        yield 0

    def on_move(self, event: Any) -> Iterator[Any]:
        explain_refusal(event.assoc, None)
        destination_title = _text(event.move_destination)
        destination = self.destinations.get(destination_title)
        if destination is None:
            yield from self._refused(event, "C-MOVE", RetrieveRefused(
                MOVE_DESTINATION_UNKNOWN, f"unknown move destination {destination_title!r}"))
            return
        try:
            summary, plan, reading, lost = self._resolve(event,
                                                         f"C-MOVE to {destination.title}")
        except RetrieveRefused as refusal:
            yield from self._refused(event, "C-MOVE", refusal)
            return
        try:
            yield from self._move(event, destination, summary, plan, lost)
        finally:  # also when pynetdicom drops this generator
            self.readers.release(reading)

    def _move(self, event: Any, destination: Any, summary: str,
              plan: store_retrieve.RetrievePlan, lost: LostFiles | None) -> Iterator[Any]:
        """:meth:`on_move` once its instances are planned (their studies being read)."""
        calling, address = peer(event)
        established = threading.Event()
        store_assoc: list[Any] = []
        rows = plan.instance_ids
        tally = SubOperationTally(total=len(rows))

        def on_established(store_event: Any) -> None:
            reactor_takes_no_messages(store_event.assoc)
            # With pynetdicom's own polling loops (dicom.event_driven = false): poll every
            # 0.1 ms, not 1 ms, for the life of this retrieve's sub-association.
            store_event.assoc.dul._run_loop_delay = 0.0001
            stream_spool_files(store_event.assoc, tally)
            store_assoc.append(store_event.assoc)
            established.set()

        contexts = contexts_for(plan.pairs)
        throttle_pending(event.assoc, self.settings.retrieve_pending_interval_s)
        what = f"C-MOVE to {destination.title}"
        watch = SubAssociationWatch()

        def every_one_failed() -> list[str]:
            """The sub-association did not come up (the destination took none of the SOP
            classes, rejected it, or was not reached): every sub-operation failed, counted
            so for the audit row (a lost one as lost), and the SOP Instance UIDs the final
            response names."""
            reason = watch.failure(destination.host, destination.port)
            failed: list[str] = []
            for start in range(0, len(rows), _UID_PAGE):
                page = rows[start:start + _UID_PAGE]
                uids = store_retrieve.instance_uids(self.db, page)
                for instance_id in page:
                    if lost is not None and instance_id in lost.uids:
                        tally.record_lost(lost.reason)
                        failed.append(lost.uids[instance_id])
                        continue
                    tally.record_failure(reason)
                    if instance_id in uids:  # else purged since: failed, not named
                        failed.append(uids[instance_id])
            tally.finished = True
            return failed

        # pynetdicom answers 0xA801 (move destination unknown) when the sub-association
        # does not come up: it goes out as every sub-operation failed, saying why.
        fail_every_suboperation(event.assoc, lambda: watch.comment(destination.title),
                                every_one_failed)
        try:
            use_tls = destination.uses_tls(self.listener_tls)
            yield destination.host, destination.port, {
                "ae_title": destination.title, "contexts": contexts,
                "tls_args": self.outgoing_tls.tls_args(
                    use_tls, destination.host if destination.tls_check_hostname else None)
                if self.outgoing_tls else None,
                "evt_handlers": [(evt.EVT_ESTABLISHED, on_established), *watch.handlers()],
            }
            yield len(rows)
            if not established.wait(10):
                raise RuntimeError("the sub-association did not report itself established")
            accepted = accepted_contexts(store_assoc[0])
            yield from self._sub_operations(event, rows, accepted, tally, lost)
        finally:
            # Also when pynetdicom drops this generator (the sub-association did not come
            # up: every sub-operation failed, above; association lost): every retrieve
            # leaves an audit row.
            outcome = _retrieve_outcome(
                tally, rows, stored_by=destination.title,
                unfinished=f"failure: {what} at {destination.host}:{destination.port} did "
                           f"not complete ({watch.why()})")
            self.audit("retrieve", calling, address, _target(plan, summary), outcome,
                       detail=tally.detail(what))
            _log_failed_retrieve(calling, outcome, tally, what)

    def on_get(self, event: Any) -> Iterator[Any]:
        explain_refusal(event.assoc, None)
        try:
            summary, plan, reading, lost = self._resolve(event, "C-GET")
        except RetrieveRefused as refusal:
            yield from self._refused(event, "C-GET", refusal)
            return
        try:
            yield from self._get(event, summary, plan, lost)
        finally:  # also when pynetdicom drops this generator
            self.readers.release(reading)

    def _get(self, event: Any, summary: str, plan: store_retrieve.RetrievePlan,
             lost: LostFiles | None) -> Iterator[Any]:
        """:meth:`on_get` once its instances are planned (their studies being read)."""
        calling, address = peer(event)
        rows = plan.instance_ids
        tally = SubOperationTally(total=len(rows))
        stream_spool_files(event.assoc, tally)
        throttle_pending(event.assoc, self.settings.retrieve_pending_interval_s)
        try:
            yield len(rows)
            accepted = {(cx.abstract_syntax, cx.transfer_syntax[0])
                        for cx in event.assoc.accepted_contexts if cx.as_scu}
            yield from self._sub_operations(event, rows, accepted, tally, lost)
        finally:
            outcome = _retrieve_outcome(
                tally, rows, stored_by=calling,
                unfinished="failure: C-GET did not complete (association lost)")
            self.audit("retrieve", calling, address, _target(plan, summary), outcome,
                       detail=tally.detail("C-GET"))
            _log_failed_retrieve(calling, outcome, tally, "C-GET")

    def _sub_operations(self, event: Any, rows: Sequence[int], accepted: set[tuple[str, str]],
                        tally: SubOperationTally, lost: LostFiles | None = None
                        ) -> Iterator[Any]:
        """Yield one pending sub-operation per instance. What each became is counted in
        ``tally`` as its C-STORE is answered (suboperations.py); here the tally learns how
        the run ended: cancelled, or finished once the last sub-operation was answered
        (pynetdicom sends it between this generator's last yield and its end). An instance
        of ``lost`` is a sub-operation that fails without a C-STORE (:class:`LostInstance`),
        named in the final response's Failed SOP Instance UID List."""
        uids: dict[int, str] = {}  # the SOP Instance UIDs of the next page of instances
        for n, instance_id in enumerate(rows):
            if n % _UID_PAGE == 0:
                uids = store_retrieve.instance_uids(self.db, rows[n:n + _UID_PAGE])
            if event.is_cancelled:
                # Set before the yield: pynetdicom sends the final response and never
                # resumes this generator.
                tally.cancelled = True
                yield CANCELLED, None
                return
            if lost is not None and instance_id in lost.uids:
                yield PENDING, LostInstance(lost.reason, lost.uids[instance_id])
                continue
            row = store_retrieve.instance_row(self.db, instance_id)
            if row is None:  # purged since the retrieve began: its send fails, counted there
                yield PENDING, RemovedInstance(
                    f"instance row {instance_id} removed during the retrieve",
                    uids.get(instance_id))
                continue
            yield PENDING, self._as_sent(row, accepted)
        tally.finished = True

    def _as_sent(self, row: Any, accepted: set[tuple[str, str]]) -> SpoolFile:
        """The stored bytes when the stored syntax was accepted; else the same instance (same
        SOP Instance UID) in explicit, or else implicit, VR little endian. When neither was
        accepted either, the stored file: pynetdicom finds no context and fails that one."""
        path = self.spool.path(row["path"])
        sop_class, syntax = row["sop_class_uid"], row["transfer_syntax_uid"]
        if (sop_class, syntax) not in accepted:
            for target in UNCOMPRESSED:
                if (sop_class, target) in accepted:
                    return TranscodedFile(path, sop_class, row["sop_instance_uid"], target,
                                          self.spool)
        return SpoolFile(path, sop_class, row["sop_instance_uid"])


def _asked(event: Any) -> str | None:
    """What a refused retrieve asked for, as its audit row's target (``pas audit --study``
    finds the refusals of a study too), or None for an identifier that does not decode."""
    try:
        level, keys, _ = identifier_keys(event.identifier)
    except Exception:
        return None
    return request_summary(level, keys)


def _log_failed_retrieve(calling: str, outcome: str, tally: SubOperationTally,
                         what: str) -> None:
    """A retrieve that did not deliver everything is in the journal too, not only in the
    audit: it is what IT looks for when a radiologist says "the study never came". One
    whose only failures are its lost files, run to its end, was said once before its first
    sub-operation (:meth:`RetrieveHandlers._resolve`): not said again."""
    if tally.lost and tally.finished and tally.failed == tally.lost:
        return
    if outcome.startswith("failure"):
        log.warning("retrieve by %s: %s; %s", calling, outcome, tally.detail(what))


def _target(plan: store_retrieve.RetrievePlan, summary: str) -> str:
    """A retrieve row's target: the studies it sent, comma-joined as a store row's (their
    patients looked up from them); what was asked (``PATIENT PatientID=X``) when no study
    matched. It was what was asked: a patient-level C-MOVE's row was found by no ``pas
    audit --study``, and its ATNA Study object was ``PATIENT PatientID=X`` labelled a Study
    Instance UID (PS3.15 A.5.3.7 wants the study's UID)."""
    return ",".join(plan.study_uids) or summary


def _retrieve_outcome(tally: SubOperationTally, rows: Sequence[int], stored_by: str,
                      unfinished: str) -> str:
    """A retrieve's audit outcome from what its sub-operations did. Nothing matched: success
    (pynetdicom answers it at once and never resumes the handler); ended before its last
    sub-operation was answered, not by a cancel: ``unfinished``, and what was not stored
    when some were sent."""
    if not rows or tally.finished or tally.cancelled:
        return tally.outcome(stored_by)
    return f"{unfinished}; {tally.not_stored(stored_by)}" if tally.answered else unfinished


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value or "").strip()
