"""How the uplink's bucket PUTs share the line to the hub, for ``appliance.transfer.client``.

Owns: the connection slots (:class:`ConnectionSlots`: how many PUTs send at once, urgent ones
first), the kernel's pacing of every hub connection and its low unsent mark (:class:`Pacer`,
handed each new socket by ``PacedBackend``, httpcore's network backend; the unsent bytes read
from ``TCP_INFO``), and the rate the PUTs achieve together (:class:`LinkMeter`, what
``pack_level = "auto"`` is told). May not touch: HTTP requests and answers, retries, the
protocol's calls (``HubClient`` does them and holds these around each PUT), the database, the
spool, the buckets' bytes.

PUTs sending at once are capped (``hub.connections`` slots, shared by every job): with 8
workers x 4 buckets in flight each, 30-odd TCP streams slow-started together and overflowed a
one-BDP router queue on a 20 Mbit/s / 70 ms line (17 % of the wire bytes were resends,
docs/benchmarks.md). Bucket PUTs wait for a slot (:class:`ConnectionSlots`) without a timeout
(the wait is for our own uploads, each with its own timeout); a routine PUT leaves one slot
for the small calls (manifest, commit) and for urgent PUTs, which also go before waiting
routine ones. A PUT gives its slot back once its body is handed to the kernel (each hub
connection keeps at most ``NOT_SENT_LOWAT`` unsent), not when the answer comes: the answer
to a study's last bucket waits for the hub's archive, and PUTs that shared the line used to
end together, wait together, and leave the line idle in waves. The pool therefore keeps up to
twice as many connections as slots. (HTTP/2 would multiplex one connection, but the hub
serves HTTP/1.1 through uvicorn's h11, and h2 is not installed.)
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import httpcore


class ConnectionSlots:
    """How many bucket PUTs may be sending at once (until each body is handed to the kernel),
    across every job of one hub.

    Routine PUTs take at most ``total - 1`` slots (one stays for the small calls and for an
    urgent PUT); urgent PUTs may take all ``total`` and are served before routine waiters.
    """

    def __init__(self, total: int):
        self.total = max(1, total)
        self._in_use = 0
        self._urgent_waiting = 0
        self._cond = threading.Condition()
        self.peak = 0  # the most PUTs seen on the wire at once (tests, benchmarks)
        self.waiting = 0  # PUTs waiting for a slot now

    @property
    def in_use(self) -> int:
        return self._in_use

    @contextlib.contextmanager
    def hold(self, urgent: bool = False) -> Iterator[None]:
        limit = self.total if urgent else max(1, self.total - 1)
        with self._cond:
            self._urgent_waiting += urgent
            self.waiting += 1
            try:
                while self._in_use >= limit or (not urgent and self._urgent_waiting):
                    self._cond.wait()
            finally:
                self._urgent_waiting -= urgent
                self.waiting -= 1
            self._in_use += 1
            self.peak = max(self.peak, self._in_use)
        try:
            yield
        finally:
            with self._cond:
                self._in_use -= 1
                self._cond.notify_all()


SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)  # Linux
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)  # Linux
# Bytes a hub connection may hold unsent in the kernel: a PUT whose body has been handed over
# is then nearly on the wire (26 ms at 20 Mbit/s), so its slot can go to the next PUT. (128 KiB
# gave the same times with more resends; 16-32 KiB no better, and more wake-ups at 100 Mbit/s.)
NOT_SENT_LOWAT = 64 * 1024


TCP_INFO = getattr(socket, "TCP_INFO", 11)  # Linux
# struct tcp_info (linux/tcp.h): tcpi_notsent_bytes (written, not yet sent), at a stable
# offset since Linux 4.6.
_U32 = struct.Struct("=I")
NOTSENT_AT = 144


def bytes_unsent(sock: socket.socket) -> int:
    """Bytes the kernel holds for this connection and has not sent yet (0 if unknown)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 160)
    except (OSError, ValueError):  # closed meanwhile
        return 0
    return _U32.unpack_from(info, NOTSENT_AT)[0] if len(info) >= NOTSENT_AT + 4 else 0


