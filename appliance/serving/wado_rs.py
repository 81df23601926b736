"""WADO-RS handlers over a (Database, Spool): retrieve (study, series, instance), metadata,
bulk data, frames and rendered images, and the access audit row of each.

Owns: finding the instances a WADO-RS path names (asking the region through ``fetcher`` for a
study not on site), streaming each answer (multipart/related parts and DICOM JSON items one
instance at a time, frames one frame at a time: bounded memory), and the ``retrieve`` audit
row of every request that passed the access check. That row is written once the answer is
over (:class:`Tally`, through ``dicomweb_http.ReportedEnd``), never before its first byte: it
says what the viewer was sent. Written up front, an answer cut by a viewer that went away,
an unreadable file or a failed transcode was audited a success. Whatever can be decided
before the status line is (the instances, the first part or item, a copy in another syntax),
so that a refusal is an HTTP status the viewer can act on, audited with its reason.

Split from ``dicomweb.py``, which keeps the routes, QIDO-RS, STOW-RS and the access check
this module calls (``DicomWeb.actor_of``, ``DicomWeb.record``). The pixel and JSON work is
``wado_media.py``'s (/frames: ``wado_frames.py``'s), bodies and parsing
``dicomweb_http.py``'s. May not touch: SQL
(``store/retrieve.py``), spool writes (a copy in another syntax is ``store/transcode.py``'s).
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import time
from array import array
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from appliance.locks import READERS
from appliance.ops.metrics import count_retrieve
from appliance.serving.dicomweb_http import (
    CHUNK,
    ClosingStream,
    ReportedEnd,
    _file_part,
    _one_uid_each,
    _problem,
    _stream_part,
)
from appliance.serving.wado_frames import FrameAccept, open_frames
from appliance.serving.wado_media import (
    THUMBNAIL_VIEWPORT,
    DecodedPixels,
    HttpProblem,
    Window,
    accepted_syntaxes,
    frame_list,
    metadata_item,
    part_syntax,
    read_bulkdata,
    render,
    rendered_frame,
    rendered_media,
    require_dicom_json,
    require_native_octets,
    viewport_size,
)
from appliance.store import cache as cache_store
from appliance.store import retrieve as store_retrieve
from appliance.store.query import QueryError
from appliance.store.spool import SpoolFull
from appliance.store.transcode import open_transcoded
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.serving.dicomweb import DicomWeb

log = logging.getLogger("pas.dicomweb")

DICOM_JSON = "application/dicom+json"
OCTET_PARTS = 'multipart/related; type="application/octet-stream"; boundary={}'


def _lost(study_uid: str, gone: list[Any], failed: Exception | None) -> str:
    """Why a WADO-RS answer names instances whose file this appliance lost: the region could
    not be asked (try later), or it does not hold them (never confirmed there: their only
    copy was the spool; only the modality has them now)."""
    return (f"{counted(len(gone), 'instance')} of study {study_uid} asked for lost "
            "their file on this appliance (flagged missing: pas cache status) and the region "
            + (f"could not be asked: {failed}" if failed is not None else
               "does not hold them (never confirmed there): send the study again from its "
               "modality"))


# How many SOP Instance UIDs a 206's Warning names (then "and N more"): a header stays short.
_NAMED_LOST = 20


class LeftOut:
    """The instances a WADO-RS answer of several leaves out: their file is lost on this
    appliance and the region did not give them back. The answer serves the others, 206
    Partial Content with a Warning naming these (PS3.18 10.4.3: "some, but not all, of the
    requested instances"): a viewer reading an emergency with the WAN down gets the images
    on site; the whole answer was refused (404/503)."""

    def __init__(self, study_uid: str, uids: list[str], asked: int, reason: str):
        self.study_uid = study_uid
        self.uids = uids
        self.asked = asked  # the instances the path names, these included
        self.reason = reason

    def warning(self, service: str) -> str:
        """The Warning header (RFC 7234 5.5: 299 and the service, as QIDO-RS's): how many,
        why, and which (SOP Instance UIDs, the first few)."""
        named = ", ".join(self.uids[:_NAMED_LOST])
        if len(self.uids) > _NAMED_LOST:
            named += f" and {len(self.uids) - _NAMED_LOST} more"
        text = (f"{len(self.uids)} of the {self.asked} instances could not be returned: "
                f"{self.reason}. Not returned: {named}")
        # An HTTP header's quoted text: printable ASCII, no quote or backslash.
        text = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)
        return f'299 {service}: "{text}"'


class Tally:
    """What one WADO-RS answer holds and has sent, and its one audit row.

    ``total``: the instances the answer holds, once known; ``sent``: those whose last bytes
    the server took (an instance counts once it is sent whole). :meth:`ended` writes the row
    when the answer is over (None: its last byte was taken; else what cut it), and
    :meth:`refused` when the request is answered with an error status instead."""

    def __init__(self, web: DicomWeb, request: Request, actor: str, what: str):
        self.web = web
        self.request = request
        self.actor = actor
        self.what = what  # how the answer is named in the detail: "WADO-RS metadata"
        # The UIDs of the path only: a study search (pas audit --study, ATNA) reads them.
        self.target = "/".join(str(request.path_params[k]) for k in
                               ("study", "series", "instance") if k in request.path_params)
        self.total: int | None = None
        self.sent = 0
        self.left_out: LeftOut | None = None  # a 206: instances lost here, not answered
        # The studies registered as being read (the cache does not evict them) until the
        # answer is over: released by ended, refused or release, whichever comes first.
        self.readers = READERS
        self.reading: list[str] = []

    def release(self) -> None:
        """The answer is over: its studies may be evicted again (idempotent)."""
        reading, self.reading = self.reading, []
        self.readers.release(reading)

    def _of_total(self) -> str:
        return f"{self.sent} of {counted(self.total or 0, 'instance')}"

    def ended(self, problem: str | None) -> None:
        self.release()
        if problem is None and self.left_out is not None:
            lost = self.left_out
            self.web.record(self.request, "retrieve", self.actor, self.target,
                            f"failure: {counted(len(lost.uids), 'instance')} of "
                            f"{lost.asked} not sent: {lost.reason}",
                            f"{self._of_total()} ({self.what}), HTTP 206")
        elif problem is None:
            self.web.record(self.request, "retrieve", self.actor, self.target, "success",
                            f"{counted(self.sent, 'instance')} ({self.what})")
        else:
            self.web.record(self.request, "retrieve", self.actor, self.target,
                            f"failure: {problem}, after {self._of_total()}",
                            f"{self._of_total()} ({self.what})")

    def refused(self, exc: HttpProblem) -> None:
        """The row of a request answered with an error status: nothing was sent."""
        self.release()
        if self.total is None:
            outcome, sent = f"failure: {exc.detail}", "nothing sent"
        else:
            outcome, sent = f"failure: {exc.detail}, after {self._of_total()}", self._of_total()
        self.web.record(self.request, "retrieve", self.actor, self.target, outcome,
                        f"{sent} ({self.what}), HTTP {exc.status}")

    def stream(self, chunks: Iterator[bytes], media_type: str, length: int | None = None,
               closing: Callable[[], None] | None = None) -> Response:
        """The answer made of ``chunks``, its row written when it is over. ``closing``: run
        first then, however it ends (a copy never streamed is dropped at once)."""
        def finished(problem: str | None) -> None:
            if closing is not None:
                closing()
            self.ended(problem)

        headers = {"content-length": str(length)} if length is not None else {}
        status = 200
        if self.left_out is not None:
            status = 206
            base = self.web.base_url
            headers["Warning"] = self.left_out.warning(
                f"{self.request.url.scheme}://{self.request.url.netloc}{base}")
        return ClosingStream(ReportedEnd(chunks, finished), media_type=media_type,
                             headers=headers, status_code=status)


class Found:
    """The instances a WADO-RS path names, without holding their rows: the
    :class:`~appliance.store.retrieve.RetrievePlan` (8 bytes an instance) and the first row,
    read before the status line. Every row of the study was read first: about 1.2 kB each,
    +250 MB for a study of 200,000 instances before the first byte."""

    def __init__(self, db: Any, plan: store_retrieve.RetrievePlan, first: Any,
                 left_out: LeftOut | None = None):
        self.db = db
        self.plan = plan
        self.first = first  # the first of the plan's instances still held
        self.left_out = left_out  # lost here, not in ``plan``: the answer is a 206
        self._after_first = plan.instance_ids.index(first["id"]) + 1

    def rows(self) -> Iterator[Any]:
        """Every row, read a page at a time as they are taken (each page on the thread that
        asks for it). The first is the one read up front: a part already decided on (its
        copy in another syntax) is the instance it was made from."""
        yield self.first
        yield from self.rest()

    def rest(self) -> Iterator[Any]:
        """The rows after the first, as :meth:`rows`."""
        for page in store_retrieve.instance_pages(
                self.db, self.plan.instance_ids[self._after_first:]):
            yield from page


class WadoRs:
    """The WADO-RS handlers of one :class:`~appliance.serving.dicomweb.DicomWeb`: its
    (Database, Spool), fetcher, base URL and access check."""

    def __init__(self, web: DicomWeb):
        self.web = web
        self.db = web.db
        self.spool = web.spool

    async def _audited(self, request: Request, what: str,
                       answer: Callable[[Request, Tally], Awaitable[Response]]) -> Response:
        """``answer`` with its audit row: one per request that passed the access check,
        success or not (a refusal with its status and reason, an unreadable file included:
        it was a 500 with no row at all)."""
        try:
            actor = self.web.actor_of(request)
        except HttpProblem as exc:  # refused access: the security row is the middleware's
            return _problem(exc)
        tally = Tally(self.web, request, actor, what)
        try:
            return await answer(request, tally)
        except HttpProblem as exc:
            tally.refused(exc)
            return _problem(exc)
        except Exception as exc:
            log.exception("WADO-RS %s failed", request.url.path)
            problem = HttpProblem(500, f"the instance could not be read: {str(exc)[:300]}")
            tally.refused(problem)
            return _problem(problem)
        except BaseException:  # cancelled: no answer, no row, but no reader left behind
            tally.release()
            raise

    def _plan(self, path: dict[str, str], tally: Tally, counted_as: str | None = None) -> Found:
        """The instances ``path`` names, their studies registered on ``tally`` as being read
        (here, in the thread: a request cancelled while this runs still releases them).
        ``counted_as`` (a study, series or instance retrieve: "wado-rs") counts it in
        ``pas_retrieve_requests_total`` as C-MOVE/C-GET are: a hit when the cache alone
        served all of it."""
        _one_uid_each(path)  # before the region is asked for a study "A\\B"
        keys = {"StudyInstanceUID": path["study"]}
        level = "STUDY"
        if "series" in path:
            keys["SeriesInstanceUID"], level = path["series"], "SERIES"
        if "instance" in path:
            keys["SOPInstanceUID"], level = path["instance"], "IMAGE"
        failed: Exception | None = None
        fetched = 0
        # Held from before a fetch-through: its instances are confirmed as they are filed,
        # and eviction could take the study half fetched before the plan registers it.
        client = tally.request.client
        who = f"{tally.what} by {tally.actor} at {client.host if client else 'an unknown address'}"
        with tally.readers.holding([path["study"]], who):
            # Not on site, or some of its files lost (flagged missing: a restored index
            # over a new disk): the region's copies are fetched first.
            if self.web.fetcher is not None and (store_retrieve.study_instance_count(
                    self.db, path["study"]) == 0 or cache_store.files_still_missing(
                    self.db, self.spool, path["study"])):
                try:
                    fetched = self.web.fetcher(path["study"])
                except Exception as exc:  # logged once the plan says what is lost
                    failed = exc
            try:
                plan, tally.reading = tally.readers.planned(
                    lambda: store_retrieve.retrieve_plan(self.db, level, keys), who)
            except QueryError as exc:
                raise HttpProblem(400, str(exc)) from None
        # A file still missing (not confirmed, so the region never had it; or the region
        # could not be asked) would cut the answer after its status line: said before it.
        # All of what is asked: refused; some: the rest served, 206 (LeftOut).
        planned = set(plan.instance_ids)
        gone = [r for r in cache_store.files_still_missing(self.db, self.spool, path["study"])
                if r["id"] in planned]
        if failed is not None and not 0 < len(gone) < len(planned):  # else said below
            log.warning("fetch-through of %s failed: %s", path["study"], failed)
        if gone and len(gone) == len(planned):  # tally.refused releases the study
            raise HttpProblem(503 if failed is not None else 404, _lost(path["study"], gone,
                                                                         failed))
        left_out = None
        if gone:
            left_out = LeftOut(path["study"], [r["sop_instance_uid"] for r in gone],
                               len(planned), _lost(path["study"], gone, failed))
            ids = {r["id"] for r in gone}
            plan = store_retrieve.RetrievePlan(
                array("q", (i for i in plan.instance_ids if i not in ids)), plan.pairs,
                plan.study_uids)
            log.warning("%s: serving the %s on site, 206 Partial Content: %s", who,
                        counted(len(plan.instance_ids), "instance"), left_out.reason,
                        extra={"STUDY_UID": path["study"]})
        if counted_as is not None:
            # As qr_retrieve.py counts a C-MOVE/C-GET: one that needed the region (fetched
            # from it, or asked and not answered, or served without instances lost here:
            # 206) is a miss. Not counted before: WADO-RS viewers were missing from the
            # hit ratio, whatever the region served them.
            count_retrieve(hit=bool(plan.instance_ids) and not fetched and failed is None
                           and left_out is None, channel=counted_as)
        # The first instance still held (one removed since the plan is left out).
        first = next(store_retrieve.instance_pages(self.db, plan.instance_ids, page_size=1),
                     [None])[0]
        if first is None and failed is not None:
            # Not "no such instance": the region may well hold it, it could not be asked
            # (a WAN down); 503 tells a viewer to try again later.
            raise HttpProblem(503, f"study {path['study']} is not on site and the region "
                                   f"could not provide it: {failed}")
        if first is None:
            raise HttpProblem(404, f"no instance matches {'/'.join(path.values())}")
        store_retrieve.touch_studies(self.db, [path["study"]], time.time())
        return Found(self.db, plan, first, left_out)

    async def _found(self, request: Request, tally: Tally,
                     counted_as: str | None = None) -> Found:
        found: Found = await run_in_threadpool(self._plan, dict(request.path_params), tally,
                                               counted_as)
        tally.total = len(found.plan.instance_ids)
        tally.left_out = found.left_out
        return found

    # -- instances ----------------------------------------------------------------------

    async def retrieve(self, request: Request) -> Response:
        return await self._audited(request, "WADO-RS", self._retrieve)

    async def _retrieve(self, request: Request, tally: Tally) -> Response:
        wanted = accepted_syntaxes(request.headers.get("accept", ""))
        found = await self._found(request, tally, counted_as="wado-rs")
        # Decided for every part before the first byte: a 406 cannot follow a 200. The
        # first instance's syntax first (the 406 names it), then every other stored one.
        stored = found.first["transfer_syntax_uid"]
        syntaxes = {stored: part_syntax(wanted, stored)}
        for _, other in found.plan.pairs:
            syntaxes.setdefault(other, part_syntax(wanted, other))
        first: BinaryIO | Exception | None = None
        if syntaxes[stored] != stored:
            # The first part's copy is made before the status line: a copy the spool has no
            # room for (its quota, the free-space floor) is then an answer the viewer can act
            # on (503, try later) instead of a 200 cut short. A later part's refusal can only
            # cut the answer (audited with what was sent).
            try:
                first = await run_in_threadpool(open_transcoded, self.spool,
                                                self.spool.path(found.first["path"]),
                                                syntaxes[stored])
            except SpoolFull as exc:
                raise HttpProblem(503, f"{exc}; try again later") from None
            except Exception as exc:  # as before: the answer cut at its first part
                first = exc

        def drop_copy() -> None:
            if isinstance(first, io.IOBase):  # closed here too when never streamed (the
                first.close()  # client went first): its bytes and quota room go at once

        boundary = secrets.token_hex(16)
        return tally.stream(self._multipart(found.rows(), boundary, syntaxes, tally, first),
                            'multipart/related; type="application/dicom"; '
                            f"boundary={boundary}", closing=drop_copy)

    def _multipart(self, rows: Iterator[Any], boundary: str, syntaxes: dict[str, str],
                   tally: Tally, first: BinaryIO | Exception | None = None) -> Iterator[bytes]:
        """The parts, their rows read a page at a time as they go; ``tally.sent`` counts
        those whose last bytes the server took. ``syntaxes``: the syntax each stored one is
        sent in. ``first``: the first part's copy in another syntax, made before the answer
        began (or why it could not be). Parts sent as stored are handed to the server a
        CHUNK or more at a time (each hand-over is a threadpool hop and an ASGI send: three
        per part, one 1 kB part after another, made a study of 50,001 such parts take 30 s);
        they are counted once the server took them."""
        held: list[bytes] = []  # whole parts of small files, handed over together
        held_bytes = held_parts = 0
        try:
            for number, row in enumerate(rows):
                syntax = syntaxes[row["transfer_syntax_uid"]]
                head = (f"--{boundary}\r\nContent-Type: application/dicom; "
                        f"transfer-syntax={syntax}\r\n\r\n").encode()
                path = self.spool.path(row["path"])
                if syntax == row["transfer_syntax_uid"]:
                    with open(path, "rb") as handle:
                        for piece in _part(head, handle):
                            held.append(piece)
                            held_bytes += len(piece)
                            if held_bytes >= CHUNK:
                                yield b"".join(held)
                                tally.sent += held_parts
                                held, held_bytes, held_parts = [], 0, 0
                    held_parts += 1
                    continue
                if held:  # the parts before a re-encoded one go first, whatever it does
                    yield b"".join(held)
                    tally.sent += held_parts
                    held, held_bytes, held_parts = [], 0, 0
                # re-encoded into a temp file, streamed from it, gone once read or dropped
                if number == 0 and isinstance(first, Exception):
                    raise first
                copy = (first if number == 0 and first is not None
                        else open_transcoded(self.spool, path, syntax))
                with copy as handle:
                    yield from _part(head, handle)
                tally.sent += 1
        except Exception:
            if held:  # a file gone mid-answer: the whole parts before it are still sent
                yield b"".join(held)
                tally.sent += held_parts
            raise
        yield b"".join(held) + f"--{boundary}--\r\n".encode()
        tally.sent += held_parts

    # -- metadata -----------------------------------------------------------------------

    async def metadata(self, request: Request) -> Response:
        return await self._audited(request, "WADO-RS metadata", self._metadata)

    async def _metadata(self, request: Request, tally: Tally) -> Response:
        """DICOM JSON, one instance at a time as it is sent: the MR study's 520 items make
        51 MB of JSON, which was built whole (and its dicts) before the first byte. The
        first item is made before the status line: an unreadable file is then a 500."""
        require_dicom_json(request.headers.get("accept", ""))
        found = await self._found(request, tally)
        first = await run_in_threadpool(self._item, found.first)
        return tally.stream(self._items(first, found.rest(), tally), DICOM_JSON)

    def _item(self, row: Any) -> bytes:
        base = (f"{self.web.base_url}/studies/{row['study_uid']}/series/{row['series_uid']}"
                f"/instances/{row['sop_instance_uid']}")
        item = metadata_item(self.spool.path(row["path"]), base, row["transfer_syntax_uid"])
        # As Starlette's JSONResponse writes it.
        return json.dumps(item, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode()

    def _items(self, first: bytes, rest: Iterator[Any], tally: Tally) -> Iterator[bytes]:
        yield b"[" + first
        tally.sent += 1
        for row in rest:
            yield b"," + self._item(row)
            tally.sent += 1
        yield b"]"

    # -- one instance: bulk data, frames, rendered ----------------------------------------

    async def bulkdata(self, request: Request) -> Response:
        """One top-level bulk data attribute's bytes, where metadata's BulkDataURI points."""
        tag = request.path_params["tag"]
        return await self._audited(request, f"WADO-RS bulk data {tag[:16]}", self._bulkdata)

    async def _bulkdata(self, request: Request, tally: Tally) -> Response:
        tag = request.path_params["tag"]
        if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag):
            raise HttpProblem(400, f"bulk data tag {tag!r}: 8 hexadecimal digits")
        require_native_octets(request.headers.get("accept", ""))
        found = await self._found(request, tally)
        path = self.spool.path(found.first["path"])
        data = await run_in_threadpool(read_bulkdata, path, int(tag, 16))
        boundary = secrets.token_hex(16)
        if isinstance(data, DecodedPixels):  # compressed pixels, decoded as they are sent
            size, body = data.size, _stream_part(data.chunks(), boundary)
        elif isinstance(data, tuple):  # a large value as stored: streamed from the file
            size, body = data[1], _file_part(path, *data, boundary)
        else:
            size, body = len(data), _stream_part(iter([data]), boundary)
        tally.what += f", {size} bytes"
        return tally.stream(_whole(body, tally), OCTET_PARTS.format(boundary))

    async def frames(self, request: Request) -> Response:
        what = f"WADO-RS frames {request.path_params['frames'][:64]}"
        return await self._audited(request, what, self._frames)

    async def _frames(self, request: Request, tally: Tally) -> Response:
        numbers = frame_list(request.path_params["frames"])
        accept = FrameAccept(request.headers.get("accept", ""))
        found = await self._found(request, tally)
        # Native pixels or the stored bitstream, chosen on the file's syntax (wado_frames.py).
        answer, frames = await run_in_threadpool(
            open_frames, self.spool.path(found.first["path"]), numbers, accept)
        try:  # the first frame before the status line: a file that cannot give it is a 500
            first = await run_in_threadpool(next, frames)
        except BaseException:
            close = getattr(frames, "close", None)
            if close is not None:
                close()
            raise
        boundary = secrets.token_hex(16)
        return tally.stream(_whole(_frame_parts(first, frames, boundary, answer.part_type),
                                   tally), answer.content_type(boundary))

    async def rendered(self, request: Request) -> Response:
        return await self._audited(request, "WADO-RS rendered", self._rendered)

    async def thumbnail(self, request: Request) -> Response:
        return await self._audited(request, "WADO-RS thumbnail", self._thumbnail)

    async def _thumbnail(self, request: Request, tally: Tally) -> Response:
        """A small rendered image (PS3.18 10.4.1.1.5; its size is the server's choice): of
        the instance; of a series, its middle image; of a study, the middle image of its
        first series that has one. Within THUMBNAIL_VIEWPORT unless ``viewport`` says
        otherwise. It was the instance's full-size rendering, and a bare 404 for a study
        or a series, whose thumbnails a viewer's study list shows."""
        media = rendered_media(request.headers.get("accept", ""))
        tally.what = f"WADO-RS thumbnail {media}"
        viewport = viewport_size(request.query_params.get("viewport")) or THUMBNAIL_VIEWPORT
        window = Window.parse(request.query_params.get("window"))
        found = await self._found(request, tally)
        path = request.path_params
        if "instance" in path:
            candidates = [found.first]
        else:
            held = set(found.plan.instance_ids)
            candidates = [row for row in await run_in_threadpool(
                store_retrieve.representative_instances, self.db, path["study"],
                path.get("series")) if row["id"] in held]
        tally.total = 1  # one instance shown, whatever the study or series holds
        for row in candidates:
            try:
                data = await run_in_threadpool(render, self.spool.path(row["path"]), 1, media,
                                               viewport, window)
            except HttpProblem as exc:
                if exc.status != 404 or row is candidates[-1]:
                    raise
                continue  # no image in it (a report): the next series'
            return tally.stream(_whole(_slices(data), tally), media, length=len(data))
        raise HttpProblem(404, f"no instance of {'/'.join(path.values())} to show")

    async def _rendered(self, request: Request, tally: Tally) -> Response:
        media = rendered_media(request.headers.get("accept", ""))
        tally.what = f"WADO-RS rendered {media}"
        frame = rendered_frame(request.path_params.get("frame", "1"))
        viewport = viewport_size(request.query_params.get("viewport"))
        window = Window.parse(request.query_params.get("window"))
        found = await self._found(request, tally)
        data = await run_in_threadpool(render, self.spool.path(found.first["path"]), frame,
                                       media, viewport, window)
        return tally.stream(_whole(_slices(data), tally), media, length=len(data))


def _part(head: bytes, handle: BinaryIO) -> Iterator[bytes]:
    """One part of a multipart answer: ``head``, the file's bytes a CHUNK at a time, the
    closing CRLF; the head joined to the first chunk and the CRLF to the last (a part of a
    small file is one piece, not three). At most two chunks are held (the one read, the
    one pending)."""
    pending = head + handle.read(CHUNK)
    while chunk := handle.read(CHUNK):
        yield pending
        pending = chunk
    yield pending + b"\r\n"


def _whole(chunks: Iterator[bytes], tally: Tally) -> Iterator[bytes]:
    """A one-instance answer's chunks: the instance counts as sent once the last is taken."""
    yield from chunks
    tally.sent = 1


def _slices(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start:start + CHUNK]


def _frame_parts(first: bytes, rest: Iterator[bytes], boundary: str,
                 part_type: str) -> Iterator[bytes]:
    """One part per frame, each read as it is sent; ``part_type``: its Content-Type
    (``application/octet-stream``, or ``image/jls; transfer-syntax=...`` for a bitstream)."""
    head = f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()
    try:
        yield head + first + b"\r\n"
        for frame in rest:
            yield head + frame + b"\r\n"
    finally:
        close = getattr(rest, "close", None)
        if close is not None:
            close()
    yield f"--{boundary}--\r\n".encode()
