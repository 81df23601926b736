"""DICOMweb over a (Database, Spool): the routes, QIDO-RS and the access check.

Owns: the route table of DICOMweb (PS3.18) under one prefix; QIDO-RS (query parameters to
matching keys, result caps, DICOM JSON); the bearer-token check (:meth:`DicomWeb.actor_of`)
and the access audit rows (:meth:`DicomWeb.record`) of each query and store. STOW-RS (parts
streamed in, a part above ``spill_above`` written to a spool temp file as it arrives; the
response's SOP sequences; the request's ``store`` row however it ends) is ``stow_rs.py``'s
(parts: ``stow_parts.py``). WADO-RS (retrieve, metadata, bulk data, frames, rendered) and
its ``retrieve`` rows, written once each answer is over, are ``wado_rs.py``'s; the parsing
and bodies that need no handler state are ``dicomweb_http.py``'s.
:func:`build_dicomweb_routes` works over any (Database, Spool), so the hub's embedded
archive can serve the same API. May not touch: SQL (``store/query.py``), spool
writes (STOW goes through :class:`~appliance.ingest.receive.Receiver`, so the same durability
rules as C-STORE apply: a part is reported stored only after fsync + commit).
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from appliance.serving.dicom_json import element_json
from appliance.serving.dicomweb_http import (
    _SQLITE_MAX_INT,
    ClosingStream,
    ReportedEnd,
    _attribute,
    _fuzzy,
    _int_param,
    _one_uid_each,
    _problem,
    _shown,
)
from appliance.serving.stow_rs import StowRs
from appliance.serving.wado_media import HttpProblem, require_dicom_json
from appliance.serving.wado_rs import DICOM_JSON, WadoRs
from appliance.store import audit
from appliance.store import query as store_query
from appliance.store.db import Database
from appliance.store.spool import Spool
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.daemon import Daemon
    from appliance.ingest.receive import Receiver

log = logging.getLogger("pas.dicomweb")

# A STOW-RS part larger than this goes to a spool temp file as it arrives (the appliance
# passes its ``dicom.spill_above_mb``): a 300 MB part took the daemon up by 612 MB.
SPILL_ABOVE = 32 << 20
# Most results of a QIDO-RS search not confined to one study when the client names no limit
# (and serving.max_results is 0): one unbounded /instances on a big cache ran for minutes and
# held every row. Searches within a study (/studies/{s}/...) are bounded by the study, and
# fetch-through lists a study's instances that way without paging, so they are not capped:
# every answer is written as it is read, QIDO_PAGE rows at a time.
QIDO_DEFAULT_LIMIT = 1000
QIDO_PAGE = 500
# The most an explicit limit gets on such a search (serving.qido_max_limit): limit=100000000
# was unbounded. Both caps answer with the Warning below, so that the client pages on.
QIDO_MAX_LIMIT = 10000
# Study Root Query/Retrieve Information Model - FIND: the model QIDO-RS searches.
QIDO_SOP_CLASS = "1.2.840.10008.5.1.4.1.2.2.1"
# PS3.18 8.3.4.4: what a server that limited the results answers.
TRUNCATED = ('299 {service}: "The number of results exceeded the maximum supported by the '
             'server. Additional results can be requested."')
# PS3.18 8.3.4.1: what a server without fuzzy semantic matching of person names answers to
# fuzzymatching=true (PAS matched literally and said nothing: the viewer took the answer as
# fuzzy).
NOT_FUZZY = ('299 {service}: "The fuzzymatching parameter is not supported. Only literal '
             'matching has been performed."')
# Matching keys PAS cannot apply at the search's level (a series attribute such as Modality
# in a study search: ModalitiesInStudy is the study's) or does not index: they were dropped
# without a word, and the viewer took every study for a filtered answer. PAS's own wording,
# in the form of the two warnings above.
NOT_MATCHED = ('299 {service}: "The following attributes are not supported for matching at '
               'this level and were ignored: {names}."')
# PS3.18 8.3: "The origin server shall ignore any unsupported Query Parameters" (and may say
# so): a name that is no attribute nor a QIDO-RS parameter (a cache-buster "_", a misspelt
# keyword) was a 400 refusing the whole search. PAS's wording, in the form of those above.
NOT_SUPPORTED = ('299 {service}: "The following query parameters are not supported and were '
                 'ignored: {names}."')
MAX_NAMED = 5  # parameters named in that Warning and in the audit row

# Attributes QIDO-RS returns by default per level (PS3.18 table 10.6.3-3..5).
# Rows, Columns, BitsAllocated and NumberOfFrames are among an instance's (web viewers list a
# multi-frame instance's frames and lay images out from them); they were not returned.
DEFAULT_RETURN = {
    "STUDY": ["StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability",
              "ModalitiesInStudy",
              "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances", "StudyDescription"],
    "SERIES": ["Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
               "BodyPartExamined", "NumberOfSeriesRelatedInstances"],
    "IMAGE": ["SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "InstanceNumber",
              "Rows", "Columns", "BitsAllocated", "NumberOfFrames"],
}
# Instance Availability (0008,0056), "present if known" in PS3.18's study and instance
# tables: what PAS answers from its cache is on its disk, ONLINE (as its C-FIND says). It was
# never returned, even when asked by includefield.
INSTANCE_AVAILABILITY = "00080056"
ONLINE = element_json(DataElement(0x00080056, "CS", "ONLINE"))
# Instance attributes of type C in that table (returned if the instance has them): one the
# instance lacks (a structured report's Rows, a single frame's NumberOfFrames) is left out of
# its answer, as Orthanc leaves it out, rather than given empty, which would say the
# instance holds it with no value. So also while the backfill has not read an instance's
# header yet (appliance/ops/backfill.py): unknown is not known to be empty.
TYPE_C = frozenset({"Rows", "Columns", "BitsAllocated", "NumberOfFrames"})
RETRIEVE_URL = "00081190"
# Attribute objects kept per search (_json_attribute), checked once a page: past this (~1 MB;
# the unique values, SOP Instance UIDs, fill it) they are made afresh.
MEMO_MAX = 2_000
_PARENT_KEYS = {"SERIES": ["StudyInstanceUID"], "IMAGE": ["StudyInstanceUID",
                                                           "SeriesInstanceUID"]}
Fetcher = Callable[[str], int]


class DicomWeb:
    """The handlers, bound to one (Database, Spool) and its options."""

    def __init__(self, db: Database, spool: Spool, *, receiver: Receiver | None = None,
                 bearer_tokens: list[str] | None = None, pn_case_sensitive: bool = False,
                 max_results: int = 0, max_limit: int = QIDO_MAX_LIMIT,
                 fetcher: Fetcher | None = None, base_url: str = "/dicom-web",
                 spill_above: int = SPILL_ABOVE):
        self.db = db
        self.spill_above = spill_above
        self.spool = spool
        self.receiver = receiver
        self.bearer_tokens = [t.encode() for t in (bearer_tokens or [])]
        self.pn_case_sensitive = pn_case_sensitive
        self.max_results = max_results
        self.max_limit = max_limit
        self.fetcher = fetcher
        self.base_url = base_url

    # -- access -------------------------------------------------------------------------

    def actor_of(self, request: Request) -> str:
        """Who asks, for the audit; raises 401 when a bearer token is required and wrong."""
        if not self.bearer_tokens:
            return "anonymous"
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Every token is compared (no early exit: the time taken says nothing of which one).
        matches = [secrets.compare_digest(token.strip().encode(), known)
                   for known in self.bearer_tokens]
        if scheme.lower() != "bearer" or not any(matches):
            raise HttpProblem(401, "a valid bearer token is required (Authorization: Bearer)")
        # Named by its place in serving.bearer_tokens: a hash of the token itself (it was
        # the first 12 hex digits of its SHA-256) let anyone who reads the audit trail, in
        # the journal or at the ATNA collector, check guesses of a token chosen by a person.
        return f"bearer:token-{matches.index(True) + 1}"

    def record(self, request: Request, event: str, actor: str, target: str | None,
               outcome: str, detail: str | None = None, limit: int = 500,
               sop_class: str | None = None) -> None:
        # A search's row keeps the request as asked, its path and query string (the ATNA
        # Query message's ParticipantObjectQuery, as dcm4chee's audit gives a QIDO-RS one).
        asked = None
        if event == "query":
            asked = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            audit.record(self.db, event, actor=actor,
                         source=request.client.host if request.client else None,
                         target=target[:limit] if target else None, outcome=outcome,
                         detail=detail, sop_class=sop_class,
                         query=asked.encode()[:4096] if asked else None)
        except Exception:
            log.exception("audit record failed")

    # -- QIDO-RS ------------------------------------------------------------------------

    async def qido(self, request: Request) -> Response:
        """A QIDO-RS search, its body written a page of rows at a time as it is sent: a
        search within one study is not capped (fetch-through lists a study that way), and
        the whole answer built first took a 200,001-instance study's daemon up by 1,582 MB.
        What cannot be answered (a bad key or value) is refused before the first byte; the
        access row is written when the last byte was taken, with the number sent."""
        path = request.path_params
        level = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}[
            request.scope["route_level"]]
        actor = None
        try:
            actor = self.actor_of(request)
            require_dicom_json(request.headers.get("accept", ""))
            _one_uid_each(path)
            fuzzy = _fuzzy(request)
            unsupported: list[str] = []
            keys = self._qido_keys(request, level, path, unsupported)
            limit = _int_param(request, "limit", positive=True)
            offset = _int_param(request, "offset") or 0
            cap = self.max_results or self._cap(limit, confined="study" in path)
            capped = cap is not None and (limit is None or limit > cap)
            if capped:
                limit = cap
            pages = self._pages(level, keys, limit, offset)
            first = await run_in_threadpool(self._first_page, pages)
            # Whether the server cut the answer short: one match past the cap, asked before
            # the headers go (the Warning below is one of them).
            truncated = capped and limit is not None and await run_in_threadpool(
                self._any_past, level, keys, min(offset + limit, _SQLITE_MAX_INT))
        except HttpProblem as exc:
            if actor is not None:  # a search refused as asked: audited, as C-FIND's are
                # Its keys as a search's row says them (``LEVEL Key=value ...``, what
                # pas audit --patient reads): the query string as it came, joined by "&",
                # made "PatientID=A002304&limit=abc" patient 'A002304&limit=abc'.
                asked = " ".join(f"{k}={v}" for k, v in request.query_params.multi_items())
                self.record(request, "query", actor, f"{level} {asked}".strip(),
                            f"failure: {exc.detail}"[:300], "refused (QIDO-RS)",
                            sop_class=QIDO_SOP_CLASS)
            return _problem(exc)
        warnings: list[str] = []
        service = f"{request.url.scheme}://{request.url.netloc}{self.base_url}"
        notes = ""
        if truncated:
            warnings.append(TRUNCATED.format(service=service))
            notes = ", truncated at the server's limit"
        if fuzzy:
            warnings.append(NOT_FUZZY.format(service=service))
        ignored = [k for k, v in keys.items() if v and not store_query.available(k, level)]
        if ignored:
            warnings.append(NOT_MATCHED.format(service=service, names=", ".join(ignored)))
            notes += f", not matched on {', '.join(ignored)}"
        if unsupported:
            names = ", ".join(_shown(n) for n in unsupported[:MAX_NAMED])
            if len(unsupported) > MAX_NAMED:
                names += f" and {len(unsupported) - MAX_NAMED} more"
            warnings.append(NOT_SUPPORTED.format(service=service, names=names))
            notes += f", ignored parameters {names}"
        headers = {"Warning": ", ".join(warnings)} if warnings else {}
        target = store_query_summary(level, keys)
        sent = [0]

        def ended(problem: str | None) -> None:
            # QIDO-RS searches the Study Root information model (PS3.18 10.6): the ATNA
            # Query message names its FIND SOP Class as what was queried.
            detail = f"{counted(sent[0], 'result')} (QIDO-RS){notes}"
            self.record(request, "query", actor or "anonymous", target,
                        "success" if problem is None else f"failure: {problem}", detail,
                        sop_class=QIDO_SOP_CLASS)

        body = self._json_array(level, keys, first, pages, sent)
        return ClosingStream(ReportedEnd(body, ended), media_type=DICOM_JSON, headers=headers)

    def _pages(self, level: str, keys: dict[str, str], limit: int | None,
               offset: int) -> Iterator[list[dict[str, Any]]]:
        return store_query.find_pages(self.db, level, keys, page_size=QIDO_PAGE, limit=limit,
                                      offset=offset,
                                      pn_case_sensitive=self.pn_case_sensitive)

    @staticmethod
    def _first_page(pages: Iterator[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The first page of a search (empty: nothing matched); HttpProblem 400 naming what
        the index cannot answer."""
        try:
            return next(pages, [])
        except store_query.QueryError as exc:
            raise HttpProblem(400, str(exc)) from None

    def _any_past(self, level: str, keys: dict[str, str], skipped: int) -> bool:
        """Whether a match exists past the first ``skipped`` ones. Only the matching keys
        are selected: the computed return keys of the skipped rows are never worked out."""
        matching = {k: v for k, v in keys.items() if v}
        try:
            return any(True for _ in store_query.find(
                self.db, level, matching, limit=1, offset=skipped,
                pn_case_sensitive=self.pn_case_sensitive))
        except store_query.QueryError as exc:
            raise HttpProblem(400, str(exc)) from None

    def _json_array(self, level: str, keys: dict[str, str], first: list[dict[str, Any]],
                    pages: Iterator[list[dict[str, Any]]], sent: list[int]) -> Iterator[bytes]:
        """The DICOM JSON array of a search, one page of objects per chunk (encoded as
        Starlette's JSONResponse did: compact, UTF-8); ``sent[0]`` counts the objects."""
        yield b"["
        specs = self._specs(level, keys)
        memo: dict[tuple[int, type, Any], dict[str, Any]] = {}
        for page in itertools.chain([first], pages):
            if not page:
                continue
            if len(memo) > MEMO_MAX:
                memo.clear()
            text = ",".join(json.dumps(self._json(level, keys, row, specs, memo),
                                       ensure_ascii=False,
                                       allow_nan=False, separators=(",", ":"))
                            for row in page)
            chunk = (b"," if sent[0] else b"") + text.encode()
            sent[0] += len(page)  # handed to the server to send
            yield chunk
        yield b"]"

    def _cap(self, limit: int | None, confined: bool) -> int | None:
        """The most results a search may return with ``serving.max_results`` at 0: a search
        within a study is bounded by the study; any other gets the default page without a
        limit, and at most ``max_limit`` with one."""
        if confined:
            return None
        return self.max_limit if limit is not None else min(QIDO_DEFAULT_LIMIT, self.max_limit)

    def _qido_keys(self, request: Request, level: str, path: dict[str, str],
                   unsupported: list[str]) -> dict[str, str]:
        """Matching and return keys of a QIDO-RS search. The defaults are those of PS3.18
        10.6.3.3: a series or instance search also returns the Study attributes unless the
        study is in the path, and an instance search the Series attributes unless the series
        is (a worklist built from /instances needs Modality and SeriesNumber). A parameter
        or include field that is no attribute is ignored (PS3.18 8.3), its name added to
        ``unsupported``."""
        keys = {k: "" for k in DEFAULT_RETURN[level]}
        for parent in _PARENT_KEYS.get(level, []):
            keys.setdefault(parent, "")
        above = {"STUDY": [], "SERIES": ["STUDY"], "IMAGE": ["STUDY", "SERIES"]}[level]
        for upper in above:
            if upper.lower() not in path:
                for k in DEFAULT_RETURN[upper]:
                    keys.setdefault(k, "")
        matched: dict[str, str] = {}
        for name, value in request.query_params.multi_items():
            if name in ("limit", "offset", "fuzzymatching", "includefield"):
                if name == "includefield":
                    for field in (f.strip() for f in value.split(",")):
                        if field == "all":
                            for keyword in _all_of(level):
                                keys.setdefault(keyword, "")
                        elif included := _attribute(field):
                            keys.setdefault(included, "")
                        elif field and field not in unsupported:
                            unsupported.append(field)
                continue
            keyword = _attribute(name)
            if not keyword:
                if name and name not in unsupported:  # "?=x&" names nothing
                    unsupported.append(name)
                continue
            if keyword in matched:  # the last one was applied, without a word
                raise HttpProblem(400, f"{keyword}: given more than once ({matched[keyword]!r} "
                                       f"and {value!r}); give it once (a list: a,b)")
            matched[keyword] = value
            keys[keyword] = _value_list(keyword, value, level)
        if "study" in path:
            keys["StudyInstanceUID"] = path["study"]
        if "series" in path:
            keys["SeriesInstanceUID"] = path["series"]
        return keys

    @staticmethod
    def _specs(level: str, keys: dict[str, str]) -> list[tuple[str, int, str]]:
        """(keyword, tag, VR) of each key a search's objects carry, worked out once per
        search rather than once per row."""
        specs = []
        for keyword in keys:
            if store_query.available(keyword, level):
                tag = tag_for_keyword(keyword)
                specs.append((keyword, tag, dictionary_VR(tag)))
        return specs

    def _json(self, level: str, keys: dict[str, str], row: dict[str, Any],
              specs: list[tuple[str, int, str]] | None = None,
              memo: dict[tuple[int, type, Any], dict[str, Any]] | None = None) -> dict[str, Any]:
        """One search result as a DICOM JSON object: each element made and written as
        dataset_json does (element_json, ascending tag order), without a Dataset between
        (its attribute checks cost a third of a 50,001-result answer's time). ``memo``: the
        attribute objects already made in this search, by tag and stored value (and its type)."""
        attributes: dict[str, dict[str, Any]] = {}
        for keyword, tag, vr in specs if specs is not None else self._specs(level, keys):
            value = row.get(keyword)
            if value is None and keyword in TYPE_C:
                continue
            attributes[f"{tag:08X}"] = _json_attribute(tag, vr, value, memo)
        if "InstanceAvailability" in keys:
            attributes[INSTANCE_AVAILABILITY] = ONLINE
        study = row.get("StudyInstanceUID")
        if study:
            url = f"{self.base_url}/studies/{study}"
            if level != "STUDY" and row.get("SeriesInstanceUID"):
                url += f"/series/{row['SeriesInstanceUID']}"
            if level == "IMAGE" and row.get("SOPInstanceUID"):
                url += f"/instances/{row['SOPInstanceUID']}"
            attributes[RETRIEVE_URL] = element_json(DataElement(0x00081190, "UR", url))
        # a stored "DOE^JOHN\\" no longer cuts the answer (element_json)
        return dict(sorted(attributes.items()))


