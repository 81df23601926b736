"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET on the ingest AE (one port for everything).

Owns: turning a C-FIND/C-MOVE/C-GET identifier into a call on :mod:`appliance.store.query`
and answering it (reading the identifier and building a C-FIND answer's, character set
included, are ``qr_identifiers.py``'s; encoding and sending each answer ``qr_answers.py``'s),
choosing per instance whether to send the stored bytes as they are (the viewer accepted
the stored transfer syntax) or a copy in explicit/implicit little endian (never fail because
a viewer lacks JPEG-LS), and auditing every query and retrieve. May not touch: SQL, spool
writes (the copy is ``appliance.store.transcode``'s temp file).

How the sub-operations are sent (a stored file streamed as it is, or a copy in explicit or
implicit VR little endian made only when its C-STORE goes) and counted (what the destination
really stored, for the audit row) is ``suboperations.py``'s; how often Pending responses go,
the Error Comment of a refusal pynetdicom sends itself and the status of one PAS makes
(``RetrieveRefused``: 0xA900, 0xC000, 0xA801, before any sub-operation) are
``qr_responses.py``'s.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from appliance.config import DicomTlsSection, ServingSection
from appliance.ingest.scp import TRANSFER_SYNTAXES, DicomListener
from appliance.ops.metrics import count_retrieve
from appliance.ops.security import OutgoingDicomTls
from appliance.serving.qr_answers import IdentifierEncoder, answerer
from appliance.serving.qr_identifiers import identifier_keys, query_charset
from appliance.serving.qr_responses import (
    IDENTIFIER_DOES_NOT_MATCH,
    MOVE_DESTINATION_UNKNOWN,
    UNABLE_TO_PROCESS,
    RetrieveRefused,
    explain_refusal,
    refuse,
    throttle_pending,
)
from appliance.serving.suboperations import (
    SpoolFile,
    SubOperationTally,
    TranscodedFile,
    stream_spool_files,
)
from appliance.store import audit
from appliance.store import query as store_query
from appliance.store.db import Database
from appliance.store.spool import Spool
from appliance.words import counted

log = logging.getLogger("pas.serving")

PENDING = 0xFF00
CANCELLED = 0xFE00
SUCCESS = 0x0000

_PATIENT_ROOT = {str(PatientRootQueryRetrieveInformationModelFind),
                 str(PatientRootQueryRetrieveInformationModelMove),
                 str(PatientRootQueryRetrieveInformationModelGet)}
_UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
_MAX_CONTEXTS = 128
# The Number of ... Sub-operations of a C-MOVE/C-GET response are US (PS3.4 C.4.2.1.6).
MAX_SUB_OPERATIONS = 65535
# Yielded for an instance purged while its retrieve ran: not a Dataset pynetdicom can send
# (no SOP Class UID), so it counts that sub-operation failed; the tally already has it.
_GONE: Any = "instance removed during the retrieve"

# Fetch-through: study UID -> instances fetched from the region (raises on failure).
Fetcher = Callable[[str], int]


class QueryRetrieveService:
    """The C-FIND/C-MOVE/C-GET handlers, over one (Database, Spool)."""

    def __init__(self, settings: ServingSection, db: Database, spool: Spool, ae_title: str,
                 fetcher: Fetcher | None = None,
                 region_find: Callable[[str, dict[str, str]], list[dict[str, Any]]] | None = None,
                 tls: DicomTlsSection | None = None):
        self.settings = settings
        # C-MOVE sub-associations over DICOM TLS to the destinations that use it.
        self.listener_tls = tls is not None and tls.enabled
        self.outgoing_tls = OutgoingDicomTls(tls.ca, tls.cert, tls.key) if tls else None
        self.db = db
        self.spool = spool
        self.ae_title = ae_title
        self.fetcher = fetcher
        self.region_find = region_find
        self.destinations = {d.title: d for d in settings.move_destinations}

    # -- wiring ---------------------------------------------------------------------------

    def register(self, listener: DicomListener) -> None:
        """Add the Q/R contexts and handlers to the ingest AE (before it starts), and accept
        the SCP role for storage so that C-GET can send on the viewer's association."""
        for sop_class in listener.storage_classes:
            listener.ae.add_supported_context(sop_class, TRANSFER_SYNTAXES,
                                              scu_role=True, scp_role=True)
        contexts = [
            PatientRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelMove,
            PatientRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelGet,
        ]
        listener.add_handlers([
            (evt.EVT_CONN_OPEN, no_delay),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
        ], contexts)

    # -- C-FIND ---------------------------------------------------------------------------

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        calling, address = _peer(event)
        model = str(event.request.AffectedSOPClassUID)
        # Every query row names the model asked under (the ATNA "SOP Queried" object) and
        # keeps the identifier as the viewer encoded it (its ParticipantObjectQuery).
        audit_query = functools.partial(self._audit, "query", sop_class=model,
                                        **_identifier_as_sent(event))
        try:
            identifier = event.identifier
            level, keys, asked = identifier_keys(identifier)
            charset = query_charset(identifier)
        except Exception as exc:  # an identifier pydicom cannot decode
            problem = f"identifier does not decode: {exc}"
            log.warning("C-FIND from %s refused: %s", calling, problem)
            audit_query(calling, address, None, f"failure: {problem}")
            yield _failure(UNABLE_TO_PROCESS, problem), None
            return
        problem = self._level_problem(level, model)
        if problem:
            log.warning("C-FIND from %s refused: %s", calling, problem)
            audit_query(calling, address, level, f"failure: {problem}")
            yield _failure(IDENTIFIER_DOES_NOT_MATCH, problem), None
            return
        summary = _summary(level, keys)
        answer = answerer(event, IdentifierEncoder(level, asked, self.ae_title, charset,
                                                    str(event.context.transfer_syntax)))
        count = 0
        ask_region = self.region_find is not None and level == "STUDY"
        local_studies: set[str] = set()  # only to leave out the region's copies of them
        note = None
        ended = "failure: the association ended before the last match was sent"
        try:
            cap = self.settings.max_results or None
            # One row more than max_results tells whether the answer was cut short. C-FIND has
            # no warning status (PS3.4 C.4.1.1.4) and a failure would make most viewers drop
            # the matches sent: it ends in Success, and the cut is logged and audited.
            # Its cursor holds a read transaction on this thread's connection, the one the
            # audit row is written on: a match loop left early closes it first. Left open,
            # the row's BEGIN IMMEDIATE met that stale snapshot once anything else had been
            # written meanwhile ("database is locked" at once) and the row was lost.
            rows = store_query.find(self.db, level, {"StudyInstanceUID": "", **keys},
                                    limit=None if cap is None else cap + 1,
                                    pn_case_sensitive=self.settings.pn_case_sensitive)
            for values in rows:
                if cap is not None and count == cap:
                    rows.close()
                    note = f"truncated: more than serving.max_results = {cap} matches"
                    log.warning("C-FIND from %s: %s (%s)", calling, note, summary)
                    break
                if event.is_cancelled:
                    rows.close()
                    audit_query(calling, address, summary, "cancelled", count)
                    yield CANCELLED, None
                    return
                if not (yield from answer(values, "ONLINE")):
                    rows.close()
                    audit_query(calling, address, summary, ended, count)
                    return
                count += 1
                if ask_region:
                    local_studies.add(values.get("StudyInstanceUID") or "")
        except store_query.QueryError as exc:
            log.warning("C-FIND from %s refused: %s", calling, exc)
            audit_query(calling, address, summary, f"failure: {exc}", count)
            yield _failure(IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
            return
        if ask_region:
            assert self.region_find is not None
            try:
                regional = self.region_find(level, keys)
            except Exception as exc:  # the WAN is down: answer from local data, say so
                regional = []
                note = "; ".join(filter(None, [note, f"region not asked: {exc}"]))
                log.info("C-FIND: region not asked: %s", exc)
            for values in regional:
                # A cancel read while the region was asked ends the answer as one read during
                # the local matches does (it sent none of the region's, then Success).
                if event.is_cancelled:
                    audit_query(calling, address, summary, "cancelled", count)
                    yield CANCELLED, None
                    return
                if values.get("StudyInstanceUID") in local_studies:
                    continue
                if not (yield from answer(values, "NEARLINE")):
                    audit_query(calling, address, summary, ended, count)
                    return
                count += 1
        try:
            yield SUCCESS, None
        finally:
            # pynetdicom closes this generator right after sending the final response, in the
            # association's thread and before it reads the viewer's next PDU: the row is
            # written before anything else happens on this association, but its fsync is no
            # longer part of the viewer's wait.
            audit_query(calling, address, summary, "success", count, note)

    @staticmethod
    def _level_problem(level: str, model: str) -> str | None:
        if not level:
            return "QueryRetrieveLevel missing: PATIENT, STUDY, SERIES or IMAGE"
        if level not in store_query.LEVELS:
            return f"QueryRetrieveLevel {level!r} is not PATIENT, STUDY, SERIES or IMAGE"
        if level == "PATIENT" and model not in _PATIENT_ROOT:
            return "QueryRetrieveLevel PATIENT is only valid in the Patient Root model"
        return None

    # -- C-MOVE / C-GET -------------------------------------------------------------------

    def _resolve(self, event: Any) -> tuple[str, store_query.RetrievePlan]:
        """The instances a retrieve names (their row ids: memory does not grow with whole rows
        per instance), after fetching a study that is missing here.
        Raises :class:`RetrieveRefused` with the status PS3.4 C.4.2.1.5/C.4.3.1.5 gives the
        problem: 0xA900 for an identifier that does not match the SOP class (no, unknown or
        foreign level, no unique key, a malformed or wildcard one), 0xC000 (unable to
        process) for one that does not decode, too many matches, a failed fetch."""
        try:
            level, keys, _ = identifier_keys(event.identifier)
        except Exception as exc:
            raise RetrieveRefused(UNABLE_TO_PROCESS, f"identifier does not decode: {exc}",
                                  ) from exc
        problem = self._level_problem(level, str(event.request.AffectedSOPClassUID))
        if problem:
            raise RetrieveRefused(IDENTIFIER_DOES_NOT_MATCH, problem)
        study_uids = [u for u in (keys.get("StudyInstanceUID") or "").split("\\") if u]
        try:
            # The identifier is checked before any fetch: a wildcard UID went to the region.
            store_query.check_retrieve_keys(level, keys)
        except store_query.QueryError as exc:
            raise RetrieveRefused(IDENTIFIER_DOES_NOT_MATCH, str(exc)) from exc
        fetched = 0
        if self.fetcher is not None and self.settings.fetch_through and level == "STUDY":
            try:
                for study_uid in study_uids:
                    fetched += self._fetch_if_missing(study_uid)
            except RuntimeError as exc:
                raise RetrieveRefused(UNABLE_TO_PROCESS, str(exc)) from exc
        try:
            plan = store_query.retrieve_plan(self.db, level, keys)
        except store_query.QueryError as exc:
            raise RetrieveRefused(IDENTIFIER_DOES_NOT_MATCH, str(exc)) from exc
        if len(plan.instance_ids) > MAX_SUB_OPERATIONS:
            # pynetdicom refuses such a retrieve itself (0xC416/0xC516, no comment), and the
            # audit row then said "did not complete (association lost)".
            raise RetrieveRefused(
                UNABLE_TO_PROCESS,
                f"{len(plan.instance_ids)} instances match, more than the "
                f"{MAX_SUB_OPERATIONS} sub-operations a C-MOVE/C-GET response can count "
                "(US); retrieve the series one by one")
        # pas_retrieve_requests_total{result=hit|miss}: served from the cache alone, or not.
        count_retrieve(hit=bool(plan.instance_ids) and not fetched)
        store_query.touch_studies(self.db, plan.study_uids, time.time())
        return _summary(level, keys), plan

    def _fetch_if_missing(self, study_uid: str) -> int:
        """Instances fetched from the region for this study (0: all were on site)."""
        assert self.fetcher is not None
        held = store_query.study_instance_count(self.db, study_uid)
        try:
            fetched = self.fetcher(study_uid)
        except Exception as exc:
            if held:
                log.warning("fetch-through of %s failed (%s); serving the %s held",
                            study_uid, exc, counted(held, "instance"))
                return 0
            raise RuntimeError(f"study {study_uid} is not on site and the region could not "
                               f"provide it: {exc}") from exc
        log.info("fetch-through: %s of %s from the region", counted(fetched, "instance"),
                 study_uid, extra={"STUDY_UID": study_uid})
        return fetched

    def _refused(self, event: Any, what: str, refusal: RetrieveRefused) -> Iterator[Any]:
        """End a retrieve before any sub-operation: logged, audited, and answered with the
        refusal's status, Error Comment and Offending Element (qr_responses.refuse: the one
        way pynetdicom lets a handler choose that status). What this yields is what
        pynetdicom needs for "no sub-operations": a C-MOVE's destination first (not used:
        with no sub-operation, no sub-association is opened), then 0. The association stays
        up for the viewer's next request."""
        calling, address = _peer(event)
        log.warning("%s from %s refused (0x%04X): %s", what, calling, refusal.status,
                    refusal.reason)
        self._audit("retrieve", calling, address, _asked(event), f"failure: {refusal.reason}")
        refuse(event.assoc, refusal.status, refusal.reason, refusal.offending)
        if what == "C-MOVE":
            yield "", 0
        yield 0

    def on_move(self, event: Any) -> Iterator[Any]:
        calling, address = _peer(event)
        explain_refusal(event.assoc, None)
        destination_title = _text(event.move_destination)
        destination = self.destinations.get(destination_title)
        if destination is None:
            yield from self._refused(event, "C-MOVE", RetrieveRefused(
                MOVE_DESTINATION_UNKNOWN, f"unknown move destination {destination_title!r}"))
            return
        try:
            summary, plan = self._resolve(event)
        except RetrieveRefused as refusal:
            yield from self._refused(event, "C-MOVE", refusal)
            return
        established = threading.Event()
        store_assoc: list[Any] = []
        rows = plan.instance_ids
        tally = SubOperationTally(total=len(rows))

        def on_established(store_event: Any) -> None:
            no_delay(store_event)
            reactor_takes_no_messages(store_event.assoc)
            # With pynetdicom's own polling loops (dicom.event_driven = false): poll every
            # 0.1 ms, not 1 ms, for the life of this retrieve's sub-association.
            store_event.assoc.dul._run_loop_delay = 0.0001
            stream_spool_files(store_event.assoc, tally)
            store_assoc.append(store_event.assoc)
            established.set()

        contexts = _contexts_for(plan.pairs)
        throttle_pending(event.assoc, self.settings.retrieve_pending_interval_s)
        what = f"C-MOVE to {destination.title}"
        refused: list[str] = []
        opened: list[Any] = []  # the sub-association, once its connection is open
        # pynetdicom answers 0xA801 when the sub-association does not come up: say why.
        explain_refusal(event.assoc, lambda: f"{destination.title}: "
                                              f"{_why_not_up(refused, opened)}",
                         only=MOVE_DESTINATION_UNKNOWN)
        try:
            use_tls = destination.uses_tls(self.listener_tls)
            yield destination.host, destination.port, {
                "ae_title": destination.title, "contexts": contexts,
                "tls_args": self.outgoing_tls.tls_args(use_tls) if self.outgoing_tls else None,
                "evt_handlers": [(evt.EVT_ESTABLISHED, on_established),
                                 *_refusal_handlers(refused, opened)],
            }
            yield len(rows)
            if not established.wait(10):
                raise RuntimeError("the sub-association did not report itself established")
            accepted = _accepted(store_assoc[0])
            yield from self._sub_operations(event, rows, accepted, tally)
        finally:
            # Also when pynetdicom drops this generator (destination unreachable: it answers
            # 0xA801 itself; association lost): every retrieve leaves an audit row.
            why = _why_not_up(refused, opened)
            outcome = _retrieve_outcome(
                tally, rows, stored_by=destination.title,
                unfinished=f"failure: {what} at {destination.host}:{destination.port} did "
                           f"not complete ({why})")
            self._audit("retrieve", calling, address, summary, outcome,
                        detail=tally.detail(what))
            _log_failed_retrieve(calling, outcome, tally.detail(what))

    def on_get(self, event: Any) -> Iterator[Any]:
        calling, address = _peer(event)
        explain_refusal(event.assoc, None)
        try:
            summary, plan = self._resolve(event)
        except RetrieveRefused as refusal:
            yield from self._refused(event, "C-GET", refusal)
            return
        rows = plan.instance_ids
        tally = SubOperationTally(total=len(rows))
        stream_spool_files(event.assoc, tally)
        throttle_pending(event.assoc, self.settings.retrieve_pending_interval_s)
        try:
            yield len(rows)
            accepted = {(cx.abstract_syntax, cx.transfer_syntax[0])
                        for cx in event.assoc.accepted_contexts if cx.as_scu}
            yield from self._sub_operations(event, rows, accepted, tally)
        finally:
            outcome = _retrieve_outcome(
                tally, rows, stored_by=calling,
                unfinished="failure: C-GET did not complete (association lost)")
            self._audit("retrieve", calling, address, summary, outcome,
                        detail=tally.detail("C-GET"))
            _log_failed_retrieve(calling, outcome, tally.detail("C-GET"))

    def _sub_operations(self, event: Any, rows: Sequence[int], accepted: set[tuple[str, str]],
                        tally: SubOperationTally) -> Iterator[Any]:
        """Yield one pending sub-operation per instance. What each became is counted in
        ``tally`` as its C-STORE is answered (suboperations.py); here the tally learns how
        the run ended: cancelled, or finished once the last sub-operation was answered
        (pynetdicom sends it between this generator's last yield and its end)."""
        for instance_id in rows:
            if event.is_cancelled:
                # Set before the yield: pynetdicom sends the final response and never
                # resumes this generator.
                tally.cancelled = True
                yield CANCELLED, None
                return
            row = store_query.instance_row(self.db, instance_id)
            if row is None:  # purged since the retrieve began
                tally.record_failure(f"instance row {instance_id} removed during the retrieve")
                yield PENDING, _GONE
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
            for target in _UNCOMPRESSED:
                if (sop_class, target) in accepted:
                    return TranscodedFile(path, sop_class, row["sop_instance_uid"], target,
                                          self.spool)
        return SpoolFile(path, sop_class, row["sop_instance_uid"])

    def _audit(self, event: str, calling: str, address: str, target: str | None,
               outcome: str, count: int | None = None, detail: str | None = None,
               sop_class: str | None = None, query: bytes | None = None,
               query_syntax: str | None = None) -> None:
        text = " ".join(p for p in (detail, None if count is None else counted(
            count, "result" if event == "query" else "instance")) if p)
        try:
            audit.record(self.db, event, actor=calling, source=address, target=target,
                         outcome=outcome, detail=text or None, sop_class=sop_class,
                         query=query, query_syntax=query_syntax)
        except Exception:  # the audit must not take a viewer's association down
            log.exception("audit record failed")


AUDITED_IDENTIFIER_MAX = 16384  # bytes of a C-FIND identifier kept in its audit row


def _identifier_as_sent(event: Any) -> dict[str, Any]:
    """The request's identifier, its bytes as received and their transfer syntax (the
    presentation context's), for the audit row; nothing when pynetdicom holds none or when
    it is over ``AUDITED_IDENTIFIER_MAX`` bytes (the audit table is kept for years, and a
    peer could send megabytes: such a row keeps its text summary only, and bytes cut short
    would not decode)."""
    raw = getattr(event.request, "Identifier", None)
    if raw is None or raw.getbuffer().nbytes > AUDITED_IDENTIFIER_MAX:
        return {}
    return {"query": raw.getvalue(), "query_syntax": str(event.context.transfer_syntax)}


def _asked(event: Any) -> str | None:
    """What a refused retrieve asked for, as its audit row's target (``pas audit --study``
    finds the refusals of a study too), or None for an identifier that does not decode."""
    try:
        level, keys, _ = identifier_keys(event.identifier)
    except Exception:
        return None
    return _summary(level, keys)


def _log_failed_retrieve(calling: str, outcome: str, detail: str) -> None:
    """A retrieve that did not deliver everything is in the journal too, not only in the
    audit: it is what IT looks for when a radiologist says "the study never came"."""
    if outcome.startswith("failure"):
        log.warning("retrieve by %s: %s; %s", calling, outcome, detail)


def reactor_takes_no_messages(assoc: Any) -> None:
    """Keep the sub-association's reactor from stealing C-STORE responses.

    pynetdicom pauses an association's reactor around ``send_c_store`` with a flag that can
    be stale when sends follow each other closely: the reactor then takes the next C-STORE-RSP
    off the queue as an "unexpected C-STORE service message" and the sender waits for the
    DIMSE timeout (seen here on C-MOVEs of many small instances on a loaded machine). A
    C-MOVE sub-association never receives requests (the peer is a storage SCP), so its
    reactor's non-blocking reads may safely see nothing; ``send_c_store`` still reads the
    response with a blocking get."""
    dimse = getattr(assoc, "dimse", None)
    if dimse is None:
        return
    original = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        return original(block=True) if block else (None, None)

    dimse.get_msg = get_msg


def no_delay(event: Any) -> None:
    """TCP_NODELAY on an association's socket. pynetdicom leaves Nagle on, and a DIMSE
    message goes out as several small PDUs: with the peer's delayed ACK every response then
    stalls ~40 ms (the same stall DESIGN.md notes for DCMTK without TCP_NODELAY=1)."""
    try:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:
        log.debug("TCP_NODELAY not set: %s", exc)


def _contexts_for(pairs: list[tuple[str, str]]) -> list[Any]:
    """For each SOP class: the stored syntax alone (so the peer can accept it) and the
    uncompressed pair (the fallback), within the 128 contexts an association may propose.
    ``pairs``: the retrieve's distinct (SOP class, stored transfer syntax), sorted."""
    contexts: list[Any] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for sop_class, _ in pairs:
        key = (sop_class, _UNCOMPRESSED)
        if key not in seen:
            seen.add(key)
            contexts.append(build_context(sop_class, list(_UNCOMPRESSED)))
    for sop_class, syntax in pairs:
        key = (sop_class, (syntax,))
        if syntax not in _UNCOMPRESSED and key not in seen and len(contexts) < _MAX_CONTEXTS:
            seen.add(key)
            contexts.append(build_context(sop_class, [syntax]))
    for sop_class, syntax in pairs:  # stored uncompressed: offer it alone too (exact bytes)
        key = (sop_class, (syntax,))
        if syntax in _UNCOMPRESSED and key not in seen and len(contexts) < _MAX_CONTEXTS:
            seen.add(key)
            contexts.append(build_context(sop_class, [syntax]))
    return contexts[:_MAX_CONTEXTS]


def _accepted(assoc: Any) -> set[tuple[str, str]]:
    return {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}


def _refusal_handlers(refused: list[str], opened: list[Any]
                     ) -> list[tuple[Any, Callable[[Any], None]]]:
    """Handlers for a C-MOVE sub-association that note in ``refused`` why it did not come up
    when the destination said so, and in ``opened`` the association once its connection is
    open. pynetdicom answers the viewer 0xA801 alike for a destination that is down, one
    that rejected the association and one that accepted it with no presentation context
    (it then aborts it); the audit row names which (:func:`_why_not_up`)."""

    def on_open(store_event: Any) -> None:
        opened.append(store_event.assoc)

    def on_accepted(store_event: Any) -> None:
        if not store_event.assoc.accepted_contexts:
            names = sorted({UID(cx.abstract_syntax).name
                            for cx in store_event.assoc.rejected_contexts})
            refused.append("the destination accepted no presentation context; refused: "
                           + ", ".join(names)[:200])

    def on_rejected(store_event: Any) -> None:
        refused.append("the destination rejected the association")

    return [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACCEPTED, on_accepted),
            (evt.EVT_REJECTED, on_rejected)]


def _why_not_up(refused: list[str], opened: list[Any]) -> str:
    """Why a C-MOVE's sub-association ended the retrieve early. pynetdicom marks an
    association rejected before it runs the EVT_REJECTED handlers, in the association's own
    thread: the C-MOVE handler, resumed on that mark, could get here first and said
    "unreachable" for a destination that had answered with a rejection. The mark is read
    too."""
    if refused:
        return refused[0]
    if opened and opened[0].is_rejected:
        return "the destination rejected the association"
    return "destination unreachable or association lost"


def _retrieve_outcome(tally: SubOperationTally, rows: Sequence[int], stored_by: str,
                      unfinished: str) -> str:
    """A retrieve's audit outcome from what its sub-operations did. Nothing matched: success
    (pynetdicom answers it at once and never resumes the handler); ended before its last
    sub-operation was answered, not by a cancel: ``unfinished``, and what was not stored
    when some were sent."""
    if not rows or tally.finished or tally.cancelled:
        return tally.outcome(stored_by)
    return f"{unfinished}; {tally.not_stored(stored_by)}" if tally.answered else unfinished


def _peer(event: Any) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return requestor.ae_title.strip(), requestor.address


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value or "").strip()


def _summary(level: str, keys: dict[str, str]) -> str:
    """What was asked, for the audit trail: the level and the non-empty matching keys."""
    parts = [f"{k}={v}" for k, v in keys.items() if v]
    return f"{level} {' '.join(parts)}"[:500]


def _failure(status: int, message: str) -> Dataset:
    """A failure status with the problem named in ErrorComment (LO: 64 characters)."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = message[:64]
    return ds
