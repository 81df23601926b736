"""The transfer API (docs/protocol.md): create, PUT bucket, list held, commit, receipt.

Owns: parsing and validating requests, choosing the status code, logging each refusal.
May not touch: SQL or file writes (``appliance.store.hub``), rebuilding and archiving
(``archiver.py``, told after each durable bucket; ``commit.py``).

Every refusal happens before anything is stored: a bucket is authenticated (AES-GCM tag under
the transfer key, with transfer id and index bound as associated data) before it is written.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from appliance.hub import manifest_json
from appliance.hub.app import BodyTooLarge, problem, read_body_limited
from appliance.store import hub as store
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.hub.app import Hub

log = logging.getLogger("pas.hub.transfers")

# fullmatch: with match, "$" also matched before a final newline ("<uuid>\n" was an id).
TRANSFER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
KEY_CACHE_TRANSFERS = 1024  # unwrapped bucket keys kept in memory (most recent transfers)
# Receipts (and manifests on the way up) list every instance: 70 KB of JSON for a 520-image
# MR, several round trips of a fresh TCP window on a 70 ms line; gzip makes them 3-4x smaller.
GZIP_OVER_BYTES = 1400
MAX_PRIORITY = 1000
MAX_RESERVATION_BYTES = 1024  # {"bytes": 67108864}: a few dozen


class _BadEncoding(ValueError):
    pass


def _decoded_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """The request body without its Content-Encoding (``gzip`` or none), at most ``limit``
    bytes once decoded (a small gzip body may inflate to gigabytes). Raises _BadEncoding,
    or OverflowError when the decoded body is over ``limit``."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding != "gzip":
        raise _BadEncoding(f"Content-Encoding {encoding!r} is not supported (gzip is)")
    import zlib

    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        decoded = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise _BadEncoding(f"the gzip body does not decode: {exc}") from None
    if len(decoded) > limit:
        raise OverflowError(limit)
    if not inflater.eof or inflater.unused_data:
        raise _BadEncoding("the gzip body is truncated or has trailing data")
    return decoded


