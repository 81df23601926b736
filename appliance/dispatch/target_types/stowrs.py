"""Destination kind ``stowrs``: plain DICOMweb STOW-RS (PS3.18 10.5) to any DICOMweb archive.

Owns: batching a job's instances into ``multipart/related; type="application/dicom"``
requests (``instances_per_request`` each), streamed from the spool file by file (never a
whole batch in memory, with an exact Content-Length so no chunked encoding is needed), reading
the per-instance answer (Referenced / Failed SOP Sequence) and marking sent exactly the
instances the archive accepted, after each request: a retry resumes per instance. The job's
lease is renewed by time while a request is out (``SendContext.renewing``), however long the
archive takes to answer. May not touch: SQL (through ``SendContext`` and
``appliance.store``) or the files' bytes (they go as stored, so the archive gets the
original SHA-256).

Failure policy: transport errors and 5xx are retried here a few times (tenacity, jittered
backoff), then the job is retried later by the dispatcher. When the archive could not be
reached at all (no connection: refused, timed out, no route, DNS) for the attempt's first
request, after those retries, the target raises ``LinkDown``: the job waits for the archive,
uncounted, however long its maintenance lasts. A 5xx, a connection lost mid-request or a
failure after some requests of the attempt went through is the archive answering or having
answered: an ordinary failed attempt, counted towards ``queue.max_attempts``. A 4xx for the
whole request, or instances refused with a "cannot process" class reason, fail the job for
good with the archive's words; refusals for lack of resources (0xA7xx) or processing failure
(0x0110) are transient. A 200 with no body at all (or a DICOM JSON dataset listing nothing)
means every instance stored, as PS3.18 has the status say it; a 200 whose body is not DICOM
JSON (an SSO proxy's login page, a web app's index.html for any path) is a failed attempt,
retried, naming its Content-Type and first bytes: it was taken for "all stored" until
2026-12-07, the job done and nothing stored (tests/test_dispatch_stowrs_html_s41.py).

A refusal as a duplicate (FailureReason 0xB00E = 45070, "an instance with these UIDs exists",
as Microsoft's DICOM service answers, or 0x0111 Duplicate SOP Instance; or a 409 with no
per-instance answer, as Google's can) means "maybe held already": a batch re-POSTed after its
answer was lost, or after a kill -9 between the archive storing it and ``mark_sent``. Each
such instance is read back (WADO-RS, ``transfer-syntax=*``) and hashed: the SHA-256 of the
spool file is "held" and it is marked sent; other bytes fail the job for good naming both
SHA-256; a read-back that fails (a 5xx, no connection, not found yet) retries the job later.
Until 2026-12-07 the duplicate reason alone failed the job for good and the instances the
archive held bit-exact were never marked sent (tests/test_dispatch_stowrs_duplicates.py).
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from appliance.config import StowRsDestination
from appliance.dispatch.target_types.base import (
    LinkDown,
    PermanentError,
    SendContext,
    TrustRefused,
)
from appliance.store import index as index_store
from appliance.store import uplink as uplink_store
from appliance.store.jobs import Job
from appliance.transfer.http import http_client, proxy_words, shown_url
from appliance.transfer.link_failures import proxy_refusal, trust_problem
from appliance.transfer.multipart import StreamedParts
from appliance.words import counted

log = logging.getLogger("pas.dispatch.stowrs")

READ_CHUNK = 1024 * 1024
RETRIES = 3
# DICOM JSON tags of the STOW-RS response (PS3.18 Table 10.5.3-1).
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
TRANSIENT_REASONS = {0x0110, 0xA700}  # processing failure; out of resources
# "Held already": Microsoft's 45070 (0xB00E, "a file with the same identifiers exists"),
# PS3.4's 0x0111 (Duplicate SOP Instance), and a 409 answered with no per-instance answer
# (CONFLICT, not a DICOM code: the request as a whole).
CONFLICT = -409
DUPLICATE_REASONS = {0xB00E, 0x0111, CONFLICT}
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class _ServerError(Exception):
    def __init__(self, response: httpx.Response):
        self.response = response
        super().__init__(f"HTTP {response.status_code}: {response.text[:300]}")


class _NoConnection(ConnectionError):
    """Every try of a request failed to connect: the archive was not reached at all."""


# httpx.ConnectTimeout is a TimeoutException, not a ConnectError: both mean no connection.
NO_CONNECTION = (httpx.ConnectError, httpx.ConnectTimeout)


def _transient(exc: BaseException) -> bool:
    """A transport error or a 5xx, but not a certificate refused (it comes back each time)."""
    return isinstance(exc, httpx.TransportError | _ServerError) and trust_problem(exc) is None


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value", []) or [])


def parse_stow_response(body: Any) -> tuple[set[str], dict[str, int]]:
    """(accepted SOP Instance UIDs, {refused UID: failure reason}) from a DICOM JSON answer."""
    if isinstance(body, list):  # some servers wrap the dataset in a list
        body = body[0] if body else {}
    if not isinstance(body, dict):
        return set(), {}
    accepted = {str(_values(i, REFERENCED_SOP_INSTANCE_UID)[0])
                for i in _values(body, REFERENCED_SOP_SEQUENCE)
                if _values(i, REFERENCED_SOP_INSTANCE_UID)}
    refused: dict[str, int] = {}
    for item in _values(body, FAILED_SOP_SEQUENCE):
        uids = _values(item, REFERENCED_SOP_INSTANCE_UID)
        reasons = _values(item, FAILURE_REASON)
        if uids:
            refused[str(uids[0])] = int(reasons[0]) if reasons else 0xC000
    return accepted, refused


def reason_words(reason: int) -> str:
    """A failure reason as the job's last_error names it: ``0xB00E``, or ``HTTP 409``."""
    return "HTTP 409" if reason == CONFLICT else f"0x{reason:04X}"


