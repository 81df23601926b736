"""Who may read the hub's fleet dashboard and ``/metrics``: HTTP Basic over the hub's TLS.

Owns: the ``dashboard.auth = "basic"`` check in front of ``/``, ``/fleet``, ``/fleet/...``
and ``/metrics`` (:class:`DashboardGuard`), the password hashes ``pas hub password`` makes
and the check reads (:func:`hash_password`, :func:`password_matches`), and the refusals'
counts and log lines. May not touch: SQL, the PKI, the ``/api/v1`` routes (the sites' client
certificates, :class:`appliance.hub.app.ClientCertificateGate`), ``/enroll`` and
``/healthz`` (an appliance enrols and a probe checks without a password).

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
little.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
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
REMEMBER_S = 600.0          # an accepted Authorization header is taken unhashed this long
REMEMBERED_HEADERS = 256    # at most this many remembered (the oldest go first)
FAILURES_PER_MINUTE = 10    # per source address; past it, 429 without hashing
SOURCES_TRACKED = 4096      # source addresses whose failures are counted, at most
REALM = "PAS hub"

# The refusals' reasons, the label of pas_hub_dashboard_refused_total.
REASONS = ("no-credentials", "not-basic", "unknown-user", "wrong-password", "too-many-failures")


def guarded(path: str) -> bool:
    """The dashboard's paths: the fleet pages and the hub's metrics."""
    return path in ("/", "/metrics", "/fleet") or path.startswith("/fleet/")


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
    if n < 2 or n & (n - 1) or n > 1 << 20 or not 1 <= r <= 32 or not 1 <= p <= 16 \
            or len(salt) < 8 or len(digest) != 32:
        raise ValueError("is a password hash with costs or sizes pas hub password never "
                         "makes: make it again with `pas hub password NAME`")
    return PasswordHash(n, r, p, salt, digest)


def password_matches(password: str, stored: PasswordHash) -> bool:
    digest = hashlib.scrypt(password.encode(), salt=stored.salt, n=stored.n, r=stored.r,
                            p=stored.p, dklen=len(stored.digest), maxmem=256 << 20)
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


class _Failures:
    """Failed checks per source address in the last minute (bounded)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times: OrderedDict[str, list[float]] = OrderedDict()

    def too_many(self, source: str, now: float) -> bool:
        with self._lock:
            recent = [t for t in self._times.get(source, []) if now - t < 60.0]
            if recent:
                self._times[source] = recent
            else:
                self._times.pop(source, None)
            return len(recent) >= FAILURES_PER_MINUTE

    def failed(self, source: str, now: float) -> None:
        with self._lock:
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
            if scheme.lower() != b"basic":
                reason = "not-basic"
            elif self._failures.too_many(source, now):
                reason = "too-many-failures"
            else:
                user, password = _basic(credentials)
                stored = self.users.get(user) if user is not None else None
                # An unknown name costs the same hash as a known one: the time of the answer
                # does not say which names exist.
                matched = await run_in_threadpool(password_matches, password or "",
                                                  stored or _unknown_user())
                if stored is None:
                    reason = "unknown-user"
                elif not matched:
                    reason = "wrong-password"
                if reason is not None:
                    self._failures.failed(source, now)
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
def _unknown_user() -> PasswordHash:
    """A hash no password matches in practice (a random one's), checked for unknown names."""
    return parse_hash(hash_password(secrets.token_urlsafe(32)))


def _basic(credentials: bytes) -> tuple[str | None, str | None]:
    """``user, password`` of a Basic header's credentials (UTF-8, RFC 7617), or None, None."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None, None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else (None, None)


def _refusal(reason: str) -> JSONResponse:
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
