"""The hub service: one Starlette app over uvicorn (TLS 1.3, mutual TLS on ``/api/v1``).

Owns: assembling the app from route providers, the client-certificate gate of ``/api/v1``
(site = certificate CN, revocation checked per request), enrolment routes, running the
server, and the two helpers every route shares: the error shape (:func:`problem`) and reading
a request body with a bound (:func:`read_body_limited`, over ``appliance/web/body.py``). May
not touch: SQL (``appliance.store.hub``), transfer logic (``transfers.py``).

Other areas add routes by appending a provider to :func:`default_route_providers` (a
callable ``(Hub) -> list[BaseRoute]``); ``request.state.site`` is the authenticated site on
every ``/api/v1`` route.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from appliance.hub.config import HubSettings
from appliance.hub.dashboard_auth import DashboardGuard, DashboardRefusals, guarded, parse_hash
from appliance.hub.fleet_gate import PacedWarnings
from appliance.hub.fleet_refused import RefusedCertificates
from appliance.hub.pki import (
    HubPKI,
    PKIError,
    certificate_identity,
    csr_key_sha256,
    secret_digest,
    utc_text,
)
from appliance.hub.transfer_metrics import TransferCounters
from appliance.locks import KeyedLocks
from appliance.ops.listeners import bind_refused
from appliance.store import hub as store
from appliance.transfer.enrolment import EnrolmentError, parse_token
from appliance.web import body as web_body
from appliance.web.quiet_server import QuietServer

log = logging.getLogger("pas.hub")

RouteProvider = Callable[["Hub"], list[BaseRoute]]

# An enrolment body is a token and a CSR (about 2 KB); anyone who reaches the port may send one.
MAX_ENROL_BYTES = 64 * 1024


def problem(status: int, error: str, detail: str, **extra: Any) -> JSONResponse:
    """The one error shape of the protocol: ``{"error", "detail", ...}``."""
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=status)


class BodyTooLarge(web_body.BodyTooLarge):
    """A request body over its route's limit; ``response`` is the 413 to answer."""

    @property
    def response(self) -> JSONResponse:
        return problem(413, "too_large", str(self))


async def read_body_limited(request: Request, limit: int, what: str = "request body") -> bytes:
    """:func:`appliance.web.body.read_body_limited`, raising the hub's :class:`BodyTooLarge`
    (its ``response`` the protocol's 413 problem)."""
    try:
        return await web_body.read_body_limited(request, limit, what)
    except web_body.BodyTooLarge as exc:
        raise BodyTooLarge(exc.what, exc.limit) from None


class Hub:
    """The hub's parts, shared by the route providers."""

    def __init__(self, settings: HubSettings):
        from appliance.hub.archive import open_archive

        self.settings = settings
        self.pki = HubPKI(settings.home)
        if not self.pki.exists():
            raise PKIError(f"no PKI under {settings.home}: run `pas hub init` first")
        self.db = store.open_hub_db(settings.db_path)
        self.db.started(log, "hub database")
        settings.buckets_dir.mkdir(parents=True, exist_ok=True)
        settings.work_dir.mkdir(parents=True, exist_ok=True)
        store.remove_temp_buckets(settings.buckets_dir)
        for stale in settings.work_dir.iterdir():  # rebuilds a crash interrupted; never receipted
            shutil.rmtree(stale, ignore_errors=True)
        self.lock = KeyedLocks()  # hub.lock(transfer_id): one transfer's changes in turn
        self.transfer_counters = TransferCounters()  # /metrics: received and committed
        # Told by the client-certificate gate, shown by /fleet and /metrics: a site whose
        # certificate this hub does not know (enrolled after the backup restored).
        self.refused_certificates = RefusedCertificates()
        # Told by the dashboard's password check (dashboard.auth = "basic"), read by /metrics.
        self.dashboard_refusals = DashboardRefusals()
        from appliance.hub.bucket_bodies import BucketBodies  # PUT bodies held, every site

        # Taken by the bucket PUTs and reservations (transfers.py), read by /metrics (fleet.py).
        limits = settings.limits
        self.bucket_bodies = BucketBodies(limits.bucket_bodies_bytes,
                                          limits.bucket_reservation_s,
                                          limits.bucket_reservations_per_site)
        from appliance.hub.expiry import StagingExpiry  # abandoned uploads' staging

        self.expiry = StagingExpiry(self)
        self.expiry.remove_orphans()  # staging no live transfer row stands for (a restore)
        self.expiry.sweep()  # before the archiver resumes them, and before the port opens
        self.archive = open_archive(settings)
        self.route_providers: list[RouteProvider] = default_route_providers()
        from appliance.hub.lanes import LaneRegistry

        self.lane_registry = LaneRegistry()  # striped downloads, for their lanes to join
        from appliance.hub.archiver import Archiver  # archives while buckets arrive; resumes

        self.archiver = Archiver(self, settings.archive.workers, settings.archive.requests)
        self.expiry.start()  # then every transfers.expiry_check_interval_s
        self.stopping = threading.Event()
        start_backfill = getattr(self.archive, "start_backfill", None)  # the embedded one
        if start_backfill is not None:
            start_backfill(self.stopping)


