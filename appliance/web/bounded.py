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

And before the TLS handshake (a security review, 2026-12-07): asyncio calls the protocol's
``connection_made`` only once the handshake is done, and waits 60 s for it (uvicorn passes no
``ssl_handshake_timeout``). 3,000 TCP connections to the hub that sent nothing were neither
counted nor timed (``max_connections`` 50: all open ~60 s, nothing logged), and 1,100 of them
took a hub limited to 1,024 descriptors: an enrolled site's request waited 60.5 s. Now each
connection is counted as it is accepted (:class:`PortBounds`: the listening socket's, before
any handshake), so one beyond ``http.max_connections`` is closed at once whatever it sends;
and the handshake itself is bounded by ``http.request_timeout_s`` (a client that has not even
finished it within the time allowed for a whole first request is gone), logged as the other
bounds. The port is opened through :meth:`PortBounds.create_server`
(appliance/web/quiet_server.py hands it uvicorn's call).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("pas.web")

LOG_EVERY_S = 60.0
# Connections beyond the bound closed in one look at the listening socket; the rest at the
# loop's next look (the socket is still readable), so a flood does not hold the loop.
REFUSED_PER_LOOK = 64
# At a stop, how often an idle TLS connection's last bytes are looked at until all are sent.
DRAIN_LOOK_S = 0.05


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


class _Accepted(socket.socket):
    """A connection the port accepted: counted among its bounds' until it is closed."""

    bounds: PortBounds | None = None
    peer: Any = None
    opened_at = 0.0
    made = False  # its protocol has it (after the TLS handshake, on a TLS port)

    def close(self) -> None:
        bounds, self.bounds = self.bounds, None
        if bounds is not None:
            bounds.closing(self)
        super().close()


class _CountingListener(socket.socket):
    """The port's listening socket (a duplicate of the one bound), whose ``accept`` (asyncio
    calls it for each connection waiting, before any TLS handshake) closes at once a
    connection beyond ``http.max_connections``."""

    def __init__(self, sock: socket.socket, bounds: PortBounds) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
        self.bounds = bounds

    def accept(self) -> tuple[socket.socket, Any]:
        for _ in range(REFUSED_PER_LOOK):
            conn, peer = super().accept()  # BlockingIOError when none is waiting
            if self.bounds.has_room():
                return self.bounds.admit(conn, peer), peer
            self.bounds.too_many.closed(peer)
            conn.close()
        raise BlockingIOError("more at the next look")


class PortBounds:
    """One port's bounds on its connections: how many may be open at once, counted from the
    accept (a connection in its TLS handshake counts), and how long the handshake may take.
    Weakly held: a connection dropped unclosed leaves the count too."""

    def __init__(self, max_connections: int, request_timeout_s: float) -> None:
        self.max_connections, self.request_timeout_s = max_connections, request_timeout_s
        self.too_many = _Said(f"more than http.max_connections ({max_connections}) open")
        self.no_handshake = _Said(f"no TLS handshake within http.request_timeout_s "
                                  f"({request_timeout_s:g} s)")
        self._open: weakref.WeakValueDictionary[int, _Accepted] = \
            weakref.WeakValueDictionary()
        self.listening = False  # the port is counted at accept (create_server used)

    def has_room(self) -> bool:
        return len(self._open) < self.max_connections

    def admit(self, conn: socket.socket, peer: Any) -> _Accepted:
        accepted = _Accepted(conn.family, conn.type, conn.proto, fileno=conn.detach())
        accepted.bounds, accepted.peer = self, peer
        accepted.opened_at = time.monotonic()
        self._open[accepted.fileno()] = accepted
        return accepted

    def made(self, transport: asyncio.BaseTransport) -> None:
        """The protocol has its connection (on a TLS port: the handshake is done)."""
        sock = transport.get_extra_info("socket")
        accepted = self._open.get(sock.fileno()) if sock is not None else None
        if accepted is not None:
            accepted.made = True

    def closing(self, conn: _Accepted) -> None:
        if self._open.get(conn.fileno()) is conn:
            del self._open[conn.fileno()]
        # asyncio's handshake timer starts after the accept: closed unmade that late, the
        # handshake ran out of time (a refused or abandoned handshake ends sooner).
        if not conn.made and time.monotonic() - conn.opened_at >= self.request_timeout_s:
            self.no_handshake.closed(conn.peer)

    def create_server(self, create_server: Callable[..., Awaitable[asyncio.Server]]
                      ) -> Callable[..., Awaitable[asyncio.Server]]:
        """``loop.create_server`` for uvicorn's one call: the listening socket counts what
        it accepts, and a TLS handshake is bounded by ``http.request_timeout_s`` (uvicorn
        has no option for either)."""

        async def bounded(protocol_factory: Callable[[], asyncio.BaseProtocol], *args: Any,
                          sock: socket.socket | None = None, ssl: Any = None,
                          **kwargs: Any) -> asyncio.Server:
            if sock is not None:
                sock = _CountingListener(sock, self)
                self.listening = True
            if ssl is not None:
                kwargs["ssl_handshake_timeout"] = self.request_timeout_s
            try:
                return await create_server(protocol_factory, *args, sock=sock, ssl=ssl,
                                           **kwargs)
            except BaseException:
                if isinstance(sock, _CountingListener):
                    sock.close()
                raise

        return bounded


def _unsent(transport: asyncio.Transport) -> int | None:
    """Bytes asyncio still holds for the client of a TLS ``transport``: its TLS layer's and
    the socket transport's under it (what the kernel holds a close still sends). None when
    the layer under it cannot be seen (an event loop other than CPython's asyncio)."""
    inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    if inner is None:
        return None
    return int(transport.get_write_buffer_size()) + int(inner.get_write_buffer_size())


def bounded_protocol(max_connections: int, request_timeout_s: float,
                     send_timeout_s: float = 60.0,
                     base: type[H11Protocol] = H11Protocol) -> type[H11Protocol]:
    """uvicorn's h11 protocol (or ``base``, a subclass of it: the hub's, which adds the
    peer's certificate) with this server's bounds (one class per server). Its
    ``port_bounds`` (:class:`PortBounds`) count connections as they are accepted, once the
    server opens its port through them (:class:`~appliance.web.quiet_server.QuietServer`)."""
    bounds = PortBounds(max_connections, request_timeout_s)
    too_many = bounds.too_many
    too_slow = _Said(f"no whole request within http.request_timeout_s ({request_timeout_s:g} "
                     "s)")
    not_reading = _Said(f"the client read none of its answer for http.send_timeout_s "
                        f"({send_timeout_s:g} s)")

    class BoundedH11Protocol(base):  # type: ignore[valid-type,misc]
        port_bounds = bounds
        _first_request: asyncio.TimerHandle | None = None
        _stalled: asyncio.TimerHandle | None = None
        _dropping: asyncio.TimerHandle | None = None
        _lost = False

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
            bounds.made(transport)
            # Counted at the accept already (port_bounds); this count only when uvicorn
            # opened the port itself.
            if not bounds.listening and len(self.connections) > max_connections:
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

        def shutdown(self) -> None:
            """The server stops: uvicorn closes a connection with no request under way and
            waits for the others' answers. Over TLS that close sends close_notify, then
            waits for the client's, which a client holding the connection idle in its pool
            (httpx, requests, an appliance's uplink) sends only when it next looks at it:
            every stop with one such client waited the hub's whole grace (5 s), and the
            appliance's stop gave up on its web server after 10 s. Nothing is in flight on
            it: once asyncio has handed what it holds for the client to the kernel (which a
            close still sends), the connection is dropped."""
            idle = self.cycle is None or self.cycle.response_complete
            super().shutdown()
            if idle and self.transport.get_extra_info("sslcontext") is not None:
                self._drop_once_sent()

        def _drop_once_sent(self) -> None:
            self._dropping = None
            if self._lost:
                return
            unsent = _unsent(self.transport)
            if unsent is None:  # cannot tell: uvicorn's close goes on as before
                return
            if unsent == 0:
                self.transport.abort()
            else:  # a client still reading the end of its answer: uvicorn's grace bounds it
                self._dropping = self.loop.call_later(DRAIN_LOOK_S, self._drop_once_sent)

        def connection_lost(self, exc: Exception | None) -> None:
            self._lost = True
            for timer in (self._first_request, self._stalled, self._dropping):
                if timer is not None:
                    timer.cancel()
            self._first_request = self._stalled = self._dropping = None
            super().connection_lost(exc)

    return BoundedH11Protocol