def _json_attribute(tag: int, vr: str, value: Any,
                    memo: dict[tuple[int, type, Any], dict[str, Any]] | None) -> dict[str, Any]:
    """The DICOM JSON attribute object of a stored value (a text holding backslashes is a
    multi-valued one; none or empty, an empty attribute). The results of one search share
    most of their values (their study's and series' columns, the image attributes): with
    ``memo`` each distinct value is made into a DataElement, checked and converted once per
    search, not once per result (which was most of a 50,001-result answer's time). The
    objects are read-only from here: only json.dumps reads them."""
    if memo is not None:
        found = memo.get((tag, type(value), value))
        if found is not None:
            return found
    stored = value
    if isinstance(value, str) and "\\" in value:
        value = value.split("\\")
    made = element_json(DataElement(tag, vr, None if value in (None, "") else value))
    if memo is not None:
        memo[(tag, type(stored), stored)] = made
    return made


def _value_list(keyword: str, value: str, level: str) -> str:
    """A matching key's value with its comma-separated list, if it is one, in the index's
    form (values separated by a backslash, PS3.4's), each value stripped of its spaces.

    PS3.18 8.3.4.1 writes a list of values with commas (``uid-list-match = attribute "="
    1#value``; the backslash form, ``CT%5CMR``, is PS3.4's, also taken), a form its grammar
    names for UIDs; Orthanc's DICOMweb plugin takes one for any attribute, and viewers
    send ``ModalitiesInStudy=CT,MR``, which PAS read as the one modality "CT,MR": a 200 with
    no study, where the backslash form answered every CT and MR study. A comma is read as
    the separator where the index matches a list (any of the values: List of UID Matching,
    and for codes and identifiers as a C-FIND's ``CT\\MR``) and a value cannot or hardly
    holds one: UIDs and code strings (UI, CS: their repertoires have no comma) and
    identifiers (SH, and LO keys named ``...ID``: PatientID, IssuerOfPatientID; a literal
    comma in one is matched by ``?``). Read literally, where a comma is part of the value:
    a person name (``DOE, JOHN`` as some systems write it; its components are separated
    by ``^``, and a name key takes one value, a list of them is refused by the index) and
    free text (StudyDescription, SeriesDescription: ``THORAX, ABDOMEN``). A date, a time or
    a number has no list matching in PS3.4 (a range is written ``a-b``) and cannot hold a
    comma: 400 naming the key, rather than "not a valid value". A key PAS does not match
    at this level is left as given (it is ignored and named in a Warning)."""
    if "," not in value:
        return value
    tag = tag_for_keyword(keyword)  # None: a private tag or a sequence path
    if tag is None or not store_query.available(keyword, level):
        return value
    vr = dictionary_VR(tag)
    if vr in ("UI", "CS", "SH") or (vr == "LO" and keyword.endswith("ID")):
        return "\\".join(v.strip() for v in value.split(","))
    if vr in _NO_LIST:
        hint = " (a range: a-b)" if vr in ("DA", "TM", "DT") else ""
        raise HttpProblem(400, f"{keyword}: {value[:80]!r} is a list; a list of values (a,b) "
                               f"is matched for UIDs, codes and identifiers, not for "
                               f"{_NO_LIST[vr]}{hint}")
    return value