def default_route_providers() -> list[RouteProvider]:
    from appliance.hub.download import download_routes
    from appliance.hub.holdings import holdings_routes
    from appliance.hub.priors import priors_routes
    from appliance.hub.region import region_routes
    from appliance.hub.transfers import transfer_routes

    providers: list[RouteProvider] = [enrolment_routes, transfer_routes, holdings_routes,
                                      region_routes, priors_routes, download_routes]
    from appliance.hub.fleet import fleet_routes

    providers.append(fleet_routes)  # heartbeat, /fleet dashboard, /metrics
    return providers


class ClientCertificateGate:
    """ASGI middleware: every ``/api/v1`` request needs a valid, unrevoked fleet certificate.

    The TLS layer already refused certificates from other CAs; here: none at all (401), or
    revoked / not issued by this hub's records (403). Checked per request, so a revocation
    applies to connections already open. Each 403 is told to
    :class:`~appliance.hub.fleet_refused.RefusedCertificates` (logged once a minute per
    certificate; an unknown one makes its site a ``refused`` row of the fleet), and each
    request let in too (its site enrolled again).
    """

    def __init__(self, app: Any, hub: Hub):
        self.app = app
        self.hub = hub
        # Certificates seen in use whose older siblings are retired already: one
        # transaction at a certificate's first request after the hub starts, not at each.
        self._in_use: set[str] = set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/v1"):
            await self.app(scope, receive, send)
            return
        der = ((scope.get("extensions") or {}).get("tls") or {}).get("client_cert_der")
        client = (scope.get("client") or ("?", 0))[0]
        if not der:
            log.warning("refused %s %s from %s: no client certificate", scope["method"],
                        scope["path"], client)
            await problem(401, "client_certificate_required",
                          "this route needs the client certificate issued at enrolment"
                          )(scope, receive, send)
            return
        site, serial = certificate_identity(der)
        state = await run_in_threadpool(store.certificate_state, self.hub.db, serial)
        refusals = self.hub.refused_certificates
        if state != "valid":
            # Logged once a minute per certificate, and shown on /fleet and in /metrics
            # when unknown (hub/fleet_refused.py): it was a WARNING line per request, and
            # nothing else showed a site enrolled after the backup the hub was restored from.
            refusals.refused(site, serial, hashlib.sha256(der).hexdigest(), state,
                             f"{scope['method']} {scope['path']}", client)
            detail = f"the certificate of site {site!r} (serial {serial}) is {state}"
            if state == "superseded":
                detail += (": a newer certificate of the site is in use (enrolled since, on "
                           "this appliance or another one); if this appliance is the site's, "
                           "enrol it again (pas enroll --replace) and restart PAS")
            elif state == "unknown":
                detail += (": signed by this hub's CA, but this hub has no record of it (its "
                           "database restored from a backup older than the enrolment?): ask "
                           "regional ops for a token and enrol again (pas enroll --replace)")
            await problem(403, f"certificate_{state}", detail)(scope, receive, send)
            return
        refusals.accepted(site, serial)
        if serial not in self._in_use:
            await self._retire_older(site, serial, client)
        scope.setdefault("state", {})["site"] = site
        await self.app(scope, receive, send)

    async def _retire_older(self, site: str, serial: str, client: str) -> None:
        """The site's older certificates are superseded by this one, now in use
        (:func:`store.retire_older_certificates`). A database that refuses the write (busy)
        leaves it for the next request, and this one is served all the same."""
        try:
            retired = await run_in_threadpool(store.retire_older_certificates,
                                              self.hub.db, serial)
        except sqlite3.Error as exc:
            log.warning("site %s: older certificates not retired yet: %s", site, exc,
                        extra={"SITE": site})
            return
        self._in_use.add(serial)
        for old in retired:
            log.warning("site %s: certificate %s superseded by certificate %s, first used "
                        "from %s; requests with %s are refused from now on (if that is still "
                        "an appliance of the site, two boxes were enrolled as one site)",
                        site, old, serial, client, old, extra={"SITE": site})


