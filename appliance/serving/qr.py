"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET on the ingest AE (one port for everything).

Owns: registering the Q/R contexts and handlers on the ingest AE, the C-FIND handler (turning
its identifier into a call on :mod:`appliance.store.query`, answering from the index and, with
``query_region``, from the region: each answer once, merged per patient, study, series or
instance, ``qr_region.py``) and the audit row of every query and retrieve. Reading the
identifier and building a C-FIND answer's, character set included, are
``qr_identifiers.py``'s; encoding and sending each answer ``qr_answers.py``'s; the C-MOVE and
C-GET handlers ``qr_retrieve.py``'s; the associations (the peer, a C-MOVE's sub-association)
``qr_associations.py``'s (TCP_NODELAY on every association's socket: ``dicomnet/nodelay.py``).
May not touch: SQL, spool writes.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from appliance.config import DicomTlsSection, ServingSection
from appliance.dicomnet.contexts import add_supported_contexts
from appliance.ingest.policy import TRANSFER_SYNTAXES
from appliance.ingest.scp import DicomListener
from appliance.serving import qr_region
from appliance.serving.fetch import UNAPPLIED, RegionAnswer, searches_region
from appliance.serving.qr_answers import (
    PENDING,
    PENDING_UNMATCHED,
    IdentifierEncoder,
    answerer,
)
from appliance.serving.qr_associations import peer
from appliance.serving.qr_identifiers import (
    identifier_keys,
    level_problem,
    query_charset,
    request_summary,
    unmatched_keys,
    unnamed_keys,
)
from appliance.serving.qr_responses import (
    CANCELLED,
    IDENTIFIER_DOES_NOT_MATCH,
    SUCCESS,
    UNABLE_TO_PROCESS,
)
from appliance.serving.qr_retrieve import Fetcher, RetrieveHandlers
from appliance.store import audit
from appliance.store import query as store_query
from appliance.store.db import Database
from appliance.store.spool import Spool
from appliance.words import counted

log = logging.getLogger("pas.serving")


