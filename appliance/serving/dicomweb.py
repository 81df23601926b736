"""DICOMweb over a (Database, Spool): QIDO-RS, WADO-RS and STOW-RS as Starlette routes.

Owns: the HTTP shape of DICOMweb (PS3.18): query parameters to matching keys, DICOM JSON,
multipart/related bodies (streamed from the spool file by file: bounded memory; a STOW-RS
part above ``spill_above`` goes to a spool temp file as it arrives, stow_parts.py), frames and
rendered JPEG/PNG (the pixel and transfer-syntax work itself is in ``wado_media.py``),
STOW-RS responses, the bearer-token check, and the access audit of each query, retrieve and
store. The parsing and bodies that need no handler state (parameters, the STOW boundary,
problem and octet-stream answers, SOP items) are ``dicomweb_http.py``'s.
:func:`build_dicomweb_routes` works over any (Database, Spool), so the hub's embedded archive
can serve the same API. May not touch: SQL (``store/query.py``), spool writes (STOW goes
through :class:`~appliance.ingest.receive.Receiver`, so the same durability rules as C-STORE
apply: a part is reported stored only after fsync + commit).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from appliance.ingest.attributes import InvalidInstance, OtherStudy
from appliance.serving.dicomweb_http import (
    CHUNK,
    ClosingStream,
    ReportedEnd,
    _boundary,
    _file_part,
    _int_param,
    _keyword,
    _octet_parts,
    _problem,
    _sop_item,
    _stream_part,
)
from appliance.serving.stow_parts import Part, SpilledPart, discard_parts
from appliance.serving.wado_media import (
    DecodedPixels,
    HttpProblem,
    accepted_syntaxes,
    frame_list,
    metadata_item,
    part_syntax,
    read_bulkdata,
    read_frames,
    render,
)
from appliance.store import audit
from appliance.store import query as store_query
from appliance.store.db import Database
from appliance.store.spool import Spool, SpoolFull
from appliance.store.transcode import open_transcoded
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.daemon import Daemon
    from appliance.ingest.receive import Receiver

log = logging.getLogger("pas.dicomweb")

DICOM_JSON = "application/dicom+json"
# A STOW-RS part larger than this goes to a spool temp file as it arrives (the appliance
# passes its ``dicom.spill_above_mb``): a 300 MB part took the daemon up by 612 MB.
SPILL_ABOVE = 32 << 20
# Most results of a QIDO-RS search not confined to one study when the client names no limit
# (and serving.max_results is 0): one unbounded /instances on a big cache ran for minutes and
# held every row. Searches within a study (/studies/{s}/...) are bounded by the study, and
# fetch-through lists a study's instances that way without paging, so they are not capped.
QIDO_DEFAULT_LIMIT = 1000
# The most an explicit limit gets on such a search (serving.qido_max_limit): limit=100000000
# was unbounded. Both caps answer with the Warning below, so that the client pages on.
QIDO_MAX_LIMIT = 10000
# How long a STOW-RS store row's target may grow: the list of studies, as a C-STORE
# association's row (appliance/ingest/scp.py), cut between UIDs, never inside one.
STORE_TARGET_MAX = 4000
# PS3.18 8.3.4.4: what a server that limited the results answers.
TRUNCATED = ('299 {service}: "The number of results exceeded the maximum supported by the '
             'server. Additional results can be requested."')

# Attributes QIDO-RS returns by default per level (PS3.18 table 10.6.3-3..5).
DEFAULT_RETURN = {
    "STUDY": ["StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances", "StudyDescription"],
    "SERIES": ["Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
               "BodyPartExamined", "NumberOfSeriesRelatedInstances"],
    "IMAGE": ["SOPClassUID", "SOPInstanceUID", "InstanceNumber"],
}
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

    def _actor(self, request: Request) -> str:
        """Who asks, for the audit; raises 401 when a bearer token is required and wrong."""
        if not self.bearer_tokens:
            return "anonymous"
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not any(
                secrets.compare_digest(token.strip().encode(), known)
                for known in self.bearer_tokens):
            raise HttpProblem(401, "a valid bearer token is required (Authorization: Bearer)")
        return "bearer:" + hashlib.sha256(token.strip().encode()).hexdigest()[:12]

    def _audit(self, request: Request, event: str, actor: str, target: str | None,
               outcome: str, detail: str | None = None, limit: int = 500) -> None:
        try:
            audit.record(self.db, event, actor=actor,
                         source=request.client.host if request.client else None,
                         target=target[:limit] if target else None, outcome=outcome,
                         detail=detail)
        except Exception:
            log.exception("audit record failed")

    def _audit_store(self, request: Request, actor: str, stored: list[dict[str, Any]],
                     outcome: str) -> None:
        """The ``store`` row of one STOW-RS request. Its target is the studies stored (as
        a C-STORE association's row): ``pas audit --study`` and the ATNA Study objects read
        targets as Study Instance UIDs, and the row used to list SOP Instance UIDs, which
        neither could find. No study when nothing was stored (a C-STORE row's NULL)."""
        target, left_out = _study_list({s["study"] for s in stored}, STORE_TARGET_MAX)
        detail = f"{len(stored)} stored (STOW-RS)"
        if left_out:
            detail += f", {counted(left_out, 'more study', 'more studies')} not listed"
        self._audit(request, "store", actor, target, outcome, detail, limit=STORE_TARGET_MAX)

    # -- QIDO-RS ------------------------------------------------------------------------

    async def qido(self, request: Request) -> Response:
        path = request.path_params
        level = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}[
            request.scope["route_level"]]
        try:
            actor = self._actor(request)
            keys = self._qido_keys(request, level, path)
            limit = _int_param(request, "limit", positive=True)
            offset = _int_param(request, "offset") or 0
            cap = self.max_results or self._cap(limit, confined="study" in path)
            capped = cap is not None and (limit is None or limit > cap)
            if capped:
                limit = cap
            # One row more than the cap tells whether the server cut the answer short.
            fetch = None if limit is None else limit + (1 if capped else 0)
            rows = await run_in_threadpool(self._find, level, keys, fetch, offset)
        except HttpProblem as exc:
            return _problem(exc)
        truncated = capped and limit is not None and len(rows) > limit
        headers: dict[str, str] = {}
        detail = f"{counted(len(rows), 'result')} (QIDO-RS)"
        if truncated:
            rows = rows[:limit]
            service = f"{request.url.scheme}://{request.url.netloc}{self.base_url}"
            headers["Warning"] = TRUNCATED.format(service=service)
            detail = f"{counted(len(rows), 'result')} (QIDO-RS), truncated at the server's limit"
        target = store_query_summary(level, keys)
        self._audit(request, "query", actor, target, "success", detail)
        return JSONResponse([self._json(level, keys, row) for row in rows],
                            media_type=DICOM_JSON, headers=headers)

    def _cap(self, limit: int | None, confined: bool) -> int | None:
        """The most results a search may return with ``serving.max_results`` at 0: a search
        within a study is bounded by the study; any other gets the default page without a
        limit, and at most ``max_limit`` with one."""
        if confined:
            return None
        return self.max_limit if limit is not None else min(QIDO_DEFAULT_LIMIT, self.max_limit)

    def _qido_keys(self, request: Request, level: str, path: dict[str, str]) -> dict[str, str]:
        """Matching and return keys of a QIDO-RS search. The defaults are those of PS3.18
        10.6.3.3: a series or instance search also returns the Study attributes unless the
        study is in the path, and an instance search the Series attributes unless the series
        is (a worklist built from /instances needs Modality and SeriesNumber)."""
        keys = {k: "" for k in DEFAULT_RETURN[level]}
        for parent in _PARENT_KEYS.get(level, []):
            keys.setdefault(parent, "")
        above = {"STUDY": [], "SERIES": ["STUDY"], "IMAGE": ["STUDY", "SERIES"]}[level]
        for upper in above:
            if upper.lower() not in path:
                for k in DEFAULT_RETURN[upper]:
                    keys.setdefault(k, "")
        for name, value in request.query_params.multi_items():
            if name in ("limit", "offset", "fuzzymatching", "includefield"):
                if name == "includefield" and value != "all":
                    for field in value.split(","):
                        keys.setdefault(_keyword(field.strip()), "")
                continue
            keyword = _keyword(name)
            if dictionary_VR(tag_for_keyword(keyword)) == "UI":
                value = value.replace(",", "\\")  # PS3.18 8.3.4.1: a UID list may use ","
            keys[keyword] = value
        if "study" in path:
            keys["StudyInstanceUID"] = path["study"]
        if "series" in path:
            keys["SeriesInstanceUID"] = path["series"]
        return keys

    def _find(self, level: str, keys: dict[str, str], limit: int | None,
              offset: int) -> list[dict[str, Any]]:
        try:
            return list(store_query.find(self.db, level, keys, limit=limit, offset=offset,
                                         pn_case_sensitive=self.pn_case_sensitive))
        except store_query.QueryError as exc:
            raise HttpProblem(400, str(exc)) from None

    def _json(self, level: str, keys: dict[str, str], row: dict[str, Any]) -> dict[str, Any]:
        ds = Dataset()
        for keyword in keys:
            if not store_query.available(keyword, level):
                continue
            value = row.get(keyword)
            tag = tag_for_keyword(keyword)
            vr = dictionary_VR(tag)
            if isinstance(value, str) and "\\" in value:
                value = value.split("\\")
            ds.add(DataElement(tag, vr, None if value in (None, "") else value))
        study = row.get("StudyInstanceUID")
        if study:
            url = f"{self.base_url}/studies/{study}"
            if level != "STUDY" and row.get("SeriesInstanceUID"):
                url += f"/series/{row['SeriesInstanceUID']}"
            if level == "IMAGE" and row.get("SOPInstanceUID"):
                url += f"/instances/{row['SOPInstanceUID']}"
            ds.RetrieveURL = url
        return ds.to_json_dict()

    # -- WADO-RS ------------------------------------------------------------------------

    def _rows(self, path: dict[str, str]) -> list[Any]:
        keys = {"StudyInstanceUID": path["study"]}
        level = "STUDY"
        if "series" in path:
            keys["SeriesInstanceUID"], level = path["series"], "SERIES"
        if "instance" in path:
            keys["SOPInstanceUID"], level = path["instance"], "IMAGE"
        failed: Exception | None = None
        if self.fetcher is not None and store_query.study_instance_count(
                self.db, path["study"]) == 0:
            try:
                self.fetcher(path["study"])
            except Exception as exc:
                log.warning("fetch-through of %s failed: %s", path["study"], exc)
                failed = exc
        try:
            rows = store_query.instances_for(self.db, level, keys)
        except store_query.QueryError as exc:
            raise HttpProblem(400, str(exc)) from None
        if not rows and failed is not None:
            # Not "no such instance": the region may well hold it, it could not be asked
            # (a WAN down); 503 tells a viewer to try again later.
            raise HttpProblem(503, f"study {path['study']} is not on site and the region "
                                   f"could not provide it: {failed}")
        if not rows:
            raise HttpProblem(404, f"no instance matches {'/'.join(path.values())}")
        store_query.touch_studies(self.db, [path["study"]], time.time())
        return rows

    async def retrieve(self, request: Request) -> Response:
        try:
            actor = self._actor(request)
            wanted = accepted_syntaxes(request.headers.get("accept", ""))
            rows = await run_in_threadpool(self._rows, dict(request.path_params))
            # Decided for every part before the first byte: a 406 cannot follow a 200.
            syntaxes = [part_syntax(wanted, row["transfer_syntax_uid"]) for row in rows]
        except HttpProblem as exc:
            return _problem(exc)
        target, sent = "/".join(request.path_params.values()), [0]

        def ended(problem: str | None) -> None:
            """The audit row, once the answer is over: what the viewer was sent."""
            if problem is None:
                self._audit(request, "retrieve", actor, target, "success",
                            f"{counted(len(rows), 'instance')} (WADO-RS)")
            else:
                self._audit(request, "retrieve", actor, target,
                            f"failure: {problem}, after {sent[0]} of "
                            f"{counted(len(rows), 'instance')}",
                            f"{sent[0]} of {counted(len(rows), 'instance')} (WADO-RS)")

        first: BinaryIO | Exception | None = None
        if syntaxes[0] != rows[0]["transfer_syntax_uid"]:
            # The first part's copy is made before the status line: a copy the spool has no
            # room for (its quota, the free-space floor) is then an answer the viewer can act
            # on (503, try later) instead of a 200 cut short. A later part's refusal can only
            # cut the answer (audited with what was sent).
            try:
                first = await run_in_threadpool(open_transcoded, self.spool,
                                                self.spool.path(rows[0]["path"]), syntaxes[0])
            except SpoolFull as exc:
                ended(str(exc))
                return _problem(HttpProblem(503, f"{exc}; try again later"))
            except Exception as exc:  # as before: the answer cut at its first part
                first = exc

        def finished(problem: str | None) -> None:
            if isinstance(first, io.IOBase):  # closed here too when never streamed (the
                first.close()  # client went first): its bytes and quota room go at once
            ended(problem)

        boundary = secrets.token_hex(16)
        return ClosingStream(ReportedEnd(self._multipart(rows, boundary, syntaxes, sent, first),
                                         finished),
                             media_type=('multipart/related; type="application/dicom"; '
                                         f"boundary={boundary}"))

    def _multipart(self, rows: list[Any], boundary: str, syntaxes: list[str],
                   sent: list[int], first: BinaryIO | Exception | None = None) -> Iterator[bytes]:
        """The parts; ``sent[0]`` counts those whose last bytes the server took. ``first``:
        the first part's copy in another syntax, made before the answer began (or why it
        could not be)."""
        for number, (row, syntax) in enumerate(zip(rows, syntaxes, strict=True)):
            yield (f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={syntax}"
                   "\r\n\r\n").encode()
            path = self.spool.path(row["path"])
            if syntax == row["transfer_syntax_uid"]:
                with open(path, "rb") as handle:
                    while chunk := handle.read(CHUNK):
                        yield chunk
            else:  # re-encoded into a temp file, streamed from it, gone once read or dropped
                if number == 0 and isinstance(first, Exception):
                    raise first
                copy = (first if number == 0 and first is not None
                        else open_transcoded(self.spool, path, syntax))
                with copy as handle:
                    while chunk := handle.read(CHUNK):
                        yield chunk
            yield b"\r\n"
            sent[0] += 1
        yield f"--{boundary}--\r\n".encode()

    async def metadata(self, request: Request) -> Response:
        try:
            actor = self._actor(request)
            rows = await run_in_threadpool(self._rows, dict(request.path_params))
            result = await run_in_threadpool(self._metadata, rows)
        except HttpProblem as exc:
            return _problem(exc)
        self._audit(request, "retrieve", actor, "/".join(request.path_params.values()),
                    "success", f"{counted(len(rows), 'instance')} (metadata)")
        return JSONResponse(result, media_type=DICOM_JSON)

    def _metadata(self, rows: list[Any]) -> list[dict[str, Any]]:
        result = []
        for row in rows:
            base = (f"{self.base_url}/studies/{row['study_uid']}/series/{row['series_uid']}"
                    f"/instances/{row['sop_instance_uid']}")
            item = metadata_item(self.spool.path(row["path"]), base)
            if row["transfer_syntax_uid"]:
                item["00020010"] = {"vr": "UI", "Value": [row["transfer_syntax_uid"]]}
            result.append(item)
        return result

    async def bulkdata(self, request: Request) -> Response:
        """One top-level bulk data attribute's bytes, where metadata's BulkDataURI points."""
        try:
            actor = self._actor(request)
            tag = request.path_params["tag"]
            if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag):
                raise HttpProblem(400, f"bulk data tag {tag!r}: 8 hexadecimal digits")
            rows = await run_in_threadpool(self._rows, dict(request.path_params))
            data = await run_in_threadpool(read_bulkdata, self.spool.path(rows[0]["path"]),
                                           int(tag, 16))
        except HttpProblem as exc:
            return _problem(exc)
        path = self.spool.path(rows[0]["path"])
        size = (data[1] if isinstance(data, tuple) else data.size
                if isinstance(data, DecodedPixels) else len(data))
        self._audit(request, "retrieve", actor, "/".join(request.path_params.values()),
                    "success", f"bulk data {size} bytes")
        if isinstance(data, DecodedPixels):  # compressed pixels, decoded as they are sent
            boundary = secrets.token_hex(16)
            return ClosingStream(_stream_part(data.chunks(), boundary), media_type=(
                'multipart/related; type="application/octet-stream"; '
                f"boundary={boundary}"))
        if isinstance(data, tuple):  # a large value as stored: streamed from the file
            boundary = secrets.token_hex(16)
            return ClosingStream(_file_part(path, *data, boundary), media_type=(
                'multipart/related; type="application/octet-stream"; '
                f"boundary={boundary}"))
        return _octet_parts([data])

    async def frames(self, request: Request) -> Response:
        try:
            actor = self._actor(request)
            numbers = frame_list(request.path_params["frames"])
            rows = await run_in_threadpool(self._rows, dict(request.path_params))
            frames = await run_in_threadpool(read_frames, self.spool.path(rows[0]["path"]),
                                             numbers)
        except HttpProblem as exc:
            return _problem(exc)
        self._audit(request, "retrieve", actor, "/".join(request.path_params.values()),
                    "success", counted(len(frames), "frame"))
        return _octet_parts(frames)

    async def rendered(self, request: Request) -> Response:
        try:
            actor = self._actor(request)
            accept = request.headers.get("accept", "image/jpeg")
            media = "image/png" if "image/png" in accept and "image/jpeg" not in accept \
                else "image/jpeg"
            frame = int(request.path_params.get("frame", "1"))
            viewport = request.query_params.get("viewport")
            rows = await run_in_threadpool(self._rows, dict(request.path_params))
            data = await run_in_threadpool(render, self.spool.path(rows[0]["path"]), frame,
                                           media, viewport)
        except (HttpProblem, ValueError) as exc:
            if not isinstance(exc, HttpProblem):
                exc = HttpProblem(400, str(exc))
            return _problem(exc)
        self._audit(request, "retrieve", actor,
                    "/".join(str(v) for v in request.path_params.values()),
                    "success", f"rendered {media}")
        return Response(data, media_type=media)

    # -- STOW-RS ------------------------------------------------------------------------

    async def stow(self, request: Request) -> Response:
        try:
            actor = self._actor(request)
            if self.receiver is None:
                raise HttpProblem(405, "STOW-RS is not offered here")
            boundary = _boundary(request.headers.get("content-type", ""))
        except HttpProblem as exc:
            return _problem(exc)
        parts: list[bytes | SpilledPart] = []
        current: list[Part] = []
        ended: list[bool] = []
        callbacks = {
            "on_part_begin": lambda: current.append(Part(self.receiver, self.spill_above)),
            "on_part_data": lambda data, start, end: current[-1].add(data[start:end]),
            "on_part_end": lambda: parts.append(current.pop().done()),
            "on_end": lambda: ended.append(True),
        }
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        stored: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        source = request.client.host if request.client else None
        target = request.path_params.get("study")  # POST /studies/{study}: only that study
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                while parts:  # one instance at a time: memory bounded by the largest one
                    await run_in_threadpool(self._store_part, parts.pop(0), actor, source,
                                            stored, failed, target)
            parser.finalize()
            if not ended:  # a cut body: its last part may be cut too, so none is trusted
                raise MultipartParseError("the body ends before its closing boundary")
        except MultipartParseError as exc:
            discard_parts(parts, current)
            return self._malformed(request, actor, stored, str(exc))
        except BaseException:  # the client went away: no spill file is left behind
            discard_parts(parts, current)
            raise
        while parts:
            await run_in_threadpool(self._store_part, parts.pop(0), actor, source, stored,
                                    failed, target)
        if not stored and not failed:
            return _problem(HttpProblem(400, "the request holds no DICOM part"))
        result = Dataset()
        result.ReferencedSOPSequence = [_sop_item(s["uid"], s["sop_class"], s["url"])
                                        for s in stored]
        if failed:
            result.FailedSOPSequence = [_sop_item(**f) for f in failed]
        status = 200 if not failed else (202 if stored else 409)
        if failed and not stored and all(f["reason"] == 0xA700 for f in failed):
            status = 507  # Insufficient Storage: the spool is at its hard limit; retry later
        self._audit_store(request, actor, stored, "success" if not failed
                          else f"failure: {counted(len(failed), 'part')} refused")
        return JSONResponse(result.to_json_dict(), status_code=status, media_type=DICOM_JSON)

    def _malformed(self, request: Request, actor: str, stored: list[dict[str, Any]],
                   reason: str) -> Response:
        """400 for a body that is not valid multipart (invariant 7: the problem is named).
        Parts complete after the error are not stored; those stored before it, from earlier
        chunks of the stream, are durable already and are listed so the client knows."""
        detail = f"malformed multipart body: {reason}"
        self._audit_store(request, actor, stored, "failure: malformed multipart body")
        body: dict[str, Any] = {"error": 400, "detail": detail}
        if stored:
            body["stored"] = [s["uid"] for s in stored]
        return JSONResponse(body, status_code=400)

    def _store_part(self, content: bytes | SpilledPart, actor: str, source: str | None,
                    stored: list[dict[str, Any]], failed: list[dict[str, Any]],
                    target: str | None = None) -> None:
        """File one part. What the answer names (SOP Class, series, study) comes from the
        receiver's record: the part is parsed once, where it lies (a deflated one is not
        inflated again in memory by a second read of pydicom's)."""
        assert self.receiver is not None
        try:
            if isinstance(content, SpilledPart):
                received = self.receiver.receive_spilled_file(
                    content.spill, content.digest, calling_ae=actor, source=source,
                    expect_study_uid=target)
            else:
                received = self.receiver.receive_file(content, calling_ae=actor,
                                                      source=source, expect_study_uid=target)
        except OtherStudy as exc:
            # PS3.18 10.5: a STOW to a study stores only that study's instances; filing
            # another study's instance under it would mislead. Refused, nothing written.
            other = exc.record
            failed.append({"uid": other.sop_instance_uid, "sop_class": other.sop_class_uid,
                           "reason": 0xA900, "note": f"belongs to study {other.study_uid}, "
                                                     f"not {target}"})
            return
        except InvalidInstance as exc:
            failed.append({"uid": "", "sop_class": "", "reason": 0xC000, "note": str(exc)})
            return
        except SpoolFull as exc:
            failed.append({"uid": "", "sop_class": "", "reason": 0xA700, "note": str(exc)})
            return
        except Exception as exc:
            log.exception("STOW-RS part failed")
            failed.append({"uid": "", "sop_class": "", "reason": 0x0110, "note": str(exc)})
            return
        stored.append({"uid": received.sop_instance_uid, "sop_class": received.sop_class_uid,
                       "study": received.study_uid,
                       "url": f"{self.base_url}/studies/{received.study_uid}/series/"
                              f"{received.series_uid}/instances/{received.sop_instance_uid}"})


