"""Searching the region for a site's priors, and choosing and sending them in one round trip.

Owns: ``POST /api/v1/downloads/search`` (several patients' study searches in one request, run
side by side against the archive's QIDO-RS) and ``POST /api/v1/downloads/priors`` (the same
searches, then the priors chosen by the site's rule for each patient, and their download
stream in the same answer). May not touch: SQL, packing (``appliance.hub.download`` streams).

Why the second route: on a long link a search and then a download are two round trips before
the first byte of a prior moves (0.07 s each at 70 ms, plus the archive's answers); with the
rule sent along, the hub chooses the priors where the archive is, on its LAN, and starts the
stream at once. The choice is the site's own code (:func:`appliance.prefetch.rules.choose_priors`,
pure), fed with the rule's parameters; a study the site already holds whole (its ``held``
instance count reaches the archive's) is not sent, one it holds in part is sent but for
those instances. The body may be JSON or NDJSON sent as the appliance gathers a burst's
orders (options, then a patient per line): each patient is searched as soon as its line is
in, and each search is used as soon as it is back: a ``{"found": {"patient": n, ...}}`` frame
says which studies were chosen and which part of the stream carries each (``part``, or null:
held whole), then the parts it adds follow as in a batched download. Rules that need more than
the study level (``same = "body_part"``) keep the two round trips (the site decides).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from appliance.config import PrefetchRule
from appliance.hub.app import BodyTooLarge, problem, read_body_limited
from appliance.hub.archive import archive_client_options, trust_problem
from appliance.hub.download import MAX_BUCKET_BYTES, bucket_bytes, stream_answer
from appliance.hub.download_stages import Download, Part
from appliance.hub.lanes import parse_lanes
from appliance.prefetch.rules import candidate_from_qido, choose_priors
from appliance.transfer.download_frames import (
    MAX_SEARCH_BYTES,
    PRIORS_PATH,
    SEARCH_PATH,
    STUDY_FIELDS,
    UID,
    encode_frame,
)
from appliance.transfer.http import async_http_client
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.hub.app import Hub

log = logging.getLogger("pas.hub.download")

MAX_SEARCHES = 256  # patients one search may name
# Studies asked of the archive per patient (QIDO-RS ``limit``). A rule's ``priors`` is at most
# 100 (PrefetchRule, config_sections.py), but the rule chooses after the archive answers:
# it drops the current study, other modalities (``same``) and studies past ``max_age_days``,
# and QIDO-RS answers in no set order, so the limit must cover a patient's whole record, not
# just the priors wanted: five times the most a rule may ask.
SEARCH_LIMIT = 500
# One patient's archive answer is read to MAX_SEARCH_BYTES at most (download_frames.py).
# Parsed, such an answer costs the hub about 12 times its size: hence few searches at once
# for the whole hub, whatever the requests (a site's 256 patients wait their turn).
SEARCHES_AT_ONCE = 4
WILDCARDS = ("*", "?", "\\")  # QIDO-RS wildcards, and the list separator: several patients
DICOM_JSON = "application/dicom+json"
NDJSON = "application/x-ndjson"
FEATURES = ["lanes", "priors"]  # what a site may ask of this hub's downloads
SAMES = ("any", "modality")


def _patients(body: Any, key: str = "patients") -> list[dict[str, Any]] | str:
    """The patients of a search or priors request, or the 422's detail naming what is wrong:
    the list itself, else the first bad entry and its field
    (``patients[3].patient_id: at most 64 characters (it has 65)``). One message for the
    whole list named no entry: a site could not tell which of its burst's orders was
    refused. An entry of the wrong shape keeps the list's message, the entry named after it."""
    patients = body.get(key) if isinstance(body, dict) else None
    shape = (f"{key}: must be a list of at most {MAX_SEARCHES} objects "
             "{\"patient_id\", \"issuer\"}")
    if not isinstance(patients, list) or len(patients) > MAX_SEARCHES:
        return shape
    for n, patient in enumerate(patients):
        if (problem := _patient(patient, f"{key}[{n}]")) is not None:
            message, wrong_shape = problem
            return f"{shape} ({message})" if wrong_shape else message
    return patients


