"""The web servers' quiet main loop (appliance/web/quiet_server.py): uvicorn's loop looked at
``should_exit`` ten times a second, 3 % of a core on an idle appliance; this one ticks once a
second. What must not change: a stop (``stop()`` from another thread, uvicorn's signal
handler under ``pas hub run``) ends the server at once, not at the next tick, and every
response still carries a current Date header.

The tick is set to an hour here, so only the wake can end the server: the tests prove the
wake, not a timing.
"""

from __future__ import annotations

import signal
import socket
import threading
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from appliance.web import quiet_server
from appliance.web.quiet_server import QuietServer
from tests.support.peers import wait_for


def _serving(monkeypatch: pytest.MonkeyPatch) -> tuple[QuietServer, threading.Thread, str]:
    monkeypatch.setattr(quiet_server, "TICK_S", 3600.0)
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = QuietServer(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, what="uvicorn serving")
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}/"


def test_a_stop_from_another_thread_ends_the_server_before_its_tick(
        monkeypatch: pytest.MonkeyPatch) -> None:
    server, thread, url = _serving(monkeypatch)
    answer = httpx.get(url, timeout=10)
    assert answer.text == "ok"
    date = parsedate_to_datetime(answer.headers["date"])
    assert abs((datetime.now(UTC) - date).total_seconds()) < 5
    server.stop()
    thread.join(30)
    assert not thread.is_alive(), "the server waited for its hour-long tick"


def test_the_signal_uvicorn_takes_ends_the_server_before_its_tick(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``pas hub run`` uvicorn's own handler takes SIGTERM (in the main thread, while
    the loop waits): called here as the handler is, from another thread than the loop's."""
    server, thread, url = _serving(monkeypatch)
    assert httpx.get(url, timeout=10).status_code == 200
    server.handle_exit(signal.SIGTERM, None)
    thread.join(30)
    assert not thread.is_alive(), "the server waited for its hour-long tick"