def _study_list(studies: set[str], limit: int) -> tuple[str | None, int]:
    """The studies comma-joined in UID order, as many whole UIDs as ``limit`` characters
    hold (a UID cut in the middle would name another study, or none), and how many did not
    fit; None when there is no study."""
    joined = ""
    ordered = sorted(studies)
    for n, uid in enumerate(ordered):
        longer = f"{joined},{uid}" if joined else uid
        if len(longer) > limit:
            return joined or None, len(ordered) - n
        joined = longer
    return joined or None, 0


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
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    routes = [
        Route("/studies", _level("studies", web.qido), methods=["GET"]),
        Route("/studies", web.stow, methods=["POST"]),
        Route(study, web.stow, methods=["POST"]),
        Route("/series", _level("series", web.qido), methods=["GET"]),
        Route("/instances", _level("instances", web.qido), methods=["GET"]),
        Route(study + "/series", _level("series", web.qido), methods=["GET"]),
        Route(study + "/instances", _level("instances", web.qido), methods=["GET"]),
        Route(series + "/instances", _level("instances", web.qido), methods=["GET"]),
        Route(study, web.retrieve, methods=["GET"]),
        Route(series, web.retrieve, methods=["GET"]),
        Route(instance, web.retrieve, methods=["GET"]),
        Route(study + "/metadata", web.metadata, methods=["GET"]),
        Route(series + "/metadata", web.metadata, methods=["GET"]),
        Route(instance + "/metadata", web.metadata, methods=["GET"]),
        Route(instance + "/frames/{frames}", web.frames, methods=["GET"]),
        Route(instance + "/bulkdata/{tag}", web.bulkdata, methods=["GET"]),
        Route(instance + "/rendered", web.rendered, methods=["GET"]),
        Route(instance + "/thumbnail", web.rendered, methods=["GET"]),
        Route(instance + "/frames/{frame:int}/rendered", web.rendered, methods=["GET"]),
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