def _patient(patient: Any, where: str) -> tuple[str, bool] | None:
    """Why one patient entry (``where`` names it) cannot be searched, and whether that is its
    shape (not an object, a field missing or not a text) rather than its values; None when
    it can be."""
    if not isinstance(patient, dict):
        return f"{where}: not an object", True
    for field, required in (("patient_id", True), ("issuer", False)):
        value = patient.get(field, None if required else "")
        if not isinstance(value, str) or (required and not value):
            return (f"{where}.{field}: must be "
                    + ("a non-empty text" if required else "a text")), True
        if len(value) > 64:  # DICOM LO: the archive is searched by it
            return f"{where}.{field}: at most 64 characters (it has {len(value)})", False
    wildcard = _wildcard(patient, f"{where}.")
    return (wildcard, False) if wildcard is not None else None


def _wildcard(patient: dict[str, Any], where: str) -> str | None:
    """The refusal of a patient_id or issuer that would match more than one patient: an
    archive that reads ``*`` as QIDO-RS does answers every patient's studies."""
    for field in ("patient_id", "issuer"):
        if any(w in patient.get(field, "") for w in WILDCARDS):
            return (f"{where}{field}: wildcards (* ?) and \\ are refused: a prior search "
                    "names one patient")
    return None


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _wish(patient: dict[str, Any], where: str) -> dict[str, Any] | str:
    """What a priors request says of one patient, checked: the rule, the current exam, the
    instances the site holds."""
    rule = patient.get("rule")
    if not isinstance(rule, dict):
        return f"{where}rule: must be an object {{\"priors\", \"max_age_days\", \"same\"}}"
    priors, age, same = rule.get("priors"), rule.get("max_age_days", 0), rule.get("same", "any")
    # JSON true is a Python int: it was one prior. Named here; PrefetchRule, whose numbers
    # are strict, would raise instead of the 422.
    if not _integer(priors) or not 1 <= priors <= 100:
        return f"{where}rule.priors: must be an integer from 1 to 100"
    if not _integer(age) or age < 0:
        return f"{where}rule.max_age_days: must be an integer >= 0"
    if same not in SAMES:
        return f"{where}rule.same: must be one of {', '.join(SAMES)}"
    for key in ("modality", "accession"):
        value = patient.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > 64):
            return f"{where}{key}: must be a text of at most 64 characters"
    current = patient.get("current_study_uid")
    if current is not None and (not isinstance(current, str) or not UID.match(current)):
        return f"{where}current_study_uid: not a DICOM UID"
    held = patient.get("held", {})
    if not isinstance(held, dict) or not all(
            isinstance(k, str) and UID.match(k) and isinstance(v, list)
            and all(isinstance(u, str) and len(u) <= 64 for u in v) for k, v in held.items()):
        return f"{where}held: must map study UIDs to lists of SOP Instance UIDs"
    return {"rule": PrefetchRule(name="site", priors=priors, max_age_days=age, same=same),
            "modality": patient.get("modality"), "accession": patient.get("accession"),
            "current": current, "held": held}


