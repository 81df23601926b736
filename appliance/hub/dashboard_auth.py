"""Who may read the hub's fleet dashboard and ``/metrics``: HTTP Basic over the hub's TLS.

Owns: the ``dashboard.auth = "basic"`` check in front of every path but the open ones
(:data:`OPEN_PATHS` and the sites' ``/api/v1/``): the fleet pages and ``/metrics``, and any
page a later route adds (:class:`DashboardGuard`), the password hashes ``pas hub password``
makes and the check reads (:func:`hash_password`, :func:`password_matches`), and the
refusals' counts and log lines. May not touch: SQL, the PKI, the ``/api/v1`` routes (the
sites' client certificates, :class:`appliance.hub.app.ClientCertificateGate`), ``/enroll``
and ``/healthz`` (an appliance enrols and a probe checks without a password).

Why: the dashboard and ``/metrics`` answered anyone who reached the hub's port: every site's
name, its backlog, its disk, its software version and its heartbeat's error lines (file
names, certificate settings, the addresses it could not reach). A regional hub's port is
reachable from every hospital of the region, by design. Why Basic and not client
certificates: regional ops read the dashboard in a browser, and Prometheus scrapes with
``basic_auth``; the sites' certificates come from the same fleet CA and must not open it
(one site's box would read every other site's state). The hub speaks only TLS 1.3, so the
password never travels in clear.

Why scrypt, and a memory of accepted headers: a hash that takes ~50 ms to check makes a
stolen ``hub.toml`` slow to guess from; the browser sends the same header with every request
(the page refreshes itself), so a header once checked is taken for
:data:`REMEMBER_S` without hashing again. Failed checks are hashed off the event loop, and a
source past :data:`FAILURES_PER_MINUTE` is answered 429 unhashed: guessing costs the hub
little; two checks run at a time at most (the threads are the sites' too), a third sign-in
meanwhile is answered 503 unchecked; checks in flight count as failures until they end, so
guesses sent at once get no more than guesses sent in turn.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.hub.fleet_gate import LogPace

log = logging.getLogger("pas.hub.dashboard")

SCHEME = "scrypt"
# scrypt's cost: N=2**14, r=8 (16 MiB, ~50 ms on the 2-core VM), p=1.
COST_N, COST_R, COST_P = 1 << 14, 8, 1
MIN_PASSWORD_LENGTH = 12
# The only costs parse_hash takes: those hash_password makes, and one step either side. A
# hash of other costs in hub.toml would make each sign-in take seconds and hundreds of MiB,
# or fail at request time (review, 2026-12-06).
COSTS_TAKEN = {(1 << 13, 8, 1), (1 << 14, 8, 1), (1 << 15, 8, 1)}
MAX_MEMORY = 64 << 20       # scrypt's maxmem: 128 * r * N of the largest cost taken, doubled
HASHING_AT_ONCE = 2         # password checks running at once; more: 503 (the thread pool is
                            # the sites' too: heartbeats, transfers)
REMEMBER_S = 600.0          # an accepted Authorization header is taken unhashed this long
REMEMBERED_HEADERS = 256    # at most this many remembered (the oldest go first)
FAILURES_PER_MINUTE = 10    # per source address; past it, 429 without hashing
SOURCES_TRACKED = 4096      # source addresses whose failures are counted, at most
REALM = "PAS hub"

# The refusals' reasons, the label of pas_hub_dashboard_refused_total.
REASONS = ("no-credentials", "not-basic", "unknown-user", "wrong-password", "too-many-failures",
           "busy")


# What stays open under "basic": the sites' routes (their client certificates, checked by
# appliance.hub.app.ClientCertificateGate), enrolment, liveness and the API's description.
OPEN_PATHS = frozenset({"/enroll", "/enroll/ca", "/healthz", "/openapi.json"})
SITE_PREFIX = "/api/v1/"


def guarded(path: str) -> bool:
    """Every path but the open ones: the fleet pages and ``/metrics`` today, and whatever
    page a later route adds, guarded without anyone having to remember to list it."""
    return path not in OPEN_PATHS and not path.startswith(SITE_PREFIX) and path != "/api/v1"


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a dashboard user's name, or None."""
    if not name or len(name) > 64 or ":" in name or not name.isascii() \
            or not name.isprintable() or name != name.strip():
        return (f"user name {name!r} cannot be used: 1-64 printable ASCII characters, no "
                "colon (HTTP Basic), no spaces around")
    return None


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The line ``pas hub password`` prints: ``scrypt$N$r$p$salt$hash`` (base64)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=COST_N, r=COST_R, p=COST_P,
                            dklen=32)
    return "$".join([SCHEME, str(COST_N), str(COST_R), str(COST_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


@dataclass(frozen=True)
class PasswordHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def parse_hash(text: str) -> PasswordHash:
    """``text`` read as :func:`hash_password` writes it; ValueError naming what is wrong."""
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError("is not a password hash made by `pas hub password NAME` "
                         "(scrypt$N$r$p$salt$hash); a password itself is never written here")
    try:
        n, r, p = (int(part) for part in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("is a damaged password hash (its numbers or base64 do not read): "
                         "make it again with `pas hub password NAME`") from None
    if (n, r, p) not in COSTS_TAKEN or len(salt) < 8 or len(digest) != 32:
        raise ValueError("is a password hash with costs or sizes pas hub password never "
                         "makes: make it again with `pas hub password NAME`")
    return PasswordHash(n, r, p, salt, digest)


def password_matches(password: str, stored: PasswordHash) -> bool:
    digest = hashlib.scrypt(password.encode(), salt=stored.salt, n=stored.n, r=stored.r,
                            p=stored.p, dklen=len(stored.digest), maxmem=MAX_MEMORY)
    return hmac.compare_digest(digest, stored.digest)


@dataclass
class DashboardRefusals:
    """Refused requests by reason since the hub started (read by ``/metrics``), and one
    log line per source and minute at most (:class:`LogPace`)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    _paces: dict[str, LogPace] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refused(self, reason: str, source: str, path: str, user: str | None) -> None:
        with self._lock:
            self.counts[reason] += 1
            if source not in self._paces and len(self._paces) >= SOURCES_TRACKED:
                self._paces.clear()
            said = self._paces.setdefault(source, LogPace()).count(time.monotonic())
        if said is not None:
            who = f" as {user!r}" if user is not None else ""
            more = f" ({said} refused since the last line)" if said > 1 else ""
            log.warning("dashboard: refused GET %s from %s%s: %s%s", path, source, who,
                        reason.replace("-", " "), more)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


def source_key(address: str) -> str:
    """Whose failures count together: an IPv4 address, or an IPv6 address's /64 (one host
    is given a whole /64 and may use any address in it)."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


class _Failures:
    """Failed checks per source in the last minute, and the checks in flight, which count
    as failures until they end: requests sent at once are all counted before any is hashed
    (they all passed a check that counted only the finished ones; review, 2026-12-06)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times: OrderedDict[str, list[float]] = OrderedDict()
        self._pending: dict[str, int] = {}

    def begin(self, source: str, now: float) -> bool:
        """Whether ``source`` may have one more check; if so it counts from now."""
        with self._lock:
            recent = [t for t in self._times.get(source, []) if now - t < 60.0]
            if recent:
                self._times[source] = recent
            else:
                self._times.pop(source, None)
            if len(recent) + self._pending.get(source, 0) >= FAILURES_PER_MINUTE:
                return False
            self._pending[source] = self._pending.get(source, 0) + 1
            return True

    def end(self, source: str, now: float, failed: bool) -> None:
        with self._lock:
            left = self._pending.get(source, 1) - 1
            if left > 0:
                self._pending[source] = left
            else:
                self._pending.pop(source, None)
            if failed:
                self._times.setdefault(source, []).append(now)
                self._times.move_to_end(source)
                while len(self._times) > SOURCES_TRACKED:
                    self._times.popitem(last=False)


class DashboardGuard:
    """ASGI middleware: the dashboard's paths (:func:`guarded`) need ``Authorization:
    Basic`` naming one of ``users`` (name -> :class:`PasswordHash`) with its password; else
    401 with ``WWW-Authenticate: Basic`` (a browser asks for them) and the route is not run."""

    def __init__(self, app: ASGIApp, users: dict[str, PasswordHash],
                 refusals: DashboardRefusals):
        self.app = app
        self.users = users
        self.refusals = refusals
        self._accepted: OrderedDict[bytes, float] = OrderedDict()  # sha256(header) -> when
        self._accepted_lock = threading.Lock()
        self._failures = _Failures()
        self._hashing = asyncio.Semaphore(HASHING_AT_ONCE)
        # Checked for a name no user has, with a user's costs: the same time as a known
        # name's check, and made here, not on the event loop at the first unknown name.
        costs = next(iter(users.values()), None)
        self._unknown = _unknown_user(*((costs.n, costs.r, costs.p) if costs else
                                        (COST_N, COST_R, COST_P)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope.get("headers", [])
                       if name == b"authorization"), b"")
        source = (scope.get("client") or ("?", 0))[0]
        now = time.monotonic()
        if header and self._remembered(header, now):
            await self.app(scope, receive, send)
            return
        user, reason = None, None
        if not header:
            reason = "no-credentials"
        else:
            scheme, _, credentials = header.partition(b" ")
            key = source_key(source)
            if scheme.lower() != b"basic":
                reason = "not-basic"
            elif self._hashing.locked():
                reason = "busy"
            elif not self._failures.begin(key, now):
                reason = "too-many-failures"
            else:
                user, password = _basic(credentials)
                stored = self.users.get(user) if user is not None else None
                try:
                    async with self._hashing:
                        # An unknown name costs the same hash as a known one: the time of
                        # the answer does not say which names exist.
                        matched = await run_in_threadpool(password_matches, password or "",
                                                          stored or self._unknown)
                    if stored is None:
                        reason = "unknown-user"
                    elif not matched:
                        reason = "wrong-password"
                finally:
                    self._failures.end(key, time.monotonic(), failed=reason is not None)
        if reason is None:
            self._remember(header, now)
            await self.app(scope, receive, send)
            return
        await _refusal(reason)(scope, receive, send)
        self.refusals.refused(reason, source, str(scope["path"])[:200], user)

    def _remembered(self, header: bytes, now: float) -> bool:
        key = hashlib.sha256(header).digest()
        with self._accepted_lock:
            at = self._accepted.get(key)
            if at is None or now - at >= REMEMBER_S:
                self._accepted.pop(key, None)
                return False
            return True

    def _remember(self, header: bytes, now: float) -> None:
        key = hashlib.sha256(header).digest()
        with self._accepted_lock:
            self._accepted[key] = now
            self._accepted.move_to_end(key)
            while len(self._accepted) > REMEMBERED_HEADERS:
                self._accepted.popitem(last=False)


@functools.cache
def _unknown_user(n: int, r: int, p: int) -> PasswordHash:
    """A hash of these costs no password matches in practice (a random one's), checked for
    names no user has."""
    salt = secrets.token_bytes(16)
    return PasswordHash(n, r, p, salt, hashlib.scrypt(secrets.token_bytes(32), salt=salt,
                                                      n=n, r=r, p=p, dklen=32,
                                                      maxmem=MAX_MEMORY))


def _basic(credentials: bytes) -> tuple[str | None, str | None]:
    """``user, password`` of a Basic header's credentials (UTF-8, RFC 7617), or None, None."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None, None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else (None, None)


def _refusal(reason: str) -> JSONResponse:
    if reason == "busy":
        return JSONResponse(
            {"error": 503, "detail": f"{HASHING_AT_ONCE} sign-ins are being checked already: "
                                     "try again in a few seconds"},
            status_code=503, headers={"Retry-After": "5"})
    if reason == "too-many-failures":
        return JSONResponse(
            {"error": 429, "detail": f"more than {FAILURES_PER_MINUTE} failed sign-ins from "
                                     "this address in a minute: wait a minute"},
            status_code=429, headers={"Retry-After": "60"})
    detail = {
        "no-credentials": "the fleet dashboard and /metrics need a user name and password "
                          "(HTTP Basic; dashboard.users of the hub's hub.toml)",
        "not-basic": "the Authorization header is not HTTP Basic",
        "unknown-user": "unknown user name or wrong password",
        "wrong-password": "unknown user name or wrong password",
    }[reason]
    return JSONResponse({"error": 401, "detail": detail}, status_code=401,
                        headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})
