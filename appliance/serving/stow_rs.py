"""STOW-RS over a (Database, Spool): a multipart/related body read as it arrives, each part
filed through :class:`~appliance.ingest.receive.Receiver` (the same durability as C-STORE: a
part is reported stored only after fsync + commit), the response's SOP sequences, and the
request's one ``store`` audit row, written however the request ends (stored, refused,
malformed, its client gone away; a kill -9 leaves its open note, written at the next start).

Split from ``dicomweb.py``, which keeps the routes, QIDO-RS and the access check this module
calls (``DicomWeb.actor_of``, ``DicomWeb.record``); the parts as they arrive and the request's
open note are ``stow_parts.py``'s, the request parsing ``dicomweb_http.py``'s. May not touch:
SQL, spool writes (the receiver's).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from appliance.ingest.attributes import InvalidInstance, OtherStudy
from appliance.serving.dicomweb_http import _boundary, _one_uid_each, _problem, _sop_item
from appliance.serving.stow_parts import (
    BodyStart,
    NotPart10,
    OpenNote,
    Part,
    SpilledPart,
    discard_parts,
)
from appliance.serving.wado_media import HttpProblem, require_dicom_json
from appliance.serving.wado_rs import DICOM_JSON
from appliance.store import audit
from appliance.store.spool import SpoolFull
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.serving.dicomweb import DicomWeb

log = logging.getLogger("pas.dicomweb")

# How long a STOW-RS store row's target may grow: the list of studies, as a C-STORE
# association's row (appliance/ingest/scp.py), cut between UIDs, never inside one.
STORE_TARGET_MAX = audit.STUDY_LIST_MAX
MAX_REFUSALS_LOGGED = 5  # a STOW-RS request's refused parts named in the journal, one a line


class StowRs:
    """The STOW-RS handler of one :class:`~appliance.serving.dicomweb.DicomWeb`: its
    receiver, spill threshold, base URL, access check and audit."""

    def __init__(self, web: DicomWeb):
        self.web = web

    async def stow(self, request: Request) -> Response:
        try:
            actor = self.web.actor_of(request)
        except HttpProblem as exc:  # refused access: the security row is the middleware's
            return _problem(exc)
        try:
            if self.web.receiver is None:
                raise HttpProblem(405, "STOW-RS is not offered here")
            # The answer (PS3.18 10.5.3) is DICOM JSON, as QIDO-RS's: an XML client's
            # Accept got it under a 200, its instances stored and an answer it could not
            # read. Refused before the body is read: nothing is stored.
            require_dicom_json(request.headers.get("accept", ""))
            _one_uid_each(request.path_params)
            boundary = _boundary(request.headers.get("content-type", ""))
        except HttpProblem as exc:  # a store refused as asked: audited, as QIDO's are
            self._audit_store(request, actor, [], f"failure: {exc.detail}"[:300])
            return _problem(exc)
        parts: list[bytes | SpilledPart | NotPart10] = []
        current: list[Part] = []
        ended: list[bool] = []
        callbacks = {
            "on_part_begin": lambda: current.append(Part(self.web.receiver, self.web.spill_above)),
            "on_part_data": lambda data, start, end: current[-1].add(data[start:end]),
            "on_part_end": lambda: parts.append(current.pop().done()),
            "on_end": lambda: ended.append(True),
        }
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        stored: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        source = request.client.host if request.client else None
        note = OpenNote(self.web.db, actor, source)
        target = request.path_params.get("study")  # POST /studies/{study}: only that study
        start = BodyStart(boundary)  # a preamble before the first boundary is skipped
        try:
            async for chunk in request.stream():
                parser.write(start.feed(chunk))
                while parts:  # one instance at a time: memory bounded by the largest one
                    await run_in_threadpool(self._store_part, parts.pop(0), actor, source,
                                            stored, failed, target, note)
            start.finish()
            parser.finalize()
            if not ended:  # a cut body: its last part may be cut too, so none is trusted
                raise MultipartParseError("the body ends before its closing boundary")
        except MultipartParseError as exc:
            discard_parts(parts, current)
            return self._malformed(request, actor, stored, str(exc), note)
        except ClientDisconnect:
            discard_parts(parts, current)  # no spill file is left behind
            return self._cut(request, actor, stored, source, note)
        except Exception as exc:
            discard_parts(parts, current)
            self._audit_store(request, actor, stored, f"failure: {exc}"[:300], note)
            raise
        except BaseException:  # cancelled: the daemon stops, the note's row comes at start
            discard_parts(parts, current)
            raise
        while parts:
            await run_in_threadpool(self._store_part, parts.pop(0), actor, source, stored,
                                    failed, target, note)
        if not stored and not failed:
            self._audit_store(request, actor, [], "failure: the request holds no DICOM part",
                              note)
            return _problem(HttpProblem(400, "the request holds no DICOM part"))
        result = Dataset()
        result.ReferencedSOPSequence = [_sop_item(s["uid"], s["sop_class"], s["url"])
                                        for s in stored]
        if failed:
            result.FailedSOPSequence = [_sop_item(**f) for f in failed]
        status = 200 if not failed else (202 if stored else 409)
        if failed and not stored and all(f["reason"] == 0xA700 for f in failed):
            status = 507  # Insufficient Storage: the spool is at its hard limit; retry later
        for refused in failed[:MAX_REFUSALS_LOGGED]:
            log.warning("STOW-RS from %s (%s): part refused (0x%04X): %s", source, actor,
                        refused["reason"], refused["note"])
        if len(failed) > MAX_REFUSALS_LOGGED:
            log.warning("STOW-RS from %s (%s): %s refused besides", source, actor,
                        counted(len(failed) - MAX_REFUSALS_LOGGED, "more part"))
        # The answer gives each refused part's FailureReason only: why is said here, in
        # the journal and the audit row (the first reason), for whoever looks into it.
        self._audit_store(request, actor, stored, "success" if not failed
                          else f"failure: {counted(len(failed), 'part')} refused (first: "
                               f"{failed[0]['note'][:200]})", note)
        return JSONResponse(result.to_json_dict(), status_code=status, media_type=DICOM_JSON)

    def _malformed(self, request: Request, actor: str, stored: list[dict[str, Any]],
                   reason: str, note: OpenNote | None = None) -> Response:
        """400 for a body that is not valid multipart (invariant 7: the problem is named).
        Parts complete after the error are not stored; those stored before it, from earlier
        chunks of the stream, are durable already and are listed so the client knows."""
        detail = f"malformed multipart body: {reason}"
        self._audit_store(request, actor, stored, "failure: malformed multipart body", note)
        body: dict[str, Any] = {"error": 400, "detail": detail}
        if stored:
            body["stored"] = [s["uid"] for s in stored]
        return JSONResponse(body, status_code=400)

    def _cut(self, request: Request, actor: str, stored: list[dict[str, Any]],
             source: str | None, note: OpenNote) -> Response:
        """The client went away before the end of the body (a viewer's tab closed, a network
        drop). The parts filed before are durable and listed: the request's ``store`` row
        names them, as a C-STORE association's row does when it is aborted. It had no row
        at all (instances found by QIDO-RS, in no ``pas audit``), and the journal an ERROR
        traceback (starlette's ``ClientDisconnect``) for a client's own choice."""
        reason = "the client went away before the end of the body"
        log.warning("STOW-RS from %s (%s): %s, after %s", source, actor, reason,
                    counted(len(stored), "part") + " stored")
        self._audit_store(request, actor, stored, f"failure: {reason}", note)
        return _problem(HttpProblem(400, reason))  # never sent: nobody reads it

    def _store_part(self, content: bytes | SpilledPart | NotPart10, actor: str,
                    source: str | None, stored: list[dict[str, Any]],
                    failed: list[dict[str, Any]], target: str | None = None,
                    note: OpenNote | None = None) -> None:
        """File one part. What the answer names (SOP Class, series, study) comes from the
        receiver's record: the part is parsed once, where it lies (a deflated one is not
        inflated again in memory by a second read of pydicom's)."""
        assert self.web.receiver is not None
        if isinstance(content, NotPart10):  # refused as it arrived (stow_parts.Part)
            failed.append({"uid": "", "sop_class": "", "reason": 0xC000,
                           "note": content.reason})
            return
        if note is not None:  # before the first filing: a kill -9 after it leaves a row
            note.ensure()
        try:
            if isinstance(content, SpilledPart):
                received = self.web.receiver.receive_spilled_file(
                    content.spill, content.digest, calling_ae=actor, source=source,
                    expect_study_uid=target)
            else:
                received = self.web.receiver.receive_file(content, calling_ae=actor,
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
                       "url": f"{self.web.base_url}/studies/{received.study_uid}/series/"
                              f"{received.series_uid}/instances/{received.sop_instance_uid}"})

    def _audit_store(self, request: Request, actor: str, stored: list[dict[str, Any]],
                     outcome: str, note: OpenNote | None = None) -> None:
        """The ``store`` row of one STOW-RS request. Its target is the studies stored (as
        a C-STORE association's row): ``pas audit --study`` and the ATNA Study objects read
        targets as Study Instance UIDs, and the row used to list SOP Instance UIDs, which
        neither could find. No study when nothing was stored (a C-STORE row's NULL).
        ``note``: the request's open note, closed in the row's transaction."""
        target, left_out = audit.study_list({s["study"] for s in stored}, STORE_TARGET_MAX)
        detail = f"{len(stored)} stored (STOW-RS)"
        if left_out:
            detail += f", {counted(left_out, 'more study', 'more studies')} not listed"
        if note is None or not note.id:
            self.web.record(request, "store", actor, target, outcome, detail,
                        limit=STORE_TARGET_MAX)
            return
        try:
            audit.association_closed(self.web.db, note.id, actor=actor, source=note.source,
                                     target=target, outcome=outcome, detail=detail)
        except Exception:  # the note stays: its row is written at the next start
            log.exception("audit record failed")