def priors_routes(hub: Hub) -> list[BaseRoute]:
    limits = hub.settings.limits
    archive = hub.settings.archive
    # The archive's CA and credentials as every other client of the hub to it, and no proxy
    # read from the environment (appliance/transfer/http.py).
    archive_client = async_http_client(**archive_client_options(archive)) \
        if archive.kind == "dicomweb" and archive.url else None

    gate = asyncio.Semaphore(SEARCHES_AT_ONCE)

    async def one_search(patient: dict[str, str]) -> dict[str, Any]:
        async with gate:
            return await _one_search(patient)

    async def _one_search(patient: dict[str, str]) -> dict[str, Any]:
        """One patient's studies, at most SEARCH_LIMIT, read as they come and no more than
        MAX_SEARCH_BYTES of them (invariant 8)."""
        assert archive_client is not None
        params: list[tuple[str, str]] = [("PatientID", patient["patient_id"])]
        if patient.get("issuer"):
            params.append(("IssuerOfPatientID", patient["issuer"]))
        params += [("includefield", name) for name in STUDY_FIELDS]
        params.append(("limit", str(SEARCH_LIMIT)))
        try:
            async with archive_client.stream("GET", f"{archive.url}/studies", params=params,
                                             headers={"Accept": DICOM_JSON}) as answer:
                if answer.status_code == 204:
                    return {"studies": []}
                if answer.status_code != 200:
                    text = (await _first_bytes(answer, 200)).decode("utf-8", "replace")
                    return {"error": "archive_refused",
                            "detail": f"HTTP {answer.status_code}: {text}"}
                chunks, size = [], 0
                async for chunk in answer.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_SEARCH_BYTES:
                        return {"error": "archive_answer_too_large",
                                "detail": f"the archive answered over {MAX_SEARCH_BYTES} "
                                f"bytes for this patient (asked for {SEARCH_LIMIT} studies "
                                "at most): not read further"}
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            return {"error": "archive_unreachable",
                    "detail": trust_problem(exc, archive) or f"{type(exc).__name__}: {exc}"}
        if not size:
            return {"studies": []}
        try:
            rows = json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            rows = None
        if not isinstance(rows, list):
            return {"error": "archive_bad_answer", "detail": "not a JSON array"}
        return {"studies": rows}

    async def read_json(request: Request, shape: str) -> Any:
        if int(request.headers.get("content-length") or 0) > limits.max_manifest_bytes:
            return problem(413, "too_large", f"request over {limits.max_manifest_bytes} bytes")
        if archive_client is None:  # the embedded archive: its QIDO is the region proxy's
            return problem(501, "not_implemented", "this hub's archive is searched through "
                           "the region proxy only", features=["lanes"])
        try:
            return json.loads(await read_body_limited(request, limits.max_manifest_bytes,
                                                      "request"))
        except BodyTooLarge as exc:
            return exc.response
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return problem(400, "bad_json", f"the body must be JSON {shape}")

    async def search(request: Request) -> Response:
        """Several patients' studies in one round trip: the QIDO-RS each would have sent
        through the region proxy, run side by side on the hub's LAN."""
        body = await read_json(request, "{\"patients\": [...]}")
        if isinstance(body, Response):
            return body
        patients = _patients(body)
        if isinstance(patients, str):
            log.warning("search refused for %s: %s", request.state.site, patients)
            return problem(422, "bad_request", patients)
        # "features": what a site may ask of this hub's downloads (an older hub says none).
        if not patients:
            return JSONResponse({"results": [], "features": FEATURES})
        # The same JSON document as before, written a result at a time, in order: at most
        # SEARCHES_AT_ONCE searches ahead of the one being written, so that the hub holds a
        # few patients' answers (each as its JSON text), not all of them (invariant 8).
        return StreamingResponse(_results(patients, one_search),
                                 media_type="application/json")

    async def priors(request: Request) -> Response:
        """Each patient's studies searched, the priors chosen by the site's rule, and the
        ones the site lacks streamed in the same answer (one round trip)."""
        site = request.state.site
        if request.headers.get("content-type", "").startswith(NDJSON):
            return await streamed(request)
        body = await read_json(request, "{\"patients\": [...]}")
        if isinstance(body, Response):
            return body
        patients = _patients(body)
        if isinstance(patients, str) or not patients:
            detail = patients if isinstance(patients, str) else "patients: must not be empty"
            log.warning("priors refused for %s: %s", site, detail)
            return problem(422, "bad_request", detail)
        wishes = []
        for n, patient in enumerate(patients):
            wish = _wish(patient, f"patients[{n}].")
            if isinstance(wish, str):
                log.warning("priors refused for %s: %s", site, wish)
                return problem(422, "bad_request", wish)
            wishes.append(wish)
        target = bucket_bytes(body, min(limits.max_bucket_bytes, MAX_BUCKET_BYTES))
        if isinstance(target, str):
            return problem(422, "bad_request", target)
        if "lanes" in body and isinstance(parse_lanes(body["lanes"]), str):
            return await stream_answer(hub, request, Download(hub, site, [], target, True),
                                       body["lanes"])  # its 422, before any search
        feed: queue.Queue[Any] = queue.Queue()
        job = Download(hub, site, [], target, True, feed)
        incoming: asyncio.Queue[Any] = asyncio.Queue()
        for n, (patient, wish) in enumerate(zip(patients, wishes, strict=True)):
            incoming.put_nowait((n, patient, wish))
        incoming.put_nowait(None)
        # Kept referenced until done: the searches feed the answer while it streams.
        job.feeding = asyncio.create_task(_feed(feed, incoming, one_search, site))
        return await stream_answer(hub, request, job, body.get("lanes"))

    async def streamed(request: Request) -> Response:
        """The same, the body being NDJSON sent as the orders come: a line of options
        (``bucket_bytes``, ``lanes``), then a patient per line. Each patient is searched as
        soon as its line is in, so the first prior's archive read starts while the appliance
        still gathers the burst's other orders; the answer's status waits for the body's end
        (a bad line is a 422 naming it)."""
        site = request.state.site
        if archive_client is None:
            return problem(501, "not_implemented", "this hub's archive is searched through "
                           "the region proxy only", features=["lanes"])
        lines = _ndjson(request, limits.max_manifest_bytes)
        try:
            options = await anext(lines)
        except StopAsyncIteration:
            options = None
        except ValueError as exc:
            return problem(400, "bad_json", str(exc))
        if not isinstance(options, dict):
            return problem(422, "bad_request", "line 1: must be the options object "
                           "{\"bucket_bytes\"?, \"lanes\"?}")
        target = bucket_bytes(options, min(limits.max_bucket_bytes, MAX_BUCKET_BYTES))
        if isinstance(target, str):
            return problem(422, "bad_request", target)
        feed: queue.Queue[Any] = queue.Queue()
        job = Download(hub, site, [], target, True, feed)
        incoming: asyncio.Queue[Any] = asyncio.Queue()
        job.feeding = asyncio.create_task(_feed(feed, incoming, one_search, site))
        refusal: list[Response] = []

        async def read_patients() -> Response | None:
            n = 0
            try:
                async for patient in lines:
                    where = f"patients[{n}]."
                    checked = _patient(patient, where[:-1])
                    if checked is None:
                        wish = _wish(patient, where)
                    elif checked[1]:  # its shape: the entry named, then what is wrong
                        wish = (f"{where[:-1]}: must be an object {{\"patient_id\", "
                                f"\"issuer\"?, ...}} ({checked[0]})")
                    else:
                        wish = checked[0]
                    if isinstance(wish, str):
                        raise ValueError(wish)
                    if n >= MAX_SEARCHES:
                        raise ValueError(f"patients: at most {MAX_SEARCHES}")
                    incoming.put_nowait((n, patient, wish))
                    n += 1
                if n == 0:
                    raise ValueError("patients: must not be empty")
            except ValueError as exc:
                log.warning("priors refused for %s: %s", site, exc)
                refusal.append(problem(422, "bad_request", str(exc)))
            finally:
                incoming.put_nowait(None)
            return refusal[0] if refusal else None

        return await stream_answer(hub, request, job, options.get("lanes"), read_patients)

    return [Route(SEARCH_PATH, search, methods=["POST"]),
            Route(PRIORS_PATH, priors, methods=["POST"])]


