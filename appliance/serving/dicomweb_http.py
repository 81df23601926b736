"""DICOMweb's request parsing and response bodies, with no handler state: what the routes in
``dicomweb.py`` and ``wado_rs.py`` read from a request and the bodies they answer with.

Owns: QIDO-RS parameter names to keywords (:func:`_attribute`) and integer parameters
(:func:`_int_param`, limit and offset, clamped to SQLite's integers), a STOW-RS request's
multipart boundary (:func:`_boundary`), the JSON answer to an :class:`HttpProblem`
(:func:`_problem`), multipart/related octet-stream parts (:func:`_file_part` streamed from a
file a megabyte at a time, :func:`_stream_part` from any chunks), the streamed answer that
closes its body however it ends (:class:`ClosingStream`), the body that reports how it ended
(:class:`ReportedEnd`, for the audit row the handler writes) and a STOW-RS response's SOP items
(:func:`_sop_item`). Split from ``dicomweb.py``, which keeps the routes, QIDO-RS, STOW-RS, the
bearer-token check and the audit (WADO-RS is ``wado_rs.py``'s). May not touch: SQL, spool
writes (a file part only reads the path it is given), the audit, the handlers' state.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from appliance.serving.wado_media import HttpProblem
from appliance.store.query import is_uid

CHUNK = 1024 * 1024
# Past SQLite's 64-bit integers a limit or offset is clamped: no answer is that long anyway.
_SQLITE_MAX_INT = 2**63 - 1


def _problem(exc: HttpProblem) -> JSONResponse:
    return JSONResponse({"error": exc.status, "detail": exc.detail}, status_code=exc.status)


def _keyword_of(name: str) -> str:
    """The keyword of a parameter name (keyword or 8 hex digits), "" when there is none."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return keyword_for_tag(int(name, 16))
    return name if tag_for_keyword(name) is not None else ""


def _attribute(name: str) -> str:
    """A QIDO-RS attribute (PS3.18 8.3.4.1) -> the key PAS searches or returns it by: the
    keyword of a data dictionary attribute, else the name as given when it is one PAS cannot
    search or return but well formed: a tag outside the dictionary (a private one) or a path
    into a sequence (``00081032.00080100``, ``ReferencedStudySequence.ReferencedSOPClassUID``);
    "" for a name that is no attribute at all (``_``, a misspelt keyword). Neither is a 400
    any more (the whole search was refused): PS3.18 8.3 "The origin server shall ignore any
    unsupported Query Parameters", 10.6.3.3 returns the include fields "supported by the
    origin server"; the caller names what it ignored in a 299 Warning."""
    steps = name.split(".")
    if len(steps) == 1 and (keyword := _keyword_of(name)):
        return keyword
    if all(_keyword_of(step) or re.fullmatch(r"[0-9A-Fa-f]{8}", step) for step in steps):
        return name
    return ""


def _shown(name: str) -> str:
    """A client's parameter name as a Warning header can carry it: printable ASCII without
    quotes or backslashes (others as ``?``), at most 64 characters."""
    kept = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in name[:64])
    return kept + ("..." if len(name) > 64 else "")


def _stream_part(chunks: Iterator[bytes], boundary: str) -> Iterator[bytes]:
    """One application/octet-stream part made of ``chunks`` as they come, then the closing
    boundary (the answer's length is not known before its last chunk)."""
    yield f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
    yield from chunks
    yield f"\r\n--{boundary}--\r\n".encode()


def _file_part(path: Path, offset: int, length: int, boundary: str) -> Iterator[bytes]:
    """One application/octet-stream part: ``length`` bytes of ``path`` from ``offset``, a
    megabyte at a time, then the closing boundary."""
    return _stream_part(_file_range(path, offset, length), boundary)


def _file_range(path: Path, offset: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(offset)
        left = length
        while left > 0:
            chunk = handle.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"{path}: {left} bytes short of the value's length")
            left -= len(chunk)
            yield chunk


