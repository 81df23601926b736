"""uvicorn's server with a main loop that wakes once a second, not ten times.

Owns: the loop that keeps uvicorn's Date header current and sees when to stop, for the
appliance's web server (web/app.py) and the hub's (hub/app.py). Touches nothing of what
uvicorn serves: connections are handled by uvicorn's protocol tasks, as before.

Why: ``uvicorn.Server.main_loop`` sleeps 0.1 s between looks at ``should_exit``. On an idle
appliance that thread alone used 3 % of a core (0.33 CPU-s in 10 s, measured 2026-12-06),
the largest share of the 11 % an idle ``pas run`` used; the test suite runs several idle
daemons at any time on two cores. Here the loop waits up to a second, and a stop (``stop()``
from another thread, or the signal uvicorn's own handler takes under ``pas hub run``) wakes
it at once: stopping is no slower than before.

And the port's bounds before the TLS handshake (appliance/web/bounded.py): uvicorn's
``startup`` opens the port with ``loop.create_server`` and offers no hook for the listening
socket or ``ssl_handshake_timeout``. When the protocol carries ``port_bounds``, that one
call goes through :meth:`~appliance.web.bounded.PortBounds.create_server` (this server's own
loop, for the call only); a uvicorn that opened its port otherwise fails the start, rather
than serve unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from types import FrameType

import uvicorn

TICK_S = 1.0


class QuietServer(uvicorn.Server):
    """``uvicorn.Server`` whose idle loop ticks every :data:`TICK_S`; call :meth:`stop`."""

    _loop: asyncio.AbstractEventLoop | None = None
    _stop_asked: asyncio.Event | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        bounds = getattr(self.config.http_protocol_class, "port_bounds", None)
        if bounds is None:
            await super().startup(sockets)
            return
        loop = asyncio.get_running_loop()
        loop.create_server = bounds.create_server(loop.create_server)  # type: ignore[method-assign]
        try:
            await super().startup(sockets)
        finally:
            del loop.create_server
        if self.started and sockets and not bounds.listening:
            for server in self.servers:
                server.close()
            raise RuntimeError("uvicorn opened its port without loop.create_server: "
                               "http.max_connections could not count connections as accepted")

    async def main_loop(self) -> None:
        self._stop_asked = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        counter = 0  # uvicorn's on_tick renews the Date header when counter % 10 == 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_asked.wait(), TICK_S)
            counter = (counter + 10) % 864000
            should_exit = await self.on_tick(counter)

    def stop(self) -> None:
        """Ask the server to stop, from any thread; its loop sees it at once."""
        self.should_exit = True
        self._wake()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._wake()

    def _wake(self) -> None:
        loop, stop_asked = self._loop, self._stop_asked
        if loop is not None and stop_asked is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(stop_asked.set)