async def _results(patients: list[dict[str, Any]],
                   one_search: Any) -> AsyncIterator[bytes]:
    """``{"results": [...], "features": [...]}``, each patient's result written when it
    and those before it are back; a window of SEARCHES_AT_ONCE searches runs ahead."""
    async def encoded(patient: dict[str, Any]) -> bytes:
        try:
            result = await one_search(patient)
        except Exception as exc:  # a search never leaves its patient unanswered
            result = {"error": "search_failed", "detail": f"{type(exc).__name__}: {exc}"}
        # The parsed rows dropped at once; not ASCII-escaped: no longer than the archive's text
        # (the site's cap on the answer counts on it, transfer/download.py).
        return json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode()

    window: list[asyncio.Task[bytes]] = []
    pending = iter(patients)
    try:
        yield b'{"results": ['
        for n in range(len(patients)):
            while len(window) < SEARCHES_AT_ONCE and (patient := next(pending, None)):
                window.append(asyncio.create_task(encoded(patient)))
            yield (b", " if n else b"") + await window.pop(0)
        yield b'], "features": ' + json.dumps(FEATURES).encode() + b"}"
    finally:
        for task in window:  # the site went away: its searches stop
            task.cancel()


async def _first_bytes(answer: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of a streamed answer (an error's text)."""
    got = b""
    async for chunk in answer.aiter_bytes():
        got += chunk
        if len(got) >= limit:
            break
    return got[:limit]


async def _feed(feed: queue.Queue[Any], incoming: asyncio.Queue[Any], one_search: Any,
                site: str) -> None:
    """Each patient's search as it completes: its "found" frame, then the parts it adds to
    the stream (a study another patient already added is not added twice), so that the first
    prior's archive read starts as soon as its patient's search is back. ``incoming`` brings
    ``(n, patient, wish)`` as the request's body is read, then None."""
    numbers: dict[str, int] = {}  # study UID -> its part
    results: asyncio.Queue[Any] = asyncio.Queue()
    searches: set[asyncio.Task[None]] = set()  # referenced until done
    total: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def searched(n: int, patient: dict[str, Any], wish: dict[str, Any]) -> None:
        try:
            result = await one_search(patient)
        except Exception as exc:  # a search never leaves its patient unanswered
            result = {"error": "search_failed", "detail": f"{type(exc).__name__}: {exc}"}
        await results.put((n, wish, result))

    async def spawn() -> None:
        count = 0
        while (got := await incoming.get()) is not None:
            searches.add(asyncio.create_task(searched(*got)))
            count += 1
        total.set_result(count)

    spawner = asyncio.create_task(spawn())
    done = 0
    try:
        while not (total.done() and done >= total.result()):
            getter = asyncio.ensure_future(results.get())
            await asyncio.wait({getter} if total.done() else {getter, total},
                               return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():  # the body's end: loop to check the count
                getter.cancel()
                continue
            n, wish, result = getter.result()
            done += 1
            _found(feed, numbers, n, wish, result)
        log.info("priors for %s: %s searched, %s to send", site, counted(done, "patient"),
                 counted(len(numbers), "study", "studies"), extra={"SITE": site})
    except Exception as exc:  # the answer ends with an error frame: the site retries
        log.exception("priors for %s: the searches failed", site)
        feed.put(("frame", encode_frame({"error": "search_failed",
                                         "detail": f"{type(exc).__name__}: {exc}"})))
    finally:
        spawner.cancel()
        feed.put(None)


def _found(feed: queue.Queue[Any], numbers: dict[str, int], n: int, wish: dict[str, Any],
           result: dict[str, Any]) -> None:
    """One patient's search result into the feed: the chosen priors, then the new parts."""
    if "error" in result:
        feed.put(("frame", encode_frame({"found": {"patient": n, **result}})))
        return
    candidates = [c for c in map(candidate_from_qido, result["studies"]) if c]
    chosen = choose_priors(wish["rule"], candidates, modality=wish["modality"],
                           body_part=None, accession=wish["accession"],
                           current_study_uid=wish["current"])
    studies, new = [], []
    for candidate in chosen:
        held = wish["held"].get(candidate.study_uid, [])
        part = None
        if not (candidate.instances is not None and len(held) >= candidate.instances > 0):
            if candidate.study_uid not in numbers:
                numbers[candidate.study_uid] = len(numbers)
                new.append(Part(candidate.study_uid, None, frozenset(held)))
            part = numbers[candidate.study_uid]
        studies.append({"study_uid": candidate.study_uid, "study_date": candidate.study_date,
                        "accession_number": candidate.accession_number,
                        "modalities": sorted(candidate.modalities),
                        "instances": candidate.instances, "part": part})
    feed.put(("frame", encode_frame({"found": {"patient": n, "studies": studies}})))
    for part in new:
        feed.put(("part", part))


async def _ndjson(request: Request, limit: int) -> AsyncIterator[Any]:
    """The body's lines as JSON values, as they arrive; ValueError for a line that is not
    JSON or a body over ``limit`` bytes."""
    buffer, seen, number = b"", 0, 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise ValueError(f"the body is over {limit} bytes")
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            number += 1
            if line.strip():
                yield _line(line, number)
    if buffer.strip():
        yield _line(buffer, number + 1)


def _line(line: bytes, number: int) -> Any:
    try:
        return json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"line {number}: not JSON") from None
