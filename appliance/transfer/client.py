"""The appliance's HTTPS client for the regional hub (docs/protocol.md, "Transfers").

Owns: the wire calls of a transfer (create, PUT bucket, list held buckets, commit, receipt,
the holdings question asked before a transfer of adopted instances),
their retry policy, the hub's certificate as seen on the TLS connection, and the receipt's
signature check. May not touch: the database, the spool, packing or sealing (the caller hands
in sealed bytes). One :class:`HubClient` is shared by every worker thread: httpx's pool keeps
HTTP/1.1 connections alive, all under the enrolment's TLS 1.3 context (pinned fleet CA,
hostname checked, client certificate).

PUTs sending at once are capped (``hub.connections`` slots, shared by every job), each PUT
gives its slot back once its body is handed to the kernel, and every hub connection is paced
under the line's rate when it is known: ``appliance.transfer.pacing`` says why and how.

Retries (tenacity, exponential backoff with full jitter): connection errors, timeouts and
5xx answers are retried a few times (a 503 with ``Retry-After``, a hub at its memory bound,
after the time it asks; still busy after the retries: :class:`HubBusy`, the job waits;
while the hub has said busy lately, each PUT first reserves its bucket's bytes, so that a
refusal costs a small request and not the bucket's body: ``reservations.py``);
a 4xx is never retried here, because the protocol gives each one a meaning the caller must
act on (409 on commit: send the missing buckets; 400 on a bucket: it failed authentication,
re-seal it; 404: the transfer is unknown, create it).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gzip
import json
import logging
import random
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from appliance.transfer.http import http_client, proxy_words
from appliance.transfer.link_failures import trust_problem
from appliance.transfer.pacing import ConnectionSlots, LinkMeter, PacedBackend, Pacer
from appliance.transfer.reservations import Reservations
from appliance.transfer.throttle import TokenBucket

log = logging.getLogger("pas.transfer.client")

API = "/api/v1"


class HubError(Exception):
    """Base of every failure talking to the hub."""


class HubUnavailable(HubError):
    """The hub could not be reached or answered 5xx, after the retries: try again later."""


class HubBusy(HubUnavailable):
    """The hub answered 503 with a ``Retry-After`` (it holds as many bucket bodies as its
    memory allows, ``limits.bucket_bodies_bytes``), every retry: nothing is wrong with the
    request nor the link; come back after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class HubRefused(HubError):
    """The hub answered a 4xx: it names what is wrong with this request."""

    def __init__(self, status: int, body: Any, what: str):
        self.status = status
        self.body = body
        detail = body.get("detail") or body.get("error") if isinstance(body, dict) else body
        super().__init__(f"hub refused {what}: HTTP {status} {detail!s:.300}")


class ReceiptInvalid(HubError):
    """The receipt's signature does not verify with the hub's certificate."""


class _ServerError(Exception):
    """A 5xx answer, to be retried."""

    def __init__(self, response: httpx.Response):
        self.response = response
        super().__init__(f"HTTP {response.status_code} {response.text[:300]}")


# A Retry-After longer than this is read as this (a hub's mistake must not park a PUT for days).
MAX_RETRY_AFTER_S = 300.0


def retry_after(exc: BaseException | None) -> float | None:
    """The seconds a 503 answer's ``Retry-After`` asks for (delta-seconds; capped at
    :data:`MAX_RETRY_AFTER_S`), None for any other failure."""
    if not isinstance(exc, _ServerError) or exc.response.status_code != 503:
        return None
    text = exc.response.headers.get("retry-after", "").strip()
    if not text.isascii() or not text.isdigit():
        return None
    return min(float(text), MAX_RETRY_AFTER_S)


def _transient(exc: BaseException) -> bool:
    """Worth trying again at once: a transport error or a 5xx, but not a certificate refused
    (the same answer comes back every time)."""
    return isinstance(exc, httpx.TransportError | _ServerError) and trust_problem(exc) is None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]