def enrolment_routes(hub: Hub) -> list[BaseRoute]:
    async def ca(_request: Request) -> Response:
        """The fleet CA certificate (PEM), for the enrolment's CAFP check."""
        return Response(hub.pki.ca_pem(), media_type="application/x-pem-file")

    refusals = PacedWarnings()

    def refused(request: Request, kind: str, words: str, *args: Any,
                extra: dict[str, Any] | None = None) -> None:
        """Log a refused enrolment, once a minute at most per source and kind (anyone who
        reaches the hub may ask, and each refusal was a line of the journal)."""
        source = request.client.host if request.client else "?"
        said = refusals.due(f"{source} {kind}")
        if said is None:
            return
        more = f" ({said} such refusals from {source} since the last line)" if said > 1 else ""
        log.warning(words + more, *args, extra=extra)

    def answer(site: str, certificate_pem: str) -> Response:
        return JSONResponse({
            "site": site, "certificate_pem": certificate_pem,
            "ca_pem": hub.pki.ca_pem().decode(),
            "hub_transfer_key": base64.b64encode(hub.pki.transfer_public_key()).decode(),
        })

    async def answered_again(site: str, digest: str, key_sha256: str,
                             fields: dict[str, Any]) -> Response | None:
        """The certificate a spent token was spent on, answered again to the same key
        (store.answer_again): the enrolment whose answer was lost on the way back, run
        again. None: not that case (refused as any spent token)."""
        again = await run_in_threadpool(store.answer_again, hub.db, digest, site, key_sha256)
        if again is None:
            return None
        serial, certificate_pem = again
        log.info("enrolment of site %s answered again: certificate %s, to the key that spent "
                 "token %s (its first answer was lost)", site, serial, fields["TOKEN_ID"],
                 extra=fields)
        return answer(site, certificate_pem)

    async def enroll(request: Request) -> Response:
        """Spend a one-time token: sign the CSR, answer cert, CA, transfer key. The same
        token and the same key again (the first answer lost) get the same certificate while
        the token is valid; another key is refused."""
        try:
            raw = await read_body_limited(request, MAX_ENROL_BYTES, "enrolment request")
        except BodyTooLarge as exc:
            refused(request, "too large", "enrolment refused: %s", exc)
            return exc.response
        try:
            body = json.loads(raw)
            token, csr_pem = str(body["token"]), str(body["csr_pem"])
        except (ValueError, RecursionError, KeyError, TypeError):  # Recursion: too deep
            refused(request, "not JSON", "enrolment refused: body is not {token, csr_pem} JSON")
            return problem(400, "bad_request", 'body must be JSON {"token": ..., "csr_pem": ...}')
        try:
            site, secret, cafp = parse_token(token)
        except EnrolmentError as exc:
            refused(request, "bad token", "enrolment refused: %s", exc)
            return problem(403, "bad_token", str(exc))
        digest = secret_digest(secret)
        token_id = hub.pki.token_id(digest)
        fields = {"SITE": site, "TOKEN_ID": token_id}
        row = store.enrol_token(hub.db, digest)
        if (cafp == hub.pki.ca_fingerprint() and row is not None and row["site"] == site
                and row["used_at"] is not None):
            try:
                key_sha256 = csr_key_sha256(csr_pem.encode())
            except PKIError:  # a bad CSR: refused as any spent token
                key_sha256 = ""
            again = await answered_again(site, digest, key_sha256, fields) \
                if key_sha256 else None
            if again is not None:
                return again
        if (cafp != hub.pki.ca_fingerprint() or row is None or row["site"] != site
                or row["used_at"] is not None):
            refused(request, "unknown token", "enrolment refused for site %s: unknown or used "
                    "token (token %s)", site, token_id, extra=fields)
            return problem(403, "bad_token", "unknown, already used or foreign token")
        if row["expires_at"] <= time.time():
            # Said plainly, with when: the holder has the secret, so the date tells them
            # nothing they could not ask for; what they need is a new token, not a guess.
            expired = utc_text(row["expires_at"])
            refused(request, "expired token", "enrolment refused for site %s: token %s expired "
                    "at %s", site, token_id, expired, extra=fields)
            return problem(403, "token_expired",
                           f"this enrolment token of site {site} expired at {expired}: ask "
                           f"regional ops for a new one (pas hub token {site})",
                           expired_at=expired)
        try:
            key_sha256 = csr_key_sha256(csr_pem.encode())
            issued = hub.pki.sign_csr(csr_pem.encode(), site)
        except PKIError as exc:
            refused(request, "bad CSR", "enrolment refused for site %s: %s", site, exc,
                    extra=fields)
            return problem(400, "bad_csr", str(exc))
        result = await run_in_threadpool(
            store.use_token, hub.db, digest, site, key_sha256,
            lambda: (issued.serial, issued.not_after.isoformat(), issued.pem, issued))
        if result is None:  # spent by a racing enrolment, or expired meanwhile
            again = await answered_again(site, digest, key_sha256, fields)
            if again is not None:  # the same request twice at once: both answered
                return again
            log.warning("enrolment refused for site %s: token %s used or expired meanwhile",
                        site, token_id, extra=fields)
            return problem(403, "bad_token", "unknown, already used, expired or foreign token")
        log.info("enrolled site %s (certificate %s, token %s)", site, issued.serial, token_id,
                 extra=fields)
        return answer(site, issued.pem.decode())

    async def whoami(request: Request) -> Response:
        """The site of the calling certificate."""
        return JSONResponse({"site": request.state.site})

    async def health(_request: Request) -> Response:
        """Liveness."""
        return JSONResponse({"status": "ok"})

    return [
        Route("/enroll/ca", ca, methods=["GET"]),
        Route("/enroll", enroll, methods=["POST"]),
        Route("/healthz", health, methods=["GET"]),
        Route("/api/v1/whoami", whoami, methods=["GET"]),
    ]


