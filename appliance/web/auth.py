"""Who may use the appliance's HTTP port, and that a state change comes from its own page.

Owns: the bearer-token check in front of every route (``serving.auth = "bearer"``) and the
same-page check of the status page's forms; each refused request goes to the audit trail
through :mod:`appliance.ops.refusals` (coalesced per source). ``serving.auth =
"client_cert"`` needs no code here: the whole port speaks TLS and refuses a client without
a certificate in the handshake (appliance/serving/wiring.py ``web_tls``). May not touch:
the store, the routes themselves.

Before this guard only the DICOMweb handlers checked the token: the status page (patient IDs
of recent studies and of the prefetch queue), ``/metrics``, ``/api/status`` and the Retry
POST answered anyone. ``/healthz`` stays open: it says "ok" and nothing else, and liveness
probes (``pas doctor``, load balancers) carry no token.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.ops.refusals import RefusalAudit

OPEN_PATHS = frozenset({"/healthz"})


def bearer_ok(header: str, tokens: list[bytes]) -> bool:
    """True when ``header`` is ``Bearer <one of tokens>`` (constant-time comparison)."""
    scheme, _, token = header.partition(" ")
    candidate = token.strip().encode()
    return scheme.lower() == "bearer" and any(secrets.compare_digest(candidate, known)
                                              for known in tokens)


class BearerGuard:
    """ASGI middleware: every HTTP request but ``OPEN_PATHS`` needs a valid bearer token,
    else 401 with ``WWW-Authenticate: Bearer`` and the route is not run."""

    def __init__(self, app: ASGIApp, tokens: list[str],
                 refusals: RefusalAudit | None = None):
        self.app = app
        self.tokens = [t.encode() for t in tokens]
        self.refusals = refusals  # refused requests in the audit trail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = Request(scope).headers.get("authorization", "")
            if not bearer_ok(header, self.tokens):
                response = JSONResponse(
                    {"error": 401,
                     "detail": "a valid bearer token is required (Authorization: Bearer)"},
                    status_code=401, headers={"WWW-Authenticate": 'Bearer realm="PAS"'})
                await response(scope, receive, send)
                if self.refusals is not None:
                    client = scope.get("client")
                    reason = ("no bearer token" if not header else
                              "an Authorization header that is not a bearer token"
                              if header.partition(" ")[0].lower() != "bearer" else
                              "a bearer token that is not one of serving.bearer_tokens")
                    # The database write off the event loop: other requests go on.
                    await run_in_threadpool(
                        self.refusals.refused, channel="http", kind="bearer-token",
                        source=client[0] if client else None, actor="anonymous",
                        reason=f"HTTP request refused (401): {reason}",
                        target=str(scope["path"])[:200])
                return
        await self.app(scope, receive, send)


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site: an ``Origin`` (or,
    without one, a ``Referer``) whose host and port are not the ones it was sent to. A
    request with neither (a script) passes; the form token decides then."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return not source
    host = request.headers.get("host", "")
    return urlsplit(source).netloc.lower() == host.lower()


class FormToken:
    """A random value made at start-up, put in the status page's forms and required back
    with each POST. Another site cannot read the page (same-origin policy), so it cannot
    forge the POST even when the browser adds the credentials by itself (a client
    certificate, or a header a proxy or extension adds). A restart changes it: a page older
    than the restart gets 403 once, and the page refreshes itself every 10 s."""

    field = "csrf"

    def __init__(self) -> None:
        self.value = secrets.token_urlsafe(32)

    def matches(self, candidate: str | None) -> bool:
        return candidate is not None and secrets.compare_digest(candidate.encode(),
                                                                self.value.encode())
