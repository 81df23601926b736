"""The HTTP port's bound on connections: how many at once, how long one may take to send its
first request, and how long an answer may wait for the client to read any of it.

Owns: :func:`bounded_protocol`, uvicorn's h11 protocol with these bounds, for the appliance's
HTTP port and the hub's. May not touch the app (its routes, its auth).

Why: uvicorn took every connection and waited for ever for a request's headers to end. One
host opening a thousand connections that send a header line every 10 s held them all (a
security review, 2026-12-06: 3,000 still open after 80 s): each holds a descriptor of the
daemon's, and past 1024 the DICOM associations were aborted (dicomnet/poll.py fixed that
part; the descriptors still ran out at the process's limit). Now a connection beyond
``http.max_connections`` is closed as soon as it opens, and one that has not sent a whole
request ``http.request_timeout_s`` after it opened is closed; each logged at most once a
minute with how many.

And the answer's side: a client that asked for a study (WADO-RS, its metadata) and then
read nothing held ~3.3 MiB of the daemon's memory for as long as it kept the connection
(60 such clients: +198 MiB; 600 would take a 2 GiB appliance's memory), nothing ever
ending it. Now an answer whose bytes wait in the connection's buffer
``http.send_timeout_s`` without the client taking any (asyncio's flow control: paused, not
resumed) is aborted. A client that reads, however slowly, resumes the flow and is never
cut.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("pas.web")

LOG_EVERY_S = 60.0


class _Said:
    """Closed connections counted, said once a minute at most."""

    def __init__(self, words: str) -> None:
        self.words, self.count, self.said_at = words, 0, -LOG_EVERY_S

    def closed(self, client: Any) -> None:
        self.count += 1
        at = time.monotonic()
        if at - self.said_at >= LOG_EVERY_S:
            who = f"{client[0]}:{client[1]}" if client else "?"
            log.warning("HTTP connection from %s closed: %s (%d since the last such line)",
                        who, self.words, self.count)
            self.count, self.said_at = 0, at


def bounded_protocol(max_connections: int, request_timeout_s: float,
                     send_timeout_s: float = 60.0,
                     base: type[H11Protocol] = H11Protocol) -> type[H11Protocol]:
    """uvicorn's h11 protocol (or ``base``, a subclass of it: the hub's, which adds the
    peer's certificate) with this server's bounds (one class per server)."""
    too_many = _Said(f"more than http.max_connections ({max_connections}) open")
    too_slow = _Said(f"no whole request within http.request_timeout_s ({request_timeout_s:g} "
                     "s)")
    not_reading = _Said(f"the client read none of its answer for http.send_timeout_s "
                        f"({send_timeout_s:g} s)")

    class BoundedH11Protocol(base):  # type: ignore[valid-type,misc]
        _first_request: asyncio.TimerHandle | None = None
        _stalled: asyncio.TimerHandle | None = None

        def pause_writing(self) -> None:
            """The transport's buffer is full: the client has not read what was sent."""
            super().pause_writing()
            if self._stalled is None:
                self._stalled = self.loop.call_later(send_timeout_s, self._not_reading)

        def resume_writing(self) -> None:
            """The client read: the answer goes on, its clock starts again."""
            super().resume_writing()
            if self._stalled is not None:
                self._stalled.cancel()
                self._stalled = None

        def _not_reading(self) -> None:
            self._stalled = None
            if not self.transport.is_closing():
                not_reading.closed(self.client)
                # abort, not close: close() waits to hand over the buffer the client does
                # not take. uvicorn then tells the app the client is gone.
                self.transport.abort()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                too_many.closed(self.client)
                transport.close()
                return
            self._first_request = self.loop.call_later(request_timeout_s, self._too_slow)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and self._first_request is not None:
                self._first_request.cancel()  # a request came: uvicorn's keep-alive from now
                self._first_request = None

        def _too_slow(self) -> None:
            self._first_request = None
            if self.cycle is None and not self.transport.is_closing():
                too_slow.closed(self.client)
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._first_request, self._stalled):
                if timer is not None:
                    timer.cancel()
            self._first_request = self._stalled = None
            super().connection_lost(exc)

    return BoundedH11Protocol