def build_app(hub: Hub) -> Any:
    routes: list[BaseRoute] = []
    for provide in hub.route_providers:
        routes.extend(provide(hub))
    document = openapi(routes, dashboard_basic=hub.settings.dashboard.auth == "basic")

    async def openapi_json(_request: Request) -> Response:
        return JSONResponse(document)

    routes.append(Route("/openapi.json", openapi_json, methods=["GET"]))
    app: Any = Starlette(routes=routes)
    dashboard = hub.settings.dashboard
    if dashboard.auth == "basic":
        app = DashboardGuard(app, {name: parse_hash(stored)
                                   for name, stored in dashboard.users.items()},
                             hub.dashboard_refusals)
    return ClientCertificateGate(app, hub)


def openapi(routes: list[BaseRoute], dashboard_basic: bool = False) -> dict[str, Any]:
    """An OpenAPI 3.1 description generated from the routes themselves (paths, methods, the
    endpoint's docstring as summary), so it cannot drift from what is served. The request and
    answer shapes are specified in docs/protocol.md."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        path = route.path.replace("{path:path}", "{path}")
        doc = (route.endpoint.__doc__ or route.name).strip().splitlines()[0]
        security = ([{"mutualTLS": []}] if path.startswith("/api/v1") else
                    [{"basicAuth": []}] if dashboard_basic and guarded(path) else [])
        for method in sorted((route.methods or set()) - {"HEAD"}):
            paths.setdefault(path, {})[method.lower()] = {
                "summary": doc, "operationId": f"{route.name}_{method.lower()}",
                "security": security,
                "responses": {"default": {"description": "see docs/protocol.md"}},
            }
    return {"openapi": "3.1.0",
            "info": {"title": "PAS regional hub", "version": "1",
                     "description": "The appliance <-> hub protocol (docs/protocol.md)."},
            "components": {"securitySchemes": {
                "mutualTLS": {"type": "mutualTLS"},
                **({"basicAuth": {"type": "http", "scheme": "basic"}} if dashboard_basic
                   else {})}},
            "paths": paths}


class PortUnavailable(OSError):
    """The hub's port could not be bound (taken, or not allowed): one line naming the key."""