class Pacer:
    """Kernel pacing of the hub connections when the line's rate is known (``hub.link_mbps``).

    Why: with several bucket PUTs on the wire, BBR (the kernel's default here) overshoots a
    shallow router queue (one bandwidth-delay product) at each start and probe; on the
    emulated 20 Mbit/s / 70 ms line 14-16 % of the CT set's wire bytes were resends. Capping
    every connection at ``HEADROOM`` x the line's rate / the connections sending
    (``SO_MAX_PACING_RATE``, updated on every connection as that number changes) keeps the
    queue short: the resends fell to ~1 %. The connections sending: at least the PUTs whose
    bodies are being handed over, and the connections the kernel still has unsent bytes of
    (``TCP_INFO``, read every ``POLL_S`` while any has): a PUT whose body is handed over
    gives its slot to the next PUT while its last bytes still wait to be sent, and counting
    only the PUTs let the caps add up to more than the line (4 Mbit/s CT: 2.3 MB of 12.4
    dropped at the queue). Bytes sent and not yet acknowledged do not count: pacing is
    about what is still to send (counting them left the line at 86-96 %). The headroom
    covers the IP/TCP/TLS headers. Rate 0: nothing is paced (the line's rate is unknown);
    every connection still gets the low unsent mark."""

    # The headers (~3.5 %) and some slack.
    HEADROOM = 1.1
    POLL_S = 0.01

    def __init__(self, link_mbps: float):
        self.bytes_per_s = link_mbps * 1e6 / 8
        self.enabled = self.bytes_per_s > 0
        self.active = 0  # PUT bodies being handed over
        self.busy = 0  # connections with unsent bytes, as last polled
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._watching = False
        self._applied = -1

    def rate(self) -> int:
        """The cap of each connection now, bytes per second."""
        return int(self.HEADROOM * self.bytes_per_s / max(1, self.active, self.busy))

    def add(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the kernel keeps little unsent: see put_bucket
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOT_SENT_LOWAT)
        if not self.enabled:
            return
        with self._lock:
            self._sockets.add(sock)
            self._apply(sock, self.rate())

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """Around one PUT's body: every connection's cap follows the number sending."""
        if not self.enabled:
            yield
            return
        self._change(+1)
        try:
            yield
        finally:
            self._change(-1)

    def _change(self, delta: int) -> None:
        with self._lock:
            self.active += delta
            self._apply_all()
            if self.active and not self._watching:
                self._watching = True
                threading.Thread(target=self._watch, name="pas-hub-pacer", daemon=True).start()

    def _watch(self) -> None:
        """Poll the connections while PUTs send or bytes wait unsent; ends when neither."""
        while True:
            with self._lock:
                sockets = [s for s in self._sockets if s.fileno() >= 0]
            busy = sum(bytes_unsent(s) > 0 for s in sockets)
            with self._lock:
                self.busy = busy
                self._apply_all()
                if not self.active and not busy:
                    self._watching = False
                    return
            time.sleep(self.POLL_S)

    def _apply_all(self) -> None:
        """With the lock held: the current cap on every connection, if it changed."""
        rate = self.rate()
        if rate == self._applied:
            return
        self._applied = rate
        for sock in list(self._sockets):
            self._apply(sock, rate)

    @staticmethod
    def _apply(sock: socket.socket, rate: int) -> None:
        with contextlib.suppress(OSError, ValueError):  # closed meanwhile
            sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, min(rate, 2**32 - 1))


class PacedBackend(httpcore.SyncBackend):
    """httpcore's own network backend, handing each new connection's socket to the pacer
    (the TLS socket too: wrapping detaches the plain one), which sets its low unsent mark
    and, when the line's rate is known, its pacing."""

    def __init__(self, pacer: Pacer, inner: httpcore.NetworkBackend | None = None):
        self.pacer = pacer
        # The backend it replaces, whose connections it paces (a proxied client's bounds the
        # wait for the proxy's answer: transfer/http.py TunnelBound); None: httpcore's own.
        self.inner = inner

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        stream = (self.inner.connect_tcp(*args, **kwargs) if self.inner is not None
                  else super().connect_tcp(*args, **kwargs))
        plain_start_tls = stream.start_tls
        self.pacer.add(stream.get_extra_info("socket"))

        def start_tls(*tls_args: Any, **tls_kwargs: Any) -> httpcore.NetworkStream:
            tls = plain_start_tls(*tls_args, **tls_kwargs)
            self.pacer.add(tls.get_extra_info("socket"))
            return tls

        stream.start_tls = start_tls  # type: ignore[method-assign]
        return stream


class LinkMeter:
    """The rate bucket PUTs achieve together, counted only while at least one is on the wire,
    so idle time between studies does not count as a slow link. What ``pack_level = "auto"``
    is told when no cap says better. Older figures fade (halved every ``HALF_LIFE_S`` of busy
    time) so a link that changes is followed."""

    HALF_LIFE_S = 20.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._active = 0
        self._since = 0.0
        self._busy_s = 0.0
        self._bytes = 0.0

    @contextlib.contextmanager
    def measure(self, size: int) -> Iterator[None]:
        """Around one PUT of ``size`` bytes; counted only if it succeeds."""
        with self._lock:
            if self._active == 0:
                self._since = self._clock()
            self._active += 1
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._lock:
                self._active -= 1
                if ok:
                    self._bytes += size
                if self._active == 0:
                    self._busy_s += self._clock() - self._since
                    if self._busy_s > 2 * self.HALF_LIFE_S:
                        self._busy_s, self._bytes = self._busy_s / 2, self._bytes / 2

    def mbps(self) -> float | None:
        """Mbit/s over the busy time; None before 1 MB and a quarter second were measured."""
        with self._lock:
            busy = self._busy_s + (self._clock() - self._since if self._active else 0.0)
            if self._bytes < 1e6 or busy < 0.25:
                return None
            return self._bytes * 8 / busy / 1e6