# Value representations without list matching, whose values hold no comma (_value_list).
_NO_LIST = {"DA": "a date", "TM": "a time", "DT": "a date and time", "IS": "an integer",
            "US": "an integer", "DS": "a decimal number"}


def _all_of(level: str) -> list[str]:
    """What ``includefield=all`` adds: every attribute of the level searched that the index
    holds, a study search's including the patient's (PS3.18 10.6.3.3.1: the Optional Keys of
    the Patient and Study levels "supported by the origin server"). It added nothing: a
    study search with it lacked IssuerOfPatientID, SOPClassesInStudy and the
    NumberOfPatientRelated* counts that the same search naming them returns."""
    owners = ("PATIENT", "STUDY") if level == "STUDY" else (level,)
    return [keyword for keyword in (*store_query.COLUMNS, *store_query.COMPUTED)
            if store_query.level_of(keyword) in owners]


def store_query_summary(level: str, keys: dict[str, str]) -> str:
    return f"{level} " + " ".join(f"{k}={v}" for k, v in keys.items() if v)


def _level(level: str, endpoint: Callable[[Request], Any]) -> Callable[[Request], Any]:
    async def handler(request: Request) -> Response:
        request.scope["route_level"] = level
        return await endpoint(request)  # type: ignore[no-any-return]
    return handler


