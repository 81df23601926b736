"""Bucketed downloads: ``POST /api/v1/downloads``, a study (or series) of the region packed as
the upload packs (JPEG-LS + solid zstd, ``appliance.transfer.pack``) and streamed to the site;
or several studies one after the other in the same stream (``studies``: what a burst of orders
needs on a long link, one TCP slow start instead of one per study); over one connection, or
striped over several (``lanes``, ``appliance.hub.lanes``; ``POST /api/v1/downloads/lanes``
joins one). The searches and the priors route that feeds :func:`stream_answer` are in
``appliance.hub.priors``; the work of one answer (archive read, packing, frames: the
``Download`` job) in ``appliance.hub.download_stages``; the archive's answer parsed into files
and cut into buckets in ``appliance.hub.staging``.

Owns: the routes: a request's body read (bounded) and checked (``bucket_bytes``, the parts),
the job started and its status line (a 404 for an unknown study rather than a 200 and an
error frame), the answer sent over one connection or handed to the lanes, and the hub's
thread pool sized for answers that wait. May not touch: SQL, the archive, packing (the job
does it), the upload side's transfers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from appliance.hub.app import BodyTooLarge, problem, read_body_limited
from appliance.hub.download_stages import Download, Part, downloads_dir
from appliance.hub.lanes import LANE_ID, StripedAnswer, parse_lanes, tune
from appliance.transfer.download_frames import DOWNLOADS_PATH, MEDIA_TYPE, UID
from appliance.transfer.lanes import LANE_MEDIA_TYPE, LANES_PATH, MAX_LANES
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.hub.app import Hub

log = logging.getLogger("pas.hub.download")

DEFAULT_BUCKET_BYTES = 4 * 1024 * 1024
MIN_BUCKET_BYTES = 64 * 1024
MAX_BUCKET_BYTES = 16 * 1024 * 1024
MAX_STUDIES = 256  # studies one request may ask for (the batched form)
MAX_JOIN_BYTES = 4096  # a lane join is {"id": 32 hex digits, "lane": n}
ANSWER_THREADS = 256  # worker threads of the hub's event loop (see _enough_threads)


def _enough_threads() -> None:
    """Each answer being sent holds a worker thread while it waits for its next frame (up to
    a second), and a striped one holds one per lane: anyio's default of 40 would let ten
    sites' striped downloads starve every other request of the hub (the certificate check
    of each request runs in the same pool). Raised once, from the event loop."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    if limiter.total_tokens < ANSWER_THREADS:
        limiter.total_tokens = ANSWER_THREADS


def bucket_bytes(body: dict[str, Any], max_bucket: int) -> int | str:
    """A request's ``bucket_bytes`` (the default when absent), or what is wrong with it."""
    target = body.get("bucket_bytes", DEFAULT_BUCKET_BYTES)
    if not isinstance(target, int) or not MIN_BUCKET_BYTES <= target <= max_bucket:
        return f"bucket_bytes: must be an integer from {MIN_BUCKET_BYTES} to {max_bucket}"
    return target


def _part(body: Any, where: str) -> Part | str:
    if not isinstance(body, dict):
        return f"{where}must be a JSON object"
    study = body.get("study_uid")
    if not isinstance(study, str) or not UID.match(study) or len(study) > 64:
        return f"{where}study_uid: not a DICOM UID: {study!r}"[:200]
    series = body.get("series_uid")
    if series is not None and (not isinstance(series, str) or not UID.match(series)
                               or len(series) > 64):
        return f"{where}series_uid: not a DICOM UID: {series!r}"[:200]
    have = body.get("have", [])
    if not isinstance(have, list) or not all(isinstance(u, str) and len(u) <= 64 for u in have):
        return f"{where}have: must be a list of SOP Instance UIDs"
    return Part(study, series, frozenset(have))


