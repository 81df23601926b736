"""The HTTP port's bound on connections: how many at once, and how long one may take to send
its first request.

Owns: :func:`bounded_protocol`, uvicorn's h11 protocol with both bounds. May not touch the
app (its routes, its auth) nor any other port.

Why: uvicorn took every connection and waited for ever for a request's headers to end. One
host opening a thousand connections that send a header line every 10 s held them all (a
security review, 2026-12-06: 3,000 still open after 80 s): each holds a descriptor of the
daemon's, and past 1024 the DICOM associations were aborted (dicomnet/poll.py fixed that
part; the descriptors still ran out at the process's limit). Now a connection beyond
``http.max_connections`` is closed as soon as it opens, and one that has not sent a whole
request ``http.request_timeout_s`` after it opened is closed; each logged at most once a
minute with how many.
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


def bounded_protocol(max_connections: int, request_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with this server's bounds (one class per server)."""
    too_many = _Said(f"more than http.max_connections ({max_connections}) open")
    too_slow = _Said(f"no whole request within http.request_timeout_s ({request_timeout_s:g} "
                     "s)")

    class BoundedH11Protocol(H11Protocol):
        _first_request: asyncio.TimerHandle | None = None

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
            if self._first_request is not None:
                self._first_request.cancel()
                self._first_request = None
            super().connection_lost(exc)

    return BoundedH11Protocol