def canonical_json(document: dict[str, Any]) -> bytes:
    """The bytes the hub signs (the receipt without its signature) and hashes (a manifest):
    keys sorted, no spaces."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def verify_receipt(receipt: dict[str, Any], hub_certificate_der: bytes) -> None:
    """Raise :class:`ReceiptInvalid` unless ``receipt["signature"]`` is the hub's signature
    over the canonical JSON of the receipt's other fields."""
    fields = {k: v for k, v in receipt.items() if k != "signature"}
    try:
        signature = base64.b64decode(receipt["signature"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise ReceiptInvalid(f"receipt has no valid base64 signature ({exc})") from None
    key = x509.load_der_x509_certificate(hub_certificate_der).public_key()
    data = canonical_json(fields)
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise ReceiptInvalid(f"unsupported hub key type {type(key).__name__}")
    except InvalidSignature:
        raise ReceiptInvalid(
            f"receipt for transfer {receipt.get('transfer_id')} has a bad signature"
        ) from None


# A TCP connection to the hub that is not accepted within this long is not coming: its
# address drops every packet (a black-holed WAN: no refusal, no ICMP). Waiting for the
# caller's whole timeout instead (60-120 s) kept a viewer's retrieve, a prefetch or a
# shutdown waiting that long for nothing. Reads keep the caller's timeout: a slow link that
# still carries bytes is not a dead one.
CONNECT_TIMEOUT_S = 10.0


def wan_timeout(timeout_s: float, pool: float | None = None) -> httpx.Timeout:
    """httpx timeouts for a call across the WAN: ``timeout_s`` for each read and write (and
    the wait for a pooled connection, unless ``pool``), the connect bounded by
    :data:`CONNECT_TIMEOUT_S`."""
    return httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S),
                         pool=timeout_s if pool is None else pool)


WARM_IDLE_S = 20.0
# How long an idle connection stays in the pool: under the hub's 30 s keep-alive and over
# WARM_IDLE_S, so the keep-warm call finds it open. (httpx's default is 5 s: the pool then
# closed every idle connection long before the keep-warm call, which reopened all of them,
# and a study arriving more than 5 s after the last call paid TCP and TLS handshakes again.)
KEEP_ALIVE_S = 25.0


def _keep_warm(client_ref: weakref.ref[HubClient], idle_s: float) -> None:
    first = True
    while True:
        client = client_ref()
        if client is None or client._closed:
            return
        idle = time.monotonic() - client._last_used >= idle_s and not client.slots.in_use
        if first or idle:
            first = False
            try:
                client.warm()
            except Exception:  # never let the keep-warm thread die on a surprise
                log.exception("keeping the hub connections open failed")
        del client
        time.sleep(min(idle_s / 4, 5.0))


def _chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    """An upload body in pieces, so that what httpx took can be counted (a cut PUT)."""
    view = memoryview(data)
    for offset in range(0, len(data), size):
        yield bytes(view[offset:offset + size])


def _nothing() -> None:
    pass


def _then(chunks: Iterator[bytes], sent: Callable[[], None]) -> Iterator[bytes]:
    """The chunks, then ``sent()`` once the last one has been taken (handed to the kernel)."""
    yield from chunks
    sent()




@dataclasses.dataclass(frozen=True)
class BucketAnswer:
    """The hub's answer to a bucket PUT: 201 stored, 200 already held; ``receipt`` when the
    PUT asked to commit and this bucket completed the set."""

    status: int
    receipt: dict[str, Any] | None = None