def _parse(body: Any, max_bucket: int) -> tuple[list[Part], int, bool] | str:
    """(parts, bucket bytes, batched), or what is wrong with the request. One study
    (``study_uid``, ``series_uid``, ``have`` at the top) or several (``studies``: a list of
    such objects, streamed one after the other)."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    target = bucket_bytes(body, max_bucket)
    if isinstance(target, str):
        return target
    if "studies" not in body:
        part = _part(body, "")
        return part if isinstance(part, str) else ([part], target, False)
    studies = body["studies"]
    if not isinstance(studies, list) or not 1 <= len(studies) <= MAX_STUDIES:
        return f"studies: must be a list of 1 to {MAX_STUDIES} objects"
    parts = []
    for n, item in enumerate(studies):
        part = _part(item, f"studies[{n}].")
        if isinstance(part, str):
            return part
        parts.append(part)
    return parts, target, True


async def stream_answer(hub: Hub, request: Request, job: Download, lanes: Any = None,
                        before_answer: Callable[[], Awaitable[Response | None]] | None = None,
                        ) -> Response:
    """Start ``job`` (not started yet) and answer with its stream: over one connection, or
    over lanes when the request asked for them (``lanes``, unparsed), the request being lane
    0. ``before_answer`` (the priors route reading a streamed body): awaited once the job
    runs; a Response it returns (a refusal) stops the job and is the answer."""
    site = request.state.site
    registry = hub.lane_registry
    striping = None
    if lanes is not None:
        striping = parse_lanes(lanes)
        if isinstance(striping, str):
            log.warning("download refused for %s: %s", site, striping)
            return problem(422, "bad_request", striping)
    transport = (request.scope.get("extensions") or {}).get("pas.transport")
    _enough_threads()
    job.start()
    striped = None
    if striping is not None:
        lane_id, count, rate = striping
        striped = StripedAnswer(job, count, rate, registry.shares)
        if not registry.register(site, lane_id, striped):
            job.end()
            return problem(409, "lanes_taken", f"lanes.id {lane_id} is already in use")
    if before_answer is not None:
        try:
            refusal = await before_answer()
        except BaseException:  # the site went away mid-body: nothing may keep running
            job.end()
            raise
        if refusal is not None:
            job.end()
            if striping is not None:
                registry.register(site, striping[0], None)
            return refusal
    # The status line waits for the archive's first answer: an unknown study is a 404,
    # not a 200 followed by an error frame (batched: an error frame for that study).
    await run_in_threadpool(job.first.wait, hub.settings.archive.timeout_s)
    if job.failure is not None and job.instances == 0:
        job.end()
        if striping is not None:
            registry.register(site, striping[0], None)  # its joins get 404 at once
        log.warning("download refused for %s: %s", site, job.failure.detail)
        return problem(job.failure.status, job.failure.error, job.failure.detail)
    if striped is not None:
        log.info("download for %s over %s, sharing the site's %.2f Mbit/s with its "
                 "other lanes", site, counted(striped.count, "lane"), striped.rate_bps / 1e6,
                 extra={"SITE": site})
        return StreamingResponse(striped.lane(0, transport), media_type=LANE_MEDIA_TYPE)
    tune(transport, None)  # a lane's pacing, if this connection carried one, is not ours
    return StreamingResponse(job.body(), media_type=MEDIA_TYPE)


def download_routes(hub: Hub) -> list[BaseRoute]:
    folder = downloads_dir(hub)
    with contextlib.suppress(FileNotFoundError):  # folders of answers a stop interrupted
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    limits = hub.settings.limits

    async def download(request: Request) -> Response:
        """Studies (or series) of the region, packed in buckets and streamed (frames)."""
        site = request.state.site
        try:
            raw = await read_body_limited(request, limits.max_manifest_bytes, "request")
        except BodyTooLarge as exc:
            log.warning("download refused for %s: %s", site, exc)
            return exc.response
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            log.warning("download refused for %s: body is not JSON", site)
            return problem(400, "bad_json", "the body must be JSON {\"study_uid\": ...}")
        parsed = _parse(body, min(limits.max_bucket_bytes, MAX_BUCKET_BYTES))
        if isinstance(parsed, str):
            log.warning("download refused for %s: %s", site, parsed)
            return problem(422, "bad_request", parsed)
        parts, target, batched = parsed
        return await stream_answer(hub, request, Download(hub, site, parts, target, batched),
                                   body.get("lanes"))

    async def join(request: Request) -> Response:
        """Another lane of a striped download (the download request is lane 0)."""
        site = request.state.site
        try:
            body = json.loads(await read_body_limited(request, MAX_JOIN_BYTES, "lane request"))
        except BodyTooLarge as exc:
            return exc.response
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return problem(400, "bad_json", "the body must be JSON {\"id\", \"lane\"}")
        lane_id = body.get("id") if isinstance(body, dict) else None
        number = body.get("lane") if isinstance(body, dict) else None
        if not isinstance(lane_id, str) or not LANE_ID.match(lane_id) or not isinstance(
                number, int) or not 1 <= number < MAX_LANES:
            return problem(422, "bad_request", "the body must be {\"id\": 32 hexadecimal "
                           f"digits, \"lane\": 1 to {MAX_LANES - 1}}}")
        striped = await run_in_threadpool(hub.lane_registry.join, site, lane_id,
                                          limits.lane_join_wait_s)
        if striped is None:
            log.warning("download lane %d refused for %s: no download %s to join", number,
                        site, lane_id)
            return problem(404, "unknown_download", f"no download {lane_id} to join (never "
                           "requested, refused, or all its lanes taken)")
        transport = (request.scope.get("extensions") or {}).get("pas.transport")
        return StreamingResponse(striped.lane(number, transport), media_type=LANE_MEDIA_TYPE)

    return [Route(LANES_PATH, join, methods=["POST"]),
            Route(DOWNLOADS_PATH, download, methods=["POST"])]
