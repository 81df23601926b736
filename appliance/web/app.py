"""Assemble the appliance's ASGI app and serve it on ``http.host:http.port``.

``serving.auth`` guards the whole port, every route a capability contributes included
(appliance/web/auth.py): bearer tokens in front of the app, client certificates in the TLS
handshake (``web_tls``). Only ``/healthz`` answers without them. ``serving.cors_origins``:
the web viewers of other origins whose pages may read it (Starlette's CORS middleware). In
front of all: the Host check (appliance/web/hosts.py), whatever ``serving.auth`` is: a name
PAS is not known by is a page using DNS rebinding, answered 421.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from appliance.web.quiet_server import QuietServer

if TYPE_CHECKING:
    from appliance.daemon import Daemon

log = logging.getLogger("pas.web")


def build_app(daemon: Daemon) -> Starlette:
    from appliance.ops.status import collect
    from appliance.web.auth import BearerGuard
    from appliance.web.hosts import HostGuard, KnownHosts

    async def status_json(_request: Request) -> JSONResponse:
        try:
            # In the thread pool, as the status page and /metrics: read on the event loop, an
            # index read waiting on SQLite held every other request of the port (DICOMweb).
            return JSONResponse(await run_in_threadpool(collect, daemon.settings, daemon.db))
        except sqlite3.DatabaseError as exc:
            # A damaged page met: what the index check found (its file, not the store) and
            # the error, not a bare 500 (the status page says the same, ops/web.py).
            from appliance.ops import index_check

            return JSONResponse({"error": f"index database unreadable: {exc}",
                                 "index_check": index_check.as_status(daemon.settings.home)},
                                status_code=503)

    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    routes: list[BaseRoute] = [
        Route("/api/status", status_json),
        Route("/healthz", health),
    ]
    # Capabilities contribute their routes here (serving: /dicom-web, ops: / and /metrics).
    for contribute in daemon.route_providers:
        routes.extend(contribute(daemon))
    serving = daemon.settings.serving
    middleware = ([Middleware(BearerGuard, tokens=serving.bearer_tokens,
                              refusals=daemon.refusals)]
                  if serving.auth == "bearer" else [])
    if serving.cors_origins:
        # Outermost: a browser's preflight (OPTIONS, no Authorization header) is answered
        # here, before the bearer guard, and a 401 still carries the CORS headers that let
        # the viewer read it.
        middleware.insert(0, Middleware(
            CORSMiddleware, allow_origins=serving.cors_origins,
            allow_methods=["GET", "POST"], allow_headers=["Authorization", "Accept",
                                                          "Content-Type"],
            expose_headers=["Warning", "Content-Location", "Location"], max_age=600))
    # Outermost of all: a request naming another host gets nothing, a CORS preflight
    # included.
    middleware.insert(0, Middleware(HostGuard, known=KnownHosts.of(daemon.settings),
                                    refusals=daemon.refusals))
    app = Starlette(routes=routes, middleware=middleware)
    # Streamed answers (WADO-RS, metadata) at once: each may hold a few MB while its client
    # reads (appliance/serving/dicomweb_http.py ClosingStream).
    app.state.streaming_slots = threading.BoundedSemaphore(
        daemon.settings.http.max_streaming_answers)
    return app


class WebServer:
    """uvicorn in a background thread, stopped with the daemon.

    The listening socket is bound here, in the caller's thread, so that a taken or forbidden
    port raises :class:`OSError` to the daemon's start-up (uvicorn binding it in its own thread
    logged the error and ended only that thread). :meth:`start` returns once uvicorn serves.
    """

    def __init__(self, app: Any, host: str, port: int, max_connections: int = 1024,
                 request_timeout_s: float = 30.0, send_timeout_s: float = 60.0, **ssl: Any):
        from appliance.web.bounded import bounded_protocol

        # proxy_headers=False: uvicorn's default believed X-Forwarded-For from loopback, so
        # a forwarder on the same host let any client name its own address (the limits on
        # failed sign-ins are per address; the log said what the client wrote).
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off", proxy_headers=False,
                                http=bounded_protocol(max_connections, request_timeout_s,
                                                      send_timeout_s),
                                **ssl)
        self.server = QuietServer(config)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="pas-http", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Serve, and return once uvicorn accepts connections; raise :class:`RuntimeError` if
        it ended (or did not come up) instead."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see the log above)")
            self.thread.join(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.stop()
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.sock.close()