def bind_port(host: str, port: int) -> socket.socket:
    """The hub's listening socket, bound (not listening yet: uvicorn listens once it serves).
    Bound here rather than by uvicorn, which logged its own lines and exited with status 3 on
    a taken port; raises :class:`PortUnavailable` naming ``http.port`` and the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortUnavailable(bind_refused("http.port", "http.host", host, port, exc)) from None
    return sock


class _StopWords(logging.Filter):
    """uvicorn's "Cancel 0 running task(s), timeout graceful shutdown exceeded", an ERROR at
    every stop while appliances hold their connections open (their TLS sessions close when
    they next look), said as what it is: nothing was cut. A stop that did cut requests in
    flight stays a WARNING, in words (the appliances resume them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Cancel %s running task(s)"):
            return True
        cut = int(record.args[0]) if isinstance(record.args, tuple) and record.args else 0
        if cut == 0:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = ("stop: the connections still open were closed (no "
                                       "request was in flight)"), ()
        else:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = ("stop: %d request(s) in flight cut (their appliances "
                                       "send them again)"), (cut,)
        return True


_STOP_WORDS = _StopWords()


class _HubUvicorn(QuietServer):
    """The hub's server: a stop by signal is logged (a stop left no line at all, and the
    only trace of a restart was uvicorn's ERROR above)."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            log.info("signal %d: stopping (requests in flight have %s s)", sig,
                     self.config.timeout_graceful_shutdown)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        # Here, not after run(): uvicorn raises the signal it caught again once it served,
        # and the process ends there.
        log.info("hub stopped")


class HubServer:
    """The hub on uvicorn; ``run()`` blocks (``pas hub run``), ``start()`` runs it in a thread.
    ``sock``: the port already bound (:func:`bind_port`), else it is bound here."""

    def __init__(self, hub: Hub, host: str | None = None, port: int | None = None,
                 sock: socket.socket | None = None):
        from appliance.hub.tls import server_config

        self.hub = hub
        host, port = host or hub.settings.http.host, port or hub.settings.http.port
        self.sock = sock or bind_port(host, port)
        try:
            config = server_config(build_app(hub), hub.pki, host, port,
                                   bounds=hub.settings.http)
        except BaseException:
            self.sock.close()
            raise
        self.server = _HubUvicorn(config)
        logging.getLogger("uvicorn.error").addFilter(_STOP_WORDS)
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="pas-hub", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.hub.expiry.stop()
        self.hub.stopping.set()
        if self.thread:
            self.thread.join(10)