class QueryRetrieveService:
    """The C-FIND/C-MOVE/C-GET handlers, over one (Database, Spool)."""

    def __init__(self, settings: ServingSection, db: Database, spool: Spool, ae_title: str,
                 fetcher: Fetcher | None = None,
                 region_find: Callable[[str, dict[str, str]], list[dict[str, Any]]] | None = None,
                 tls: DicomTlsSection | None = None):
        self.settings = settings
        self.db = db
        self.ae_title = ae_title
        self.fetcher = fetcher
        self.region_find = region_find
        self.retrieves = RetrieveHandlers(settings, db, spool, self._audit, fetcher, tls)

    # -- wiring ---------------------------------------------------------------------------

    def register(self, listener: DicomListener) -> None:
        """Add the Q/R contexts and handlers to the ingest AE (before it starts), and accept
        the SCP role for storage so that C-GET can send on the viewer's association."""
        add_supported_contexts(listener.ae, listener.storage_classes, TRANSFER_SYNTAXES,
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
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.retrieves.on_move),
            (evt.EVT_C_GET, self.retrieves.on_get),
        ], contexts)

    # -- C-FIND ---------------------------------------------------------------------------

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        calling, address = peer(event)
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
        problem = level_problem(level, model)
        if problem:
            log.warning("C-FIND from %s refused: %s", calling, problem)
            audit_query(calling, address, level, f"failure: {problem}")
            yield _failure(IDENTIFIER_DOES_NOT_MATCH, problem), None
            return
        summary = request_summary(level, keys)
        # Keys given a value that PAS does not match: each answer says so (0xFF01).
        unmatched = unmatched_keys(level, keys, asked) + unnamed_keys(identifier)
        encoder = IdentifierEncoder(level, asked, self.ae_title, charset,
                                    str(event.context.transfer_syntax))
        answer = answerer(event, encoder, PENDING_UNMATCHED if unmatched else PENDING)
        # A row of the region's that a key held back could not be checked on (fetch.py
        # UNAPPLIED: Orthanc returns no SOPClassesInStudy) is 0xFF01, not 0xFF00 ("every
        # key applied"): a viewer asking for the studies with an SR got every regional study
        # of the patient as matching it.
        answer_unapplied = answerer(event, encoder, PENDING_UNMATCHED)
        count = 0
        note = None
        # Every level may ask the region (a SERIES or IMAGE search scoped to one study and
        # series, a PATIENT search as a study search on its patient keys), first, so that
        # what it holds more of than is here is answered once, merged (qr_region.merged:
        # the region's counts, NEARLINE), whichever keys were asked, and what only it holds
        # is answered too. A STUDY's local row was answered ONLINE with the local part's
        # counts and the region's dropped; PATIENT never asked it: a patient whose studies
        # were all evicted was not found. SERIES and IMAGE ask it only when nothing here
        # matched or the study is known to be held here in part (_region_wanted): asked
        # whenever (s42), every browse of a study held whole waited on the WAN (+0.5 s a
        # series with the WAN down, +0.5 s an IMAGE search of 1,000 images held here).
        may_ask = self.region_find is not None and searches_region(level, keys)
        ask_region = answered_whole = False
        absent: list[str] = []  # STUDY: matched here, not in the region's whole answer
        regional: dict[Any, Any] = {}
        held: dict[str, tuple[int, int]] = {}  # PATIENT: the region's studies held here
        region_cut = False  # PATIENT: the region answered as many studies as asked
        local_keys = qr_region.local_keys(level, keys, may_ask)
        unique = qr_region.UNIQUE_KEY.get(level, "")
        truncated = False
        ended = "failure: the association ended before the last match was sent"
        try:
            cap = self.settings.max_results or None
            # One row more than max_results tells whether the answer was cut short. C-FIND has
            # no warning status (PS3.4 C.4.1.1.4) and a failure would make most viewers drop
            # the matches sent: it ends in Success, and the cut is logged and audited.
            # Read in pages (each one query read whole, keyset by row id), not through one
            # cursor: a cursor held a read snapshot for as long as the viewer took to read
            # every answer, and a viewer reading a whole-cache IMAGE search slowly (1.5 kB/s)
            # kept SQLite from ever resetting its WAL: it grew by ~70 kB an instance received
            # meanwhile (8 to 817 MiB in 11,600). Between pages nothing is held, and the audit
            # row's BEGIN IMMEDIATE (same thread, same connection) meets no stale snapshot.
            pages = store_query.find_pages(self.db, level, local_keys,
                                           page_size=FIND_PAGE,
                                           limit=None if cap is None else cap + 1,
                                           pn_case_sensitive=self.settings.pn_case_sensitive)
            # The first page read before the region is asked: a key the index refuses
            # (0xA900) is refused without a WAN round trip.
            first = next(pages, [])
            ask_region = may_ask and self._region_wanted(level, keys, bool(first))
            if ask_region:
                before = note
                regional, note, region_cut = self._ask_region(level, keys, note)
                # Answered whole (not failed, fewer rows than the limit asked) on keys both
                # sides match alike (no name, no wildcard: Orthanc matches no non-ASCII name
                # with one): a study matched here that it does not list is one it holds
                # none of.
                answered_whole = (level == "STUDY" and note == before
                                  and (cap is None or len(regional) <= cap)
                                  and _matched_alike(keys))
            # Cut, the region's answer may lack studies of any of its patients (not only the
            # last ones: its order is its own), so a patient built from it has no counts that
            # could be told complete: they are answered empty, 0xFF01 (a key not supported),
            # not a part of them under 0xFF00 (every key applied).
            region_cut = region_cut and any(
                element.keyword in qr_region.PATIENT_COUNTS for element in asked)
            if region_cut:
                note = "; ".join(filter(None, [note, (
                    "the counts of the patients the region matched not given (answered "
                    f"0x{PENDING_UNMATCHED:04X}): its answer was cut")]))
            if level == "PATIENT" and regional:
                held = qr_region.held_studies(
                    self.db, [uid for patient in regional.values() for uid in patient.studies])
            rows = (values for page in chain([first], pages) for values in page)
            for values in rows:
                if cap is not None and count == cap:
                    rows.close()
                    truncated = True
                    cut = f"truncated: more than serving.max_results = {cap} matches"
                    note = "; ".join(filter(None, [note, cut]))
                    log.warning("C-FIND from %s: %s (%s)", calling, cut, summary)
                    break
                if event.is_cancelled:
                    rows.close()
                    audit_query(calling, address, summary, "cancelled", count)
                    yield CANCELLED, None
                    return
                send = answer
                if level == "PATIENT":
                    there = regional.pop(qr_region.patient_key(values), None)
                    values, availability = qr_region.patient_merged(values, there, held)
                    if region_cut:  # even one the cut answer does not list: its studies
                        # at the region may be past the cut (review s42b F2)
                        values, send = qr_region.uncounted(values), answer_unapplied
                else:
                    there = regional.pop(values.get(unique) or "", None)
                    # At most what RegionFind remembers (bounded memory: a STUDY search
                    # on a date range may match the whole cache).
                    if answered_whole and there is None and len(absent) < ABSENT_MAX:
                        absent.append(str(values.get(unique) or ""))
                    values, availability = qr_region.merged(level, values, there)
                if not (yield from send(values, availability)):
                    rows.close()
                    audit_query(calling, address, summary, ended, count)
                    return
                count += 1
            saw_absent = getattr(self.region_find, "saw_absent", None)
            if absent and saw_absent is not None:
                saw_absent(absent)
        except store_query.QueryError as exc:
            log.warning("C-FIND from %s refused: %s", calling, exc)
            audit_query(calling, address, summary, f"failure: {exc}", count)
            yield _failure(IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
            return
        # The local matches already cut at max_results: the region's rows would only go past
        # the cap.
        unapplied: set[str] = set()
        here = qr_region.held_counts(self.db, level, list(regional)) \
            if regional and level != "PATIENT" and not truncated else {}
        if not truncated:
            for key, there in regional.items():
                # A cancel read while the region was asked ends the answer as one read during
                # the local matches does (it sent none of the region's, then Success).
                if event.is_cancelled:
                    audit_query(calling, address, summary, "cancelled", count)
                    yield CANCELLED, None
                    return
                if cap is not None and count == cap:  # the region asked max_results + 1
                    cut = f"truncated: more than serving.max_results = {cap} matches"
                    note = "; ".join(filter(None, [note, cut]))
                    log.warning("C-FIND from %s: %s (%s, with the region's)", calling, cut,
                                summary)
                    break
                if level == "PATIENT":
                    values, whole = qr_region.patient_answer(there, held)
                    held_back = sorted(there.unapplied)
                    if region_cut:
                        values = qr_region.uncounted(values)
                else:
                    values = there
                    held_back = values.get(UNAPPLIED) or []
                    whole = qr_region.whole_here(level, here.get(key), values)
                availability = "NEARLINE"
                if whole:
                    # Every instance of it is here and the index did not match it: a key it
                    # applied and the region did not (SOPClassesInStudy) left it out, or the
                    # region matched it and it is answered as it is held, ONLINE (it was
                    # NEARLINE, as if a retrieve had to fetch it).
                    if held_back:
                        continue
                    availability = "ONLINE"
                unapplied.update(held_back)
                send = answer_unapplied if held_back or (level == "PATIENT" and region_cut) \
                    else answer
                if not (yield from send(values, availability)):
                    audit_query(calling, address, summary, ended, count)
                    return
                count += 1
        if unapplied:
            note = "; ".join(filter(None, [note, (
                f"the region's answers not checked on {', '.join(sorted(unapplied))} "
                f"(answered 0x{PENDING_UNMATCHED:04X})")]))
        try:
            yield SUCCESS, None
        finally:
            # pynetdicom closes this generator right after sending the final response, in the
            # association's thread and before it reads the viewer's next PDU: the row is
            # written before anything else happens on this association, but its fsync is no
            # longer part of the viewer's wait.
            if unmatched:  # first in the row's detail, before its count and any other note
                note = " ".join(filter(None, [
                    f"keys not matched (answered 0x{PENDING_UNMATCHED:04X}): "
                    f"{', '.join(unmatched)};", note]))
            audit_query(calling, address, summary, "success", count, note)

    def _region_wanted(self, level: str, keys: dict[str, str], matched_here: bool) -> bool:
        """Whether a C-FIND the region can be asked (searches_region) asks it: PATIENT and
        STUDY always; SERIES and IMAGE unless the study is proven held whole here: the
        region's STUDY (or PATIENT) answer of the last minutes (RegionFind.region_instances:
        a viewer lists the study before its series) counted no more instances of it than
        the region confirmed of those here (a set it holds: it then holds nothing else).

        A plain count here proved nothing (review s42b F1): a study evicted here whose late
        series came since, as many images as the region's, was answered Success without
        the region's series; so was any study after a restart, the counts forgotten. Not
        proven, the region is asked, at the cost of its round trip; a region that failed is
        not waited on again for RegionFind.RETRY_AFTER_S (the breaker)."""
        if level in ("PATIENT", "STUDY") or not matched_here:
            return True
        seen = getattr(self.region_find, "region_instances", None)
        study = (keys.get("StudyInstanceUID") or "").strip()
        there = seen(study) if seen is not None else None
        if there is None or not store_query.is_uid(study):
            return True
        return there > store_query.confirmed_in_study(self.db, study)

    def _ask_region(self, level: str, keys: dict[str, str], note: str | None
                    ) -> tuple[dict[Any, Any], str | None, bool]:
        """The region's matches by their level's UID (in the region's order), a PATIENT
        search's by patient (qr_region.RegionPatient), the note with "region not asked"
        when it could not be (the WAN down: answered from local data, and the audit row says
        so; its breaker open: at once, "it failed N s ago"), and whether a PATIENT search's
        answer was cut (the region gave as many studies as asked)."""
        assert self.region_find is not None
        try:
            rows = self.region_find(level, keys)
        except Exception as exc:
            note = "; ".join(filter(None, [note, f"region not asked: {exc}"]))
            log.info("C-FIND: region not asked: %s", exc)
            return {}, note, False
        if level == "PATIENT":
            cut = isinstance(rows, RegionAnswer) and rows.cut
            if cut:
                # Asked max_results + 1 studies and given as many: patients past them (and
                # other studies of any of them) are not known. Answered as far as known,
                # ending Success as a cut at max_results does, and audited so; not when it
                # answered fewer (its answer is whole).
                cut_note = (f"truncated: the region answered {len(rows)} studies, its limit "
                            f"(serving.max_results + 1): patients past them not listed")
                note = "; ".join(filter(None, [note, cut_note]))
                log.warning("C-FIND: %s", cut_note)
            return qr_region.region_patients(rows, keys), note, cut
        unique = qr_region.UNIQUE_KEY[level]
        # A region need not return the levels above in a series or instance search (PS3.18):
        # the UIDs the query pinned are its answers' too (a row without one raised KeyError,
        # answered 0xC311, review s40/2a).
        pinned = {key: keys[key] for key in ("StudyInstanceUID", "SeriesInstanceUID")
                  if key != unique and store_query.is_uid(keys.get(key) or "")}
        for row in rows:
            for key, value in pinned.items():
                row.setdefault(key, value)
        # A row without its UID could not be told from another, nor retrieved: not answered.
        return {str(row[unique]): row for row in rows if row.get(unique)}, note, False

    def _audit(self, event: str, calling: str, address: str, target: str | None,
               outcome: str, count: int | None = None, detail: str | None = None,
               sop_class: str | None = None, query: bytes | None = None,
               query_syntax: str | None = None) -> None:
        """One access audit row for a query or a retrieve (``qr_retrieve.py`` writes its rows
        through this too), its detail ending in the count of results or instances."""
        text = " ".join(p for p in (detail, None if count is None else counted(
            count, "result" if event == "query" else "instance")) if p)
        try:
            audit.record(self.db, event, actor=calling, source=address, target=target,
                         outcome=outcome, detail=text or None, sop_class=sop_class,
                         query=query, query_syntax=query_syntax)
        except Exception:  # the audit must not take a viewer's association down
            log.exception("audit record failed")


# C-FIND matches read from the index at a time (store_query.find_pages): no read snapshot
# lasts longer than one page's query, however slowly the viewer reads the answers.
FIND_PAGE = 500
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



# Studies a whole regional STUDY answer did not list, remembered per search (RegionFind's
# own bound, SEEN_MAX).
ABSENT_MAX = 10_000

# Keys the index and the region match the same way when exact (UIDs, identifiers, a date):
# a whole regional answer on them tells what the region holds of the studies matched here.
_ALIKE_KEYS = {"PatientID", "IssuerOfPatientID", "StudyInstanceUID", "AccessionNumber",
               "StudyDate", "QueryRetrieveLevel"}


def _matched_alike(keys: dict[str, str]) -> bool:
    return all(keyword in _ALIKE_KEYS and not any(c in value for c in "*?")
               for keyword, value in keys.items() if (value or "").strip())


def _failure(status: int, message: str) -> Dataset:
    """A failure status with the problem named in ErrorComment (LO: 64 characters) and, when
    the message begins with the key at fault (``StudyDate: ...``, ``QueryRetrieveLevel
    missing``), that key's tag as Offending Element (0000,0901): PS3.4 C.4.1.1.4 pairs both
    with 0xA900. A viewer showed only the comment's cut text; the C-MOVE and C-GET refusals
    carried the tag already."""
    ds = Dataset()
    ds.Status = status
    offending = tag_for_keyword(re.split(r"[: ]", message, maxsplit=1)[0])
    if offending is not None:
        ds.OffendingElement = [offending]
    ds.ErrorComment = message[:64]
    return ds