class HubClient:
    """Thread-safe: share one per hub. ``on_contact(ok, error)`` is told about every final
    outcome (the link state shown by ``pas status``)."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | bool, *, timeout_s: float = 60.0,
                 retries: int = 4, max_connections: int = 4,
                 throttle: TokenBucket | None = None,
                 on_contact: Callable[[bool, str | None], None] | None = None,
                 backoff_max_s: float = 20.0,
                 on_put_bytes: Callable[[int], None] | None = None,
                 on_inflight: Callable[[int], None] | None = None,
                 link_mbps: float = 0.0, proxy: httpx.Proxy | None = None):
        self.url = url.rstrip("/")
        self.proxy = proxy  # the hospital's, towards the hub (hub.proxy), named in errors
        self.throttle = throttle
        self.on_contact = on_contact
        # Counters of what PUT bodies handed to the network (every attempt) and of the bytes
        # of PUTs under way: what a cut makes the uplink send again is measured with them.
        self.on_put_bytes = on_put_bytes
        self.on_inflight = on_inflight
        self.retries = retries
        self.backoff_max_s = backoff_max_s
        self.hub_certificate_der: bytes | None = None
        self.slots = ConnectionSlots(max_connections)
        self.meter = LinkMeter()
        self._last_used = time.monotonic()
        self._closed = False
        self._warm_thread: threading.Thread | None = None
        # No pool timeout: waiting for a connection means waiting for our own requests, which
        # have timeouts of their own; a slow link must not turn a queue into errors.
        self._http = http_client(
            proxy=proxy, base_url=self.url, verify=ssl_context, http1=True, http2=False,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S),
                                  pool=None),
            limits=httpx.Limits(max_connections=2 * max_connections,
                                max_keepalive_connections=2 * max_connections,
                                keepalive_expiry=KEEP_ALIVE_S),
        )
        self.pacer = Pacer(link_mbps)
        self.reservations = Reservations(self._http)  # asked while the hub is busy
        # Every connection the pool opens is handed to the pacer (low unsent mark; pacing
        # when the line's rate is known).
        pool = self._http._transport._pool
        pool._network_backend = PacedBackend(self.pacer, pool._network_backend)

    def close(self) -> None:
        self._closed = True
        self._http.close()

    # --- warm connections ----------------------------------------------------------------

    def warm(self) -> int:
        """Open (or keep open) every connection of the pool: as many ``GET /whoami`` at once
        as the pool holds. Returns how many answered. Failures are not reported as the link's
        state (the next real call says it)."""
        # Each call keeps its connection busy (its answer not yet read) until every call
        # holds one: a call that ended first gave its connection back to the pool, and a
        # call that started after took that one instead of opening its own (a loaded
        # machine warmed 1 connection of 2).
        together = threading.Barrier(self.slots.total)

        def one(_: int) -> bool:
            try:
                with self._http.stream("GET", f"{API}/whoami", timeout=10.0) as response:
                    self._remember_certificate(response)
                    with contextlib.suppress(threading.BrokenBarrierError):
                        together.wait(10.0)
                    response.read()
                    return response.status_code == 200
            except httpx.HTTPError:
                together.abort()  # the others stop waiting for this one
                return False

        with ThreadPoolExecutor(self.slots.total, thread_name_prefix="pas-hub-warm") as pool:
            answered = sum(pool.map(one, range(self.slots.total)))
        self._last_used = time.monotonic()
        return answered

    def keep_warm(self, idle_s: float = WARM_IDLE_S) -> None:
        """Open the pool's connections now and again whenever no call used them for
        ``idle_s`` (under the hub's keep-alive timeout, 30 s), so that a study's first
        requests do not wait for TCP and TLS handshakes: two round trips, 0.14 s at 70 ms.
        The thread ends once this client is closed or gone."""
        if self._warm_thread is not None:
            return
        self._warm_thread = threading.Thread(target=_keep_warm, args=(weakref.ref(self), idle_s),
                                             name="pas-hub-keep-warm", daemon=True)
        self._warm_thread.start()

    # --- the protocol's calls ------------------------------------------------------------

    def create_transfer(self, manifest: dict[str, Any]) -> int:
        """POST the manifest; 201 created or 200 already known with the same manifest.

        The manifest goes gzip-encoded (a 520-image study's is 130 KB of JSON: four round trips
        of a fresh TCP window at 70 ms; gzipped, 3-4x less). A hub that does not decode gzip
        answers 400: the manifest is then sent again as plain JSON."""
        body = json.dumps(manifest, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if len(body) > 1400:
            response = self._call(
                "POST", f"{API}/transfers", "create transfer",
                content=gzip.compress(body, compresslevel=6, mtime=0),
                headers={**headers, "Content-Encoding": "gzip"})
            if response.status_code not in (400, 415):
                return self._expect(response, {200, 201}, "create transfer").status_code
            log.info("hub refused a gzip-encoded manifest (HTTP %d): sending it plain",
                     response.status_code)
        response = self._call("POST", f"{API}/transfers", "create transfer", content=body,
                              headers=headers)
        return self._expect(response, {200, 201}, "create transfer").status_code

    def put_bucket(self, transfer_id: str, index: int, sealed: bytes,
                   urgent: bool = False, commit: bool = False) -> BucketAnswer:
        """PUT one sealed bucket, paced by the throttle (an urgent one goes first); 201
        stored, 200 already held. ``commit``: ask the hub to commit if this bucket completes
        the set; the answer then carries the receipt (none when the set is not complete, or
        the hub could not commit: the caller commits explicitly, as without it)."""

        def body(sent: Callable[[], None]) -> Any:
            chunks = (self.throttle.paced(sealed, urgent=urgent) if self.throttle
                      else _chunks(sealed))
            return _then(self._counted(chunks) if self.on_put_bytes else chunks, sent)

        def reserve() -> None:
            """While the hub said busy lately, the bucket's reservation first (its PUT
            then uses it): refused busy, the 503 is this attempt's, the body never sent."""
            refused = self.reservations.before_put(transfer_id, index, len(sealed))
            if refused is not None:
                self._remember_certificate(refused)
                raise _ServerError(refused)

        response = self._call(
            "PUT", f"{API}/transfers/{transfer_id}/buckets/{index}", f"bucket {index}",
            content_factory=body, slot=lambda: self._put_slot(urgent, len(sealed), reserve),
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(len(sealed))},
            params={"commit": "true"} if commit else None,
        )
        status = self._expect(response, {200, 201}, f"bucket {index}").status_code
        body = _json(response) if commit else None
        receipt = body.get("receipt") if isinstance(body, dict) else None
        return BucketAnswer(status, receipt if isinstance(receipt, dict) else None)

    def held_buckets(self, transfer_id: str) -> set[int] | None:
        """The bucket indexes the hub holds durably; None if it does not know the transfer."""
        known = self.transfer_held(transfer_id)
        return None if known is None else known[0]

    def transfer_held(self, transfer_id: str) -> tuple[set[int], str | None] | None:
        """(bucket indexes held durably, SHA-256 of the manifest the hub holds: None from a
        hub too old to say it); None if the hub does not know the transfer."""
        response = self._call("GET", f"{API}/transfers/{transfer_id}/buckets", "held buckets")
        if response.status_code == 404:
            return None
        body = self._expect(response, {200}, "held buckets").json()
        digest = body.get("manifest_sha256")
        return {int(i) for i in body.get("held", [])}, digest if isinstance(digest, str) else None

    def commit(self, transfer_id: str) -> httpx.Response:
        """POST commit. The caller reads 200 (receipt), 409 (missing) and 422 (mismatch);
        502 (the archive refused for now) is retried like any 5xx."""
        return self._call("POST", f"{API}/transfers/{transfer_id}/commit", "commit",
                          passthrough={409, 422})

    def receipt(self, transfer_id: str) -> dict[str, Any] | None:
        response = self._call("GET", f"{API}/transfers/{transfer_id}/receipt", "receipt")
        if response.status_code == 404:
            return None
        return dict(self._expect(response, {200}, "receipt").json())

    def holdings(self, question: dict[str, Any]) -> dict[str, Any] | None:
        """POST the holdings question (docs/protocol.md, "Holdings"): the hub's signed
        statement, unchecked (the caller verifies it); None from a hub that does not know the
        call (404/405: an older hub), whose answer is then "send it all", as before."""
        body = json.dumps(question, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if len(body) > 1400:  # gzip, as a manifest: every hub with this call decodes it
            body = gzip.compress(body, compresslevel=6, mtime=0)
            headers["Content-Encoding"] = "gzip"
        response = self._call("POST", f"{API}/holdings", "holdings", content=body,
                              headers=headers)
        if response.status_code in (404, 405):
            return None
        return dict(self._expect(response, {200}, "holdings").json())

    def verify(self, receipt: dict[str, Any]) -> None:
        """Check a receipt against the certificate the hub presented on this client's TLS
        connection (itself verified against the pinned fleet CA)."""
        if self.hub_certificate_der is None:
            raise ReceiptInvalid("no hub certificate seen on the TLS connection")
        verify_receipt(receipt, self.hub_certificate_der)

    @contextlib.contextmanager
    def _put_slot(self, urgent: bool, size: int, reserve: Callable[[], None] | None = None
                  ) -> Iterator[Callable[[], None]]:
        """Held around one PUT attempt. Yields ``sent``, called once the body is handed to
        the kernel: the slot, the meter and the pacer's share go to the next PUT then, while
        this one waits for its answer on its own connection (in flight until it comes).
        ``reserve``: called once the slot is held (a site's reservations are then at most
        its PUTs sending at once), before the PUT is measured."""
        with contextlib.ExitStack() as sending:
            sending.enter_context(self.slots.hold(urgent))
            if reserve is not None:
                reserve()
            sending.enter_context(self.meter.measure(size))
            sending.enter_context(self.pacer.sending())
            done = sending.pop_all()
        if self.on_inflight:
            self.on_inflight(size)
        try:
            yield done.close
        except BaseException as exc:  # before the body was handed over: not a measured PUT
            done.__exit__(type(exc), exc, exc.__traceback__)
            raise
        finally:
            done.close()
            if self.on_inflight:
                self.on_inflight(-size)

    def _counted(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        assert self.on_put_bytes is not None
        for chunk in chunks:
            self.on_put_bytes(len(chunk))
            yield chunk

    # --- plumbing ------------------------------------------------------------------------

    def _call(self, method: str, path: str, what: str, *,
              content_factory: Callable[[Callable[[], None]], Any] | None = None,
              passthrough: set[int] = frozenset(),  # type: ignore[assignment]
              slot: Callable[[], contextlib.AbstractContextManager[Callable[[], None]]]
              | None = None,
              **kwargs: Any) -> httpx.Response:
        """One request with retries on transport errors and 5xx. Returns the final response
        (2xx, 4xx); raises :class:`HubUnavailable` when the retries are spent. ``slot``: a
        connection slot held during each attempt (not during the backoff between them)."""

        def attempt() -> httpx.Response:
            self._last_used = time.monotonic()
            with slot() if slot is not None else contextlib.nullcontext(_nothing) as sent:
                if content_factory is not None:  # told when its last byte is handed over
                    kwargs["content"] = content_factory(sent)
                response = self._http.request(method, path, **kwargs)
            self._remember_certificate(response)
            if response.status_code >= 500:
                raise _ServerError(response)
            return response

        def attempt_noting_busy() -> httpx.Response:
            try:
                return attempt()
            except _ServerError as exc:
                if retry_after(exc) is not None:  # busy: PUTs reserve first for a while
                    self.reservations.busy()
                raise

        backoff = wait_random_exponential(multiplier=0.5, max=self.backoff_max_s)

        def wait(state: RetryCallState) -> float:
            """A busy hub's Retry-After (and up to a quarter more, so that the sites it
            turned away do not all come back at the same instant), else the backoff."""
            asked = retry_after(state.outcome.exception() if state.outcome else None)
            return backoff(state) if asked is None else asked + random.uniform(0, asked / 4)

        retrying = Retrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_attempt(self.retries + 1),
            wait=wait,
            reraise=False,
            before_sleep=lambda state: log.info(
                "hub %s: attempt %d failed (%s), retrying", what, state.attempt_number,
                state.outcome.exception() if state.outcome else "?"),
        )
        try:
            response = retrying(attempt_noting_busy)
        except (RetryError, httpx.TransportError) as exc:
            # Retries spent, or a failure not worth one (a certificate refused): the same.
            cause = exc.last_attempt.exception() if isinstance(exc, RetryError) else exc
            message = f"hub {what}{proxy_words(self.proxy)}: {type(cause).__name__}: {cause}"
            asked = retry_after(cause)
            if asked is not None:  # it answered: the link is up, the hub busy
                self._contact(True, None)
                raise HubBusy(f"hub {what}: busy (HTTP 503, Retry-After {asked:.0f} s)",
                              asked) from cause
            self._contact(False, message)
            raise HubUnavailable(message) from cause
        self._contact(True, None)
        return response

    def _expect(self, response: httpx.Response, ok: set[int], what: str) -> httpx.Response:
        if response.status_code not in ok:
            raise HubRefused(response.status_code, _json(response), what)
        return response

    def _contact(self, ok: bool, error: str | None) -> None:
        if self.on_contact is not None:
            try:
                self.on_contact(ok, error)
            except Exception:  # the link state is informative; never fail a transfer on it
                log.exception("recording the link state failed")

    def _remember_certificate(self, response: httpx.Response) -> None:
        """Keep the certificate of the connection that gave the latest answer, so that a
        receipt is checked against the key of the hub that sent it (a renewed server
        certificate takes effect without a restart)."""
        stream = response.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        if ssl_object is not None:
            self.hub_certificate_der = ssl_object.getpeercert(True)
