"""Assemble the appliance's ASGI app and serve it on ``http.host:http.port``.

``serving.auth`` guards the whole port, every route a capability contributes included
(appliance/web/auth.py): bearer tokens in front of the app, client certificates in the TLS
handshake (``web_tls``). Only ``/healthz`` answers without them.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

if TYPE_CHECKING:
    from appliance.daemon import Daemon

log = logging.getLogger("pas.web")


def build_app(daemon: Daemon) -> Starlette:
    from appliance.ops.status import collect
    from appliance.web.auth import BearerGuard

    async def status_json(_request: Request) -> JSONResponse:
        return JSONResponse(collect(daemon.settings, daemon.db))

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
    middleware = ([Middleware(BearerGuard, tokens=serving.bearer_tokens)]
                  if serving.auth == "bearer" else [])
    return Starlette(routes=routes, middleware=middleware)


class WebServer:
    """uvicorn in a background thread, stopped with the daemon."""

    def __init__(self, app: Any, host: str, port: int, **ssl: Any):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off", **ssl)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="pas-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