def json_answer(request: Request, document: Any, status_code: int = 200) -> Response:
    """A JSON answer, gzip-encoded when the client accepts it and the body is not tiny."""
    body = json.dumps(document, separators=(",", ":")).encode()
    accepted = request.headers.get("accept-encoding", "").lower()
    if len(body) > GZIP_OVER_BYTES and "gzip" in accepted:
        return Response(gzip.compress(body, compresslevel=6, mtime=0), status_code,
                        media_type="application/json",
                        headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
    return Response(body, status_code, media_type="application/json")


# Strict: the manifest is stored as sent (its canonical SHA-256 tells a repeat from a
# conflict), and the archiver compares its values as they are stored: a size sent as "529214"
# passed lax validation, was stored as text and then never equalled the rebuilt file's size
# (a permanent 422 sha256_mismatch for correct data); buckets ["0"] never matched a held
# index. So a value of the wrong JSON type is refused here, naming its path.
class ManifestInstance(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    sop_instance_uid: str = Field(min_length=1, max_length=64)
    sop_class_uid: str = Field(default="", max_length=64)
    size: int = Field(ge=0, le=2**53)  # within JSON's exact integers
    sha256: str
    buckets: list[int] = []

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lowercase hex digits")
        return value


class Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    transfer_id: str
    study_uid: str = Field(min_length=1, max_length=64)
    # The archive queue's order, lowest first (the appliance sends 0 urgent, 1 high, 2
    # routine). Bounded: 10**20 overflowed SQLite's INTEGER (a 500), and a negative number
    # would let a site jump ahead of every other site's urgent studies.
    priority: int = Field(default=0, ge=0, le=MAX_PRIORITY)
    wrapped_key: str
    bucket_count: int = Field(ge=1)
    instances: list[ManifestInstance] = Field(min_length=1)

    @field_validator("transfer_id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not TRANSFER_ID.fullmatch(value):
            raise ValueError("must be 1-64 letters, digits or '-' (a UUID)")
        return value


def _validation_detail(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: "
                     f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()[:10])


class ManifestArrivals:
    """Bucket PUTs waiting for a manifest that is on its way (docs/protocol.md): the appliance
    sends a new transfer's manifest and its first buckets at once, on separate connections,
    so a bucket may be read first. Entries live only while a PUT waits (bounded by the
    requests in progress). Used on the server's event loop only."""

    def __init__(self) -> None:
        self._events: dict[str, tuple[asyncio.Event, int]] = {}

    @contextlib.contextmanager
    def waiting(self, transfer_id: str) -> Iterator[asyncio.Event]:
        """Registered from entry: ``created(transfer_id)`` sets the event from then on (so a
        lookup made inside cannot miss a manifest created between it and the wait)."""
        event, waiters = self._events.get(transfer_id, (asyncio.Event(), 0))
        self._events[transfer_id] = (event, waiters + 1)
        try:
            yield event
        finally:
            current = self._events.get(transfer_id)
            if current is not None and current[0] is event:
                if current[1] <= 1:
                    del self._events[transfer_id]
                else:
                    self._events[transfer_id] = (event, current[1] - 1)

    def created(self, transfer_id: str) -> None:
        entry = self._events.pop(transfer_id, None)
        if entry is not None:
            entry[0].set()


def transfer_routes(hub: Hub) -> list[BaseRoute]:
    from appliance.hub.commit import CommitRefused, commit_if_complete, commit_transfer
    from appliance.transfer import seal

    # Unwrapped bucket keys of recent transfers (an X25519 unwrap per bucket would cost more
    # than the bucket's checks). Bounded: a hub runs for months and sees every site's
    # transfers; the oldest entry goes, and is unwrapped again if its transfer comes back.
    keys: OrderedDict[str, bytes] = OrderedDict()
    keys_lock = threading.Lock()
    limits = hub.settings.limits
    arrivals = ManifestArrivals()
    bodies = hub.bucket_bodies  # every site together; /metrics reads it (bucket_bodies.py)

    def transfer_key(row: Any) -> bytes:
        with keys_lock:
            key = keys.get(row["id"])
            if key is not None:
                keys.move_to_end(row["id"])
                return key
        manifest = manifest_json.loads(row["manifest"])  # in a worker thread, never the loop
        key = seal.unwrap_key(base64.b64decode(manifest["wrapped_key"]),
                              hub.pki.transfer_private_key(), row["id"])
        remember_key(row["id"], key)
        return key

    def remember_key(transfer_id: str, key: bytes) -> None:
        with keys_lock:
            keys[transfer_id] = key
            keys.move_to_end(transfer_id)
            while len(keys) > KEY_CACHE_TRANSFERS:
                keys.popitem(last=False)

    async def create(request: Request) -> Response:
        """Create a transfer from its manifest (idempotent per id)."""
        site = request.state.site
        try:  # the body as sent, then decoded: each at most max_manifest_bytes
            raw = await read_body_limited(request, limits.max_manifest_bytes, "manifest")
        except BodyTooLarge as exc:
            log.warning("site %s: %s", site, exc, extra={"SITE": site})
            return exc.response
        # Decoding, parsing, validating and hashing a manifest is CPU work (a 100,000-instance
        # one: about 1 s): done on the event loop, it held every other site's requests for
        # that long. Now in a worker thread, and a piece at a time (manifest_json; the
        # validation by slices of instances) so that the loop gets the GIL between pieces.
        parsed = await run_in_threadpool(
            _parse_manifest, raw, request.headers.get("content-encoding", ""), site, limits,
            hub.pki.transfer_private_key)
        if isinstance(parsed, Response):
            return parsed
        data, manifest, key, digest, text = parsed
        outcome = await run_in_threadpool(store.create_transfer, hub.db, site, data, digest,
                                          text)
        if outcome != "conflict":  # its buckets' checks need no unwrap, nor a manifest parse
            remember_key(manifest.transfer_id, key)
        if outcome == "conflict":
            log.warning("site %s: transfer %s exists with another manifest", site,
                        manifest.transfer_id)
            return problem(409, "conflict", f"transfer {manifest.transfer_id} exists with "
                           "another manifest")
        if outcome == "created":
            log.info("site %s: transfer %s created for study %s (%s, %s)", site,
                     manifest.transfer_id, manifest.study_uid,
                     counted(len(manifest.instances), "instance"),
                     counted(manifest.bucket_count, "bucket"),
                     extra={"SITE": site, "STUDY_UID": manifest.study_uid})
        else:
            log.info("site %s: transfer %s: its manifest posted again, the same (%s)", site,
                     manifest.transfer_id, counted(len(raw), "byte"),
                     extra={"SITE": site, "STUDY_UID": manifest.study_uid})
        arrivals.created(manifest.transfer_id)
        return JSONResponse({"transfer_id": manifest.transfer_id, "bucket_count":
                             manifest.bucket_count},
                            status_code=201 if outcome == "created" else 200)

    def lookup(request: Request, quiet: bool = False) -> tuple[Any, Response | None]:
        transfer_id = request.path_params["transfer_id"]
        row = store.get_transfer(hub.db, transfer_id, request.state.site)
        if row is None:
            # A GET is a site asking what the hub holds before it resumes (a transfer the hub
            # never created, or expired): its normal way, said at INFO. It was a WARNING,
            # followed at once by "created", on every resume.
            if not quiet:
                log.log(logging.INFO if request.method == "GET" else logging.WARNING,
                        "site %s: %s %s: unknown transfer%s", request.state.site,
                        request.method, request.url.path,
                        " (not held here: the site sends it anew)"
                        if request.method == "GET" else "",
                        extra={"SITE": request.state.site})
            return None, problem(404, "unknown_transfer", f"no transfer {transfer_id}")
        return row, None

    async def lookup_for_bucket(request: Request) -> tuple[Any, Response | None]:
        """The transfer of a bucket PUT, waiting up to ``limits.early_bucket_wait_s`` for a
        manifest sent at the same time (its POST may be read after this PUT)."""
        row, missing = await run_in_threadpool(lookup, request, True)
        if missing is None:
            return row, None
        transfer_id = request.path_params["transfer_id"]
        if limits.early_bucket_wait_s > 0:
            with arrivals.waiting(transfer_id) as created:
                row, missing = await run_in_threadpool(lookup, request, True)
                if missing is None:  # created between the two lookups
                    return row, None
                log.info("site %s: a bucket of transfer %s came before its manifest: waiting "
                         "up to %.1f s", request.state.site, transfer_id,
                         limits.early_bucket_wait_s, extra={"SITE": request.state.site})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(created.wait(), limits.early_bucket_wait_s)
        return await run_in_threadpool(lookup, request)

    async def receive_and_store(request: Request, row: Any, index: int, where: str
                                ) -> tuple[bool, int] | Response:
        """Read, authenticate and store one bucket body: (created, size), or the refusal.
        The body lives only in this frame (one bucket in memory per PUT)."""
        site = request.state.site
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_bucket_bytes:
                    log.warning("site %s: %s refused: over the limit", site, where)
                    return problem(413, "too_large", f"bucket over the limit of "
                                   f"{limits.max_bucket_bytes} bytes")
        except ClientDisconnect:
            log.warning("site %s: %s: client went away mid-body; nothing stored", site, where)
            return Response(status_code=400)
        sealed = body  # checked and stored as read: no copy (one bucket in memory per PUT)
        try:
            await run_in_threadpool(
                lambda: seal.check_bucket(transfer_key(row), row["id"], index, sealed))
        except seal.SealError as exc:
            log.warning("site %s: %s rejected: %s", site, where, exc, extra={"SITE": site})
            return problem(400, "bucket_rejected", f"{where} fails authentication (tampered, "
                           f"truncated or replayed from another transfer or index): {exc}")

        def store_it() -> bool:
            store.count_received(hub.db, row["id"], len(sealed))
            if index in store.held_buckets(hub.db, row["id"]):
                return False
            relative = store.write_bucket_file(hub.settings.buckets_dir, row["id"], index, sealed)
            return store.record_bucket(hub.db, row["id"], index, len(sealed),
                                       hashlib.sha256(sealed).hexdigest(), relative)

        with_lock = hub.lock(row["id"])

        def locked() -> bool:
            with with_lock:
                return store_it()

        created = await run_in_threadpool(locked)
        hub.transfer_counters.bucket_received(site, len(sealed), created)
        return created, len(sealed)

    async def bucket_of(request: Request) -> tuple[Any, int, str] | Response:
        """The transfer row, index and name of the bucket a PUT or a reservation is for,
        or the refusal (logged)."""
        site = request.state.site
        text = request.path_params["index"]
        if not (text.isascii() and text.isdigit()):
            return problem(400, "bad_request", f"bucket index must be a number from 0, got "
                           f"{text[:40]!r}")
        row, missing = await lookup_for_bucket(request)
        if missing:
            return missing
        # Read here, not by Starlette's {index:int}: its int() of 4301 digits raised in the
        # routing (a 500), and past 2**63 SQLite could not bind it. Past the transfer's
        # buckets either way: a 416 below.
        index = int(text) if len(text) <= 12 else row["bucket_count"]
        shown = text if len(text) <= 12 else text[:12] + "..."
        where = f"transfer {row['id']} bucket {shown}"
        if row["receipt"] is not None:
            log.warning("site %s: %s refused: transfer already committed", site, where)
            return problem(409, "committed", f"transfer {row['id']} is already committed")
        if not 0 <= index < row["bucket_count"]:
            log.warning("site %s: %s out of range", site, where)
            return problem(416, "index_out_of_range",
                           f"bucket index {shown} not in 0..{row['bucket_count'] - 1}")
        return row, index, where

    def too_large(site: str, where: str, size: int) -> Response:
        log.warning("site %s: %s refused: %d bytes over the limit", site, where, size)
        return problem(413, "too_large", f"bucket of {size} bytes is over the limit "
                       f"of {limits.max_bucket_bytes}")

    def busy(site: str, where: str) -> Response:
        """503 busy with Retry-After, for a PUT or a reservation the budget has no room
        for (counted for the site by :class:`BucketBodies`), logged."""
        now = bodies.now()
        held = counted(now.bodies, "bucket body", "bucket bodies")
        if now.reservations:
            held += f" and {counted(now.reservations, 'reservation')}"
        log.warning("site %s: %s refused: the hub holds %s (%d bytes) already "
                    "(limits.bucket_bodies_bytes); come back in %d s", site, where, held,
                    now.held, limits.busy_retry_after_s, extra={"SITE": site})
        answer = problem(503, "busy", f"the hub is receiving {held} already "
                         f"(limits.bucket_bodies_bytes): send {where} again in "
                         f"{limits.busy_retry_after_s} s")
        answer.headers["Retry-After"] = str(limits.busy_retry_after_s)
        return answer

    async def reserve(request: Request) -> Response:
        """Hold the bytes of a bucket's body out of the budget for its PUT, for
        ``limits.bucket_reservation_s``: 200, or 503 busy when there is no room, for which
        nothing but this small request crossed the WAN (docs/protocol.md, "A busy hub")."""
        site = request.state.site
        try:
            raw = await read_body_limited(request, MAX_RESERVATION_BYTES, "reservation")
        except BodyTooLarge as exc:
            return exc.response
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            log.warning("site %s: reservation is not JSON (%s)", site, exc, extra={"SITE": site})
            return problem(400, "bad_json", f"the body is not JSON: {exc}")
        size = data.get("bytes") if isinstance(data, dict) else None
        if type(size) is not int or size < 1:  # not a bool, not 3.0, not "3"
            log.warning("site %s: malformed reservation: bytes %.60r", site, size,
                        extra={"SITE": site})
            return problem(422, "bad_reservation", f'bytes: must be the size of the bucket\'s '
                           f'body, a whole number from 1 ({{"bytes": 6291456}}), got {size!r:.60}')
        target = await bucket_of(request)
        if isinstance(target, Response):
            return target
        row, index, where = target
        if size > limits.max_bucket_bytes:
            return too_large(site, f"the reservation of {where}", size)
        outcome = bodies.reserve(site, row["id"], index, size)
        if outcome == "busy":
            return busy(site, f"the reservation of {where}")
        if outcome == "too_many":
            log.warning("site %s: reservation of %s refused: the site holds %s already",
                        site, where, counted(bodies.per_site, "reservation"),
                        extra={"SITE": site})
            return problem(429, "too_many_reservations", f"this site holds "
                           f"{counted(bodies.per_site, 'reservation')} already "
                           f"(limits.bucket_reservations_per_site): one per PUT sent at once")
        return JSONResponse({"transfer_id": row["id"], "index": index, "bytes": size,
                             "expires_in_s": limits.bucket_reservation_s})

    async def put_bucket(request: Request) -> Response:
        """Store one sealed bucket durably (idempotent per index); with ``?commit=true``, also
        commit when it completes the set, and answer the receipt with it."""
        site = request.state.site
        target = await bucket_of(request)
        if isinstance(target, Response):
            return target
        row, index, where = target
        length = request.headers.get("content-length")
        declared = int(length or 0)
        if declared > limits.max_bucket_bytes:
            return too_large(site, where, declared)
        # A PUT its reservation covers holds that (no second take: never refused busy);
        # one without (an older appliance, a hub not busy lately) takes as it comes.
        reserved = declared if length else limits.max_bucket_bytes
        if not (length and bodies.claim(site, row["id"], index, declared)) and \
                not bodies.take(reserved, site):
            # Every site's PUT bodies together stay under limits.bucket_bodies_bytes: refused
            # before the body is read (uvicorn discards it as it arrives, a buffer at a time),
            # nothing stored; the appliance comes back after Retry-After. Counted for the
            # site in pas_hub_bucket_puts_refused_busy_total.
            return busy(site, where)
        try:
            stored = await receive_and_store(request, row, index, where)
        finally:  # the body is gone with receive_and_store's frame: not held by a commit
            bodies.give_back(reserved)
        if isinstance(stored, Response):
            return stored
        created, size = stored
        if created:  # rebuild and archive what this bucket completed, in the background
            hub.archiver.notify(row["id"], row["priority"])
        answer: dict[str, Any] = {"transfer_id": row["id"], "index": index, "size": size}
        if request.query_params.get("commit") in ("1", "true"):
            # "Commit if this completes the set": the last PUT of a study answers with the
            # receipt. Anything short of a receipt (buckets still missing, a refusal) leaves
            # the PUT's own answer; the appliance then commits explicitly and sees why there.
            try:
                receipt = await run_in_threadpool(commit_if_complete, hub, row["id"])
            except CommitRefused as exc:
                log.warning("site %s: transfer %s commit with bucket %d refused: %s", site,
                            row["id"], index, exc.detail, extra={"SITE": site})
                answer["commit_refused"] = exc.error
            except Exception as exc:  # the bucket is stored; the explicit commit retries
                log.warning("site %s: transfer %s commit with bucket %d failed: %s: %s", site,
                            row["id"], index, type(exc).__name__, exc, extra={"SITE": site})
                answer["commit_refused"] = "commit_failed"
            else:
                if receipt is not None:
                    answer["receipt"] = receipt
        if "receipt" in answer:  # as big as the manifest: written and gzipped off the loop
            return await run_in_threadpool(json_answer, request, answer, 201 if created else 200)
        return json_answer(request, answer, 201 if created else 200)

    async def held(request: Request) -> Response:
        """The bucket indexes the hub holds for a transfer, and the SHA-256 of the manifest
        it holds (canonical JSON): a site resuming the transfer with that manifest need not
        POST it again (a 50,000-instance study's is megabytes on a slow line)."""
        row, missing = await run_in_threadpool(lookup, request)
        if missing:
            return missing
        held_now = await run_in_threadpool(store.held_buckets, hub.db, row["id"])
        return JSONResponse({"held": held_now, "count": row["bucket_count"],
                             "manifest_sha256": row["manifest_sha256"]})

    async def status(request: Request) -> Response:
        """A transfer's state and byte counters."""
        row, missing = await run_in_threadpool(lookup, request)
        if missing:
            return missing
        held_now = await run_in_threadpool(store.held_buckets, hub.db, row["id"])
        return JSONResponse({
            "transfer_id": row["id"], "study_uid": row["study_uid"],
            "bucket_count": row["bucket_count"], "held": len(held_now),
            "committed": row["receipt"] is not None, "bytes_received": row["bytes_received"],
            "bytes_stored": row["bytes_stored"], "puts": row["puts"]})

    async def commit(request: Request) -> Response:
        """Rebuild, verify, archive; answer the signed receipt."""
        row, missing = await run_in_threadpool(lookup, request)
        if missing:
            return missing
        try:
            receipt = await run_in_threadpool(commit_transfer, hub, row["id"])
        except CommitRefused as exc:
            log.warning("site %s: transfer %s commit refused: %s", request.state.site,
                        row["id"], exc.detail, extra={"SITE": request.state.site})
            return problem(exc.status, exc.error, exc.detail, **exc.extra)
        return await run_in_threadpool(json_answer, request, receipt)

    async def receipt(request: Request) -> Response:
        """The signed receipt of a committed transfer."""
        row, missing = await run_in_threadpool(lookup, request)
        if missing:
            return missing
        if row["receipt"] is None:
            return problem(404, "not_committed", f"transfer {row['id']} is not committed")
        return await run_in_threadpool(
            lambda: json_answer(request, manifest_json.loads(row["receipt"])))

    base = "/api/v1/transfers"
    return [
        Route(base, create, methods=["POST"]),
        Route(base + "/{transfer_id}", status, methods=["GET"]),
        Route(base + "/{transfer_id}/buckets/{index}", put_bucket, methods=["PUT"]),
        Route(base + "/{transfer_id}/buckets/{index}/reservation", reserve, methods=["POST"]),
        Route(base + "/{transfer_id}/buckets", held, methods=["GET"]),
        Route(base + "/{transfer_id}/commit", commit, methods=["POST"]),
        Route(base + "/{transfer_id}/receipt", receipt, methods=["GET"]),
    ]


# Instances validated per call: each call holds the GIL (pydantic-core), about 6 ms for
# 1000 instances; between calls the event loop's thread gets it back.
VALIDATE_CHUNK = 1000
_INSTANCES: TypeAdapter[list[ManifestInstance]] = TypeAdapter(list[ManifestInstance])


def _validated(data: Any) -> Manifest:
    """``Manifest.model_validate(data)``, the instances a piece at a time (see
    :data:`VALIDATE_CHUNK`). Raises the same :class:`ValidationError` as the one call (a
    refused manifest is validated again whole, for the same paths in its detail)."""
    instances = data.get("instances") if isinstance(data, dict) else None
    if not isinstance(instances, list) or len(instances) <= VALIDATE_CHUNK:
        return Manifest.model_validate(data)
    try:
        head = Manifest.model_validate({**data, "instances": instances[:1]})
        checked: list[ManifestInstance] = []
        for start in range(0, len(instances), VALIDATE_CHUNK):
            checked.extend(_INSTANCES.validate_python(instances[start:start + VALIDATE_CHUNK]))
    except ValidationError:
        return Manifest.model_validate(data)
    return head.model_copy(update={"instances": checked})


def _parse_manifest(raw: bytes, encoding: str, site: str, limits: Any,
                    private_key: Callable[[], bytes]
                    ) -> tuple[dict[str, Any], Manifest, bytes, str, str | None] | Response:
    """A manifest POST's body checked (run in a worker thread: CPU-bound): the manifest as
    sent, validated, its unwrapped transfer key, its canonical SHA-256 and its JSON text to
    store (None: not UTF-8, the store writes it); or the refusal to answer, logged."""
    try:
        raw = _decoded_body(raw, encoding, limits.max_manifest_bytes)
    except OverflowError:
        return problem(413, "too_large", f"manifest over {limits.max_manifest_bytes} bytes")
    except _BadEncoding as exc:
        log.warning("site %s: manifest: %s", site, exc, extra={"SITE": site})
        return problem(400, "bad_encoding", str(exc))
    try:
        data = manifest_json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        log.warning("site %s: manifest is not JSON (%s)", site, exc, extra={"SITE": site})
        return problem(400, "bad_json", f"the body is not JSON: {exc}")
    try:
        manifest = _validated(data)
    except ValidationError as exc:
        detail = _validation_detail(exc)
        log.warning("site %s: malformed manifest: %s", site, detail, extra={"SITE": site})
        return problem(422, "bad_manifest", detail)
    problems = _manifest_problems(manifest, limits.max_buckets)
    if problems:
        log.warning("site %s: inconsistent manifest: %s", site, problems[0])
        return problem(422, "bad_manifest", "; ".join(problems[:10]))
    from appliance.transfer import seal

    try:
        key = seal.unwrap_key(base64.b64decode(manifest.wrapped_key), private_key(),
                              manifest.transfer_id)
    except (ValueError, seal.SealError) as exc:
        log.warning("site %s: transfer %s: wrapped_key unusable (%s)", site,
                    manifest.transfer_id, exc)
        return problem(422, "bad_wrapped_key",
                       f"wrapped_key cannot be unwrapped with this hub's key: {exc}")
    try:
        text: str | None = raw.decode("utf-8") if json.detect_encoding(raw) == "utf-8" else None
    except UnicodeDecodeError:
        text = None
    return data, manifest, key, manifest_json.canonical_sha256(data), text


def _manifest_problems(manifest: Manifest, max_buckets: int) -> list[str]:
    problems = []
    if manifest.bucket_count > max_buckets:
        problems.append(f"bucket_count: {manifest.bucket_count} is over the limit {max_buckets}")
    seen: set[str] = set()
    for number, instance in enumerate(manifest.instances):
        if instance.sop_instance_uid in seen:
            problems.append(f"instances.{number}: SOP Instance UID "
                            f"{instance.sop_instance_uid} appears twice")
        seen.add(instance.sop_instance_uid)
        bad = [b for b in instance.buckets if not 0 <= b < manifest.bucket_count]
        if bad:
            problems.append(f"instances.{number}.buckets: {bad} not in "
                            f"0..{manifest.bucket_count - 1}")
    try:
        base64.b64decode(manifest.wrapped_key, validate=True)
    except ValueError:
        problems.append("wrapped_key: not base64")
    return problems