class PartDigests(StreamedParts):
    """Hashes each part's body of a ``multipart/related`` answer (a WADO-RS answer) with
    SHA-256 as it streams (the parsing is :class:`appliance.transfer.multipart.
    MultipartReader`'s): memory holds one chunk, whatever the size of the instance."""

    def __init__(self, boundary: bytes):
        super().__init__(boundary)
        self.digest: Any = None
        self.digests: list[str] = []

    def part_started(self) -> None:
        self.digest = hashlib.sha256()

    def part_data(self, data: bytes) -> None:
        self.digest.update(data)

    def part_ended(self) -> None:
        self.digests.append(self.digest.hexdigest())


def _boundary(content_type: str) -> bytes | None:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode()
    return None


class MultipartBody:
    """A ``multipart/related`` body over files on disk: its exact length is known up front
    and iterating it reads one chunk at a time."""

    def __init__(self, paths: list[Path]):
        self.boundary = f"pas-{uuid.uuid4().hex}"
        self.paths = paths
        self._head = (f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode()
        self._tail = f"--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        sizes = sum(p.stat().st_size for p in self.paths)
        return sizes + len(self.paths) * (len(self._head) + 2) + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        for path in self.paths:
            yield self._head
            with open(path, "rb") as handle:
                while chunk := handle.read(READ_CHUNK):
                    yield chunk
            yield b"\r\n"
        yield self._tail


class StowRsTarget:
    kind = "stowrs"

    def __init__(self, name: str, config: StowRsDestination,
                 proxy: httpx.Proxy | None = None):
        self.name = name
        self.config = config
        # hub.proxy when the destination is ``through_proxy``: every request a CONNECT
        # tunnel through the hospital's proxy (appliance/transfer/http.py), none around it.
        self.proxy = proxy

    def _client(self) -> httpx.Client:
        verify: ssl.SSLContext | bool = True
        if self.config.url.startswith("https://"):
            context = ssl.create_default_context(
                cafile=str(self.config.ca_file) if self.config.ca_file else None)
            if self.config.client_cert:
                if self.config.client_key:  # 0600 as every key PAS uses (ops/security.py)
                    from appliance.ops.security import SecretFileError, check_secret_file

                    try:
                        check_secret_file(self.config.client_key,
                                          f"destinations.{self.name}.client_key")
                    except SecretFileError as exc:  # a setting to put right: jobs wait
                        raise TrustRefused(str(exc)) from None
                context.load_cert_chain(
                    str(self.config.client_cert),
                    str(self.config.client_key) if self.config.client_key else None)
            verify = context
        auth: httpx.Auth | None = None
        headers = {"Accept": "application/dicom+json"}
        if self.config.bearer_token:
            headers["Authorization"] = f"Bearer {self.config.bearer_token}"
        elif self.config.username is not None:
            auth = httpx.BasicAuth(self.config.username, self.config.password or "")
        return http_client(verify=verify, auth=auth, headers=headers, proxy=self.proxy,
                           timeout=httpx.Timeout(self.config.timeout_s))

    def send(self, job: Job, context: SendContext) -> None:
        rows = context.files(job)
        if not rows:
            return
        size = self.config.instances_per_request
        refused_for_good: dict[str, str] = {}  # UID: why (the job's last_error)
        retry_later: dict[str, str] = {}  # UID: why, "" when the archive said no more
        # The lease is renewed by time while a request is out, as the dicom kind does: it
        # was renewed only after each whole request, and a POST to a slow archive outlasted
        # queue.lease_s; a second worker then claimed the job and POSTed the same study at
        # the same time, and the first worker's attempt ended "lease lost" (with
        # max_attempts spent that way, a live job failed "the worker died while sending it").
        answered = False
        with self._client() as client, context.renewing(job) as lease_lost:
            for start in range(0, len(rows), size):
                if lease_lost.is_set():
                    raise RuntimeError(f"job {job.id}: lease lost, another worker owns it now")
                batch = rows[start:start + size]
                # Replaced by a correction filed since the attempt began: left out, as the
                # attempt's start leaves out those replaced by then.
                left_out = context.left_out(job, batch)
                batch = [r for r in batch if int(r["id"]) not in left_out]
                if not batch:
                    continue
                try:
                    accepted, refused = self._post(client, context, batch)
                except _NoConnection as exc:
                    if not answered:  # nothing answered in this attempt: wait for the archive
                        raise LinkDown(str(exc)) from exc
                    raise
                answered = True
                by_uid = {r["sop_instance_uid"]: r for r in batch}
                maybe_held = [by_uid[u] for u, r in refused.items()
                              if r in DUPLICATE_REASONS and u in by_uid]
                judged = self._read_back_all(client, context, maybe_held, refused)
                accepted = accepted | {u for u, (held, _why) in judged.items() if held is True}
                context.mark_sent(job, [by_uid[u]["id"] for u in accepted if u in by_uid])
                unanswered = set(by_uid) - accepted - set(refused)
                for uid, reason in refused.items():
                    if uid in accepted:
                        continue
                    if uid in judged:  # other bytes: for good; not known yet: later
                        held, why = judged[uid]
                        (refused_for_good if held is False else retry_later)[uid] = why
                    elif reason in TRANSIENT_REASONS:
                        retry_later[uid] = ""
                    else:
                        refused_for_good[uid] = reason_words(reason)
                for uid in unanswered:
                    retry_later[uid] = ""
        if refused_for_good:
            sample = ", ".join(f"{u} ({why})" for u, why in list(refused_for_good.items())[:3])
            raise PermanentError(f"{self.name} refused "
                                 f"{counted(len(refused_for_good), 'instance')}: {sample}")
        if retry_later:
            sample = ", ".join(f"{u}: {why}" if why else u
                               for u, why in list(retry_later.items())[:3])
            raise RuntimeError(f"{self.name} did not accept "
                               f"{counted(len(retry_later), 'instance')} yet (e.g. {sample}); "
                               "retrying later")

    def _read_back_all(self, client: httpx.Client, context: SendContext, rows: list[Any],
                       reasons: dict[str, int]) -> dict[str, tuple[bool | None, str]]:
        """{UID: (True held with our bytes | False held with other bytes | None not known,
        why)} for the instances the archive refused as held already."""
        places = index_store.instance_places(context.db, [int(r["id"]) for r in rows])
        judged: dict[str, tuple[bool | None, str]] = {}
        for row in rows:
            uid = str(row["sop_instance_uid"])
            said = reason_words(reasons[uid])
            place = places.get(int(row["id"]))
            if place is None:  # the instance left the index meanwhile: the next try sees
                judged[uid] = (None, f"refused as held already ({said}), and its study is "
                                     "not in the index to read it back")
                continue
            held, why = self._read_back(client, uid, str(row["sha256"]), *place)
            if held is True:
                log.info("%s: %s refused as held already (%s); read back with the same "
                         "SHA-256: sent", self.name, uid, said)
                judged[uid] = (True, "")
            elif held is False:
                log.warning("%s: %s refused as held already (%s), with other bytes: %s",
                            self.name, uid, said, why)
                judged[uid] = (False, f"{said}: {why}")
            elif reasons[uid] == CONFLICT and why.endswith("answered 404"):
                # A bare 409 for an instance the archive does not hold: a real conflict.
                judged[uid] = (False, f"{said}: the archive refused it (Conflict) and does "
                                      "not hold it")
            else:
                judged[uid] = (None, f"refused as held already ({said}), {why}")
        return judged

    def _read_back(self, client: httpx.Client, uid: str, sha256: str, study: str,
                   series: str) -> tuple[bool | None, str]:
        """WADO-RS of one instance as the archive stores it: (True, "") its SHA-256 is
        ``sha256``; (False, why) other bytes; (None, why) not known (not found, an error)."""
        url = f"{self.config.url}/studies/{study}/series/{series}/instances/{uid}"
        try:
            with client.stream("GET", url, headers={"Accept": WADO_ACCEPT}) as response:
                if response.status_code != 200:
                    return None, f"reading it back (WADO-RS) answered {response.status_code}"
                boundary = _boundary(response.headers.get("content-type", ""))
                if boundary is None:
                    return None, ("reading it back (WADO-RS) answered "
                                  f"{response.headers.get('content-type')!r}, not multipart")
                parts = PartDigests(boundary)
                for chunk in response.iter_bytes():
                    parts.feed(chunk)
        except (httpx.HTTPError, ValueError) as exc:
            return None, f"reading it back (WADO-RS) failed: {type(exc).__name__}: {exc}"
        if len(parts.digests) != 1:
            return None, (f"reading it back (WADO-RS) gave {len(parts.digests)} parts "
                          "instead of 1")
        if parts.digests[0] != sha256:
            return False, (f"the archive already holds this SOP Instance UID with other bytes "
                           f"(SHA-256 held {parts.digests[0]}, sent {sha256}) and kept them")
        return True, ""

    def _post(self, client: httpx.Client, context: SendContext,
              batch: list[Any]) -> tuple[set[str], dict[str, int]]:
        paths = [context.spool.path(r["path"]) for r in batch]
        url = f"{self.config.url}/studies"

        def attempt() -> httpx.Response:
            body = MultipartBody(paths)
            response = client.post(url, content=iter(body), headers={
                "Content-Type": body.content_type, "Content-Length": str(len(body))})
            if response.status_code >= 500:
                raise _ServerError(response)
            return response

        retrying = Retrying(retry=retry_if_exception(_transient),
                            stop=stop_after_attempt(RETRIES + 1),
                            wait=wait_random_exponential(multiplier=0.5, max=10), reraise=False)
        try:
            response = retrying(attempt)
        except (RetryError, httpx.TransportError) as exc:
            # Retries spent, or a failure not worth one (a certificate refused).
            cause = exc.last_attempt.exception() if isinstance(exc, RetryError) else exc
            where = httpx.URL(url)
            port = where.port or (443 if where.scheme == "https" else 80)
            refused = proxy_refusal(cause, f"{self.name} ({where.host}:{port})",
                                    f"port {port}") if cause is not None else None
            if refused is not None:  # credentials or the port: a person acts, none fails
                message = f"{self.name}: {refused}"
                uplink_store.record_contact(context.db, self.name, False, message)
                raise TrustRefused(message) from cause
            problem = trust_problem(cause) if cause is not None else None
            if problem is not None:  # the same for every job: none fails for it
                message = (f"{self.name}: {problem}; check destinations.{self.name}'s "
                           "ca_file, client_cert and client_key (`pas doctor`)")
                uplink_store.record_contact(context.db, self.name, False, message)
                raise TrustRefused(message) from cause
            # The URL as messages carry it (no userinfo, no query): these words go to the
            # log, the job's last_error, `pas status` and the heartbeat to the hub.
            shown = shown_url(url)
            if isinstance(cause, (*NO_CONNECTION, httpx.ProxyError)):  # a proxy's 502, 504
                message = (f"{self.name} unreachable: no connection to {shown}"
                           f"{proxy_words(self.proxy)} after {RETRIES + 1} tries "
                           f"({type(cause).__name__}: {cause})")
                uplink_store.record_contact(context.db, self.name, False, message)
                raise _NoConnection(message) from cause
            message = (f"{self.name}: STOW-RS to {shown}{proxy_words(self.proxy)} failed: "
                       f"{type(cause).__name__}: {cause}")
            uplink_store.record_contact(context.db, self.name, False, message)
            raise ConnectionError(message) from cause
        uplink_store.record_contact(context.db, self.name, True)
        readable = True
        try:  # whitespace alone is no answer: the status says it (review s41 of c150595)
            body = response.json() if response.content.strip() else {}
        except ValueError:  # not JSON: DICOM XML, or an HTML page, a proxy's words
            body, readable = None, False
        accepted, refused = parse_stow_response(body)
        if response.status_code in (200, 202, 409) and (accepted or refused):
            return accepted, refused
        if response.status_code == 200 and body in ({}, [], [{}]):
            # No per-instance answer (no body at all, or a DICOM JSON dataset that lists
            # nothing): a 200 to STOW-RS means every instance was stored (PS3.18: the
            # status alone says it; some archives send no Store Instances Response).
            return {r["sop_instance_uid"] for r in batch}, {}
        if response.status_code == 200 and not readable and _dicom_xml(response):
            # An archive that answers the Store Instances Response in DICOM XML (PS3.19),
            # ignoring the Accept: a 200 still says every instance was stored. Taken as a
            # failure, as any body not JSON was for a while, each of its jobs re-sent the
            # study max_attempts times and failed.
            return {r["sop_instance_uid"] for r in batch}, {}
        if response.status_code == 200 and not readable:
            # A body that is not DICOM JSON is not the archive's answer: an SSO login page
            # or a web app's index.html answered 200 for any path. It was taken for "all
            # stored": every instance marked sent, the job done, nothing stored (until
            # 2026-12-07). Retried later; the words say what answered.
            raise RuntimeError(f"{self.name}: STOW-RS answered HTTP 200 with a body that is "
                               f"not DICOM JSON ({_said(response)}): nothing taken as "
                               "stored; retrying later (is the URL the archive's DICOMweb "
                               "root, behind no login page?)")
        if response.status_code == 409:
            # A conflict with no per-instance answer: maybe every instance is held already
            # (a re-POST); the read-back of each tells.
            return set(), {r["sop_instance_uid"]: CONFLICT for r in batch}
        if response.status_code in (408, 429):
            raise RuntimeError(f"{self.name}: STOW-RS answered HTTP {response.status_code} "
                               f"(busy); retrying later")
        if response.status_code in (401, 403):
            # Credentials refused (a password changed, a token expired): every job would meet
            # it and none is at fault; they wait until the configuration is put right.
            raise TrustRefused(f"{self.name}: STOW-RS answered HTTP {response.status_code}, "
                               f"the archive refuses this appliance's credentials; check "
                               f"destinations.{self.name}'s bearer_token or username and "
                               f"password: {response.text[:200]}")
        if 400 <= response.status_code < 500:
            raise PermanentError(f"{self.name}: STOW-RS answered HTTP {response.status_code}: "
                                 f"{response.text[:300]}")
        raise RuntimeError(f"{self.name}: unexpected STOW-RS answer HTTP "
                           f"{response.status_code} ({_said(response)})")


def _dicom_xml(response: httpx.Response) -> bool:
    """Whether the answer's media type is DICOM XML (``application/dicom+xml``, or multipart
    of it)."""
    media = response.headers.get("content-type", "").lower()
    return "application/dicom+xml" in media


def _said(response: httpx.Response, first: int = 80) -> str:
    """An answer's Content-Type and first bytes, escaped (control characters, markup and
    non-ASCII bytes as Python writes them in a bytes literal) and short: what the job's
    last_error, the log and the heartbeat carry of an answer that is not the archive's."""
    content = response.content
    kind = response.headers.get("content-type")
    said = f"Content-Type {ascii(kind) if kind is not None else 'none'}"
    if not content:
        return f"{said}, no body"
    more = f"... ({len(content)} bytes)" if len(content) > first else ""
    return f"{said}, body {repr(content[:first])[2:-1]}{more}"