class ClosingStream(StreamingResponse):
    """A body made by a blocking iterator (run in the threadpool), closed when the answer
    ends, however it ends. When the client goes away Starlette cancels the sending but leaves
    the body suspended: the files it had open stayed open until a garbage collection came by
    (a WADO-RS copy in another syntax, already removed from the spool's folder, kept its disk
    space that long: tests/test_transcode_memory.py)."""

    def __init__(self, content: Iterator[bytes], media_type: str,
                 headers: dict[str, str] | None = None, status_code: int = 200):
        self._source = content
        super().__init__(iterate_in_threadpool(content), status_code=status_code,
                         media_type=media_type, headers=headers)

    # Seconds a client told "busy" (503) is asked to wait before it asks again.
    RETRY_AFTER_S = 5

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Served while a place of ``http.max_streaming_answers`` is free (the app's
        ``streaming_slots``), else 503 with Retry-After, the body closed unstarted (its
        end reported: the handler's audit row says so). Clients that stop reading held a
        few MB each (60 of them: +198 MiB), bounded by nothing but ``http.max_connections``
        (1024)."""
        state = getattr(scope.get("app"), "state", None)
        slots = getattr(state, "streaming_slots", None)
        if slots is not None and not slots.acquire(blocking=False):
            if isinstance(self._source, ReportedEnd):
                self._source.close("not served: too many answers streaming at once "
                                   "(http.max_streaming_answers), answered 503")
            else:
                close = getattr(self._source, "close", None)
                if close is not None:
                    close()
            busy = JSONResponse(
                {"error": 503, "detail": "too many answers streaming at once "
                                         "(http.max_streaming_answers): try again shortly"},
                status_code=503, headers={"Retry-After": str(self.RETRY_AFTER_S)})
            await busy(scope, receive, send)
            return
        try:
            await super().__call__(scope, receive, send)
        finally:
            if slots is not None:
                slots.release()

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            # Not running: the threadpool call it was in is waited for when cancelled.
            close = getattr(self._source, "close", None)
            if close is not None:
                with contextlib.suppress(ValueError):  # "generator already executing"
                    close()


class ReportedEnd:
    """A streamed body that calls ``ended`` once, when the answer is over: with None when
    its last byte was taken, or with what cut it short (the client went away, a file could
    not be read). The access audit of a WADO-RS retrieve is written there, with what was
    sent: written before the first byte, it said "success" for studies the viewer never got.
    Closed by :class:`ClosingStream` however the answer ends, unstarted bodies included."""

    def __init__(self, chunks: Iterator[bytes], ended: Callable[[str | None], None]):
        self._chunks = chunks
        self._ended = ended
        self._lock = threading.Lock()
        self._reported = False

    def __iter__(self) -> ReportedEnd:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            self._report(None)
            raise
        except Exception as exc:
            self._report(f"the answer failed while it was sent: {exc}")
            raise

    def close(self, problem: str = "the client went away before the end") -> None:
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._report(problem)

    def _report(self, problem: str | None) -> None:
        with self._lock:
            if self._reported:
                return
            self._reported = True
        self._ended(problem)


def _sop_item(uid: str, sop_class: str, url: str | None = None, reason: int | None = None,
              note: str | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class or None
    item.ReferencedSOPInstanceUID = uid or None
    if url:
        item.RetrieveURL = url
    if reason is not None:
        item.FailureReason = reason
    return item


def _int_param(request: Request, name: str, positive: bool = False) -> int | None:
    """The query parameter ``name`` as a non-negative (``positive``: at least 1) integer, None
    when absent; HttpProblem 400 naming it otherwise. ASCII digits only (str.isdigit also took
    "²", which int() refused: a 500). Past SQLite's largest integer, that integer."""
    given = request.query_params.getlist(name)
    if not given:
        return None
    if len(given) > 1:  # the last one was taken, without a word
        raise HttpProblem(400, f"{name}: given {len(given)} times; give it once")
    raw = given[0]
    digits = raw.lstrip("0") or "0"
    if not re.fullmatch(r"[0-9]+", raw) or (positive and digits == "0"):
        kind = "a positive" if positive else "a non-negative"
        raise HttpProblem(400, f"{name}: must be {kind} integer, got {raw[:40]!r}")
    # 19 digits or more: SQLite's largest (no answer is that long). Decided on the text: int()
    # of a few thousand digits raises (CPython's limit on conversions).
    return int(digits) if len(digits) < 19 else _SQLITE_MAX_INT


# What each UID of a DICOMweb path is, as the answers name it.
_PATH_UIDS = (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"),
              ("instance", "SOPInstanceUID"))


def _one_uid_each(path: dict[str, str]) -> None:
    """HttpProblem 400 when a UID of a resource's path is a list (``A\\B``, sent as
    ``A%5CB``): the path names one study, series or instance (PS3.18 10.4.1.1, 10.6.1.1).
    It was read as a C-MOVE's UID list: WADO-RS and QIDO-RS answered for every study
    listed, fetch-through asked the region for the study "A\\B" however much of A and B
    was held, and a STOW to it refused every part. Anything else that is not a UID (a
    wildcard, letters, a control character) is refused here too, before anything is read:
    the index refused it for the readers, but a STOW-RS to such a study read the whole body
    and refused each part as "another study", the URL's value quoted into the log."""
    for key, keyword in _PATH_UIDS:
        value = path.get(key)
        if value is None:
            continue
        # Quoted as given (repr doubled each backslash: '1.2.3\\\\4.5').
        shown = value if len(value) <= 80 else value[:80] + "..."
        if "\\" in value:
            raise HttpProblem(400, f"{keyword} '{shown}' in the path: a path names one UID, "
                                   "not a list")
        if not is_uid(value):
            raise HttpProblem(400, f"{keyword} '{shown}' in the path is not a UID (digits "
                                   "and dots, at most 64 characters)")


def _fuzzy(request: Request) -> bool:
    """Whether a QIDO-RS search asks ``fuzzymatching=true`` (PS3.18 8.3.4.1: "true" or
    "false", in any case); HttpProblem 400 naming another value. It was ignored without a
    word: ``fuzzymatching=yes``, meant as true, got a literal answer and no Warning."""
    raw = request.query_params.get("fuzzymatching")
    if raw is None or raw.strip().lower() == "false":
        return False
    if raw.strip().lower() == "true":
        return True
    raise HttpProblem(400, f"fuzzymatching: true or false, got {raw[:40]!r}")


def _boundary(content_type: str) -> str:
    """The boundary of a STOW-RS body, whose parts must be DICOM files: HttpProblem 415 for
    another media type, or a ``type`` other than application/dicom (PS3.18 10.5.1.1; a body
    of application/dicom+json or +xml parts was read as DICOM, each part then refused as
    unparseable under a 409), 400 without a boundary. Parameter names in any case (RFC 2045:
    ``Boundary=`` was "without a boundary parameter")."""
    if not content_type.lower().startswith("multipart/related"):
        raise HttpProblem(415, "STOW-RS needs Content-Type multipart/related; "
                               "type=\"application/dicom\"")
    kind = re.search(r';\s*type\s*=\s*"?([^";]*)"?', content_type, re.IGNORECASE)
    if kind and kind.group(1).strip().lower() != "application/dicom":
        raise HttpProblem(415, f"STOW-RS stores application/dicom parts only, not "
                               f"type={kind.group(1).strip()[:60]!r} (metadata and bulk data "
                               "requests are not supported)")
    match = re.search(r';\s*boundary\s*=\s*"?([^";]+)"?', content_type, re.IGNORECASE)
    if not match:
        raise HttpProblem(400, "multipart/related without a boundary parameter")
    return match.group(1).strip()