def build_dicomweb_routes(db: Database, spool: Spool, *, receiver: Receiver | None = None,
                          bearer_tokens: list[str] | None = None, pn_case_sensitive: bool = False,
                          max_results: int = 0, max_limit: int = QIDO_MAX_LIMIT,
                          fetcher: Fetcher | None = None, prefix: str = "/dicom-web",
                          spill_above: int = SPILL_ABOVE) -> list[BaseRoute]:
    """The DICOMweb routes under ``prefix`` over any (Database, Spool).

    ``receiver`` enables STOW-RS; ``bearer_tokens`` (non-empty) requires one of them on every
    request; ``fetcher`` (study UID -> instances fetched) is asked for a study not on site."""
    web = DicomWeb(db, spool, receiver=receiver, bearer_tokens=bearer_tokens,
                   pn_case_sensitive=pn_case_sensitive, max_results=max_results,
                   max_limit=max_limit, fetcher=fetcher, base_url=prefix,
                   spill_above=spill_above)
    wado = WadoRs(web)
    stow = StowRs(web)
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    routes = [
        Route("/studies", _level("studies", web.qido), methods=["GET"]),
        Route("/studies", stow.stow, methods=["POST"]),
        Route(study, stow.stow, methods=["POST"]),
        Route("/series", _level("series", web.qido), methods=["GET"]),
        Route("/instances", _level("instances", web.qido), methods=["GET"]),
        Route(study + "/series", _level("series", web.qido), methods=["GET"]),
        Route(study + "/instances", _level("instances", web.qido), methods=["GET"]),
        Route(series + "/instances", _level("instances", web.qido), methods=["GET"]),
        Route(study, wado.retrieve, methods=["GET"]),
        Route(series, wado.retrieve, methods=["GET"]),
        Route(instance, wado.retrieve, methods=["GET"]),
        Route(study + "/metadata", wado.metadata, methods=["GET"]),
        Route(series + "/metadata", wado.metadata, methods=["GET"]),
        Route(instance + "/metadata", wado.metadata, methods=["GET"]),
        Route(instance + "/frames/{frames}", wado.frames, methods=["GET"]),
        Route(instance + "/bulkdata/{tag}", wado.bulkdata, methods=["GET"]),
        Route(instance + "/rendered", wado.rendered, methods=["GET"]),
        Route(study + "/thumbnail", wado.thumbnail, methods=["GET"]),
        Route(series + "/thumbnail", wado.thumbnail, methods=["GET"]),
        Route(instance + "/thumbnail", wado.thumbnail, methods=["GET"]),
        # {frame}, not {frame:int}: Starlette's int() of 4301 digits raised in the routing
        # (a 500, no audit row); the handler reads it as /frames reads its list.
        Route(instance + "/frames/{frame}/rendered", wado.rendered, methods=["GET"]),
    ]
    return [Mount(prefix, routes=routes)]


def daemon_routes(daemon: Daemon) -> list[BaseRoute]:
    """The appliance's /dicom-web, configured from ``[serving]``."""
    serving = daemon.settings.serving
    return build_dicomweb_routes(
        daemon.db, daemon.spool, receiver=daemon.receiver,
        bearer_tokens=serving.bearer_tokens if serving.auth == "bearer" else None,
        pn_case_sensitive=serving.pn_case_sensitive, max_results=serving.max_results,
        max_limit=serving.qido_max_limit,
        spill_above=daemon.settings.dicom.spill_above_mb << 20,
        fetcher=getattr(daemon.qr, "fetcher", None) if serving.fetch_through else None,
    )
