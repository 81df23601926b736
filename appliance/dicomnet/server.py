"""The association server PAS's DICOM port runs: pynetdicom's, with the TLS handshake moved
off its accept loop.

pynetdicom wraps each accepted socket in TLS inside ``get_request``, on the one thread that
accepts every connection, and the handshake blocks with no time limit. A client that opened a
TCP connection to the TLS port and sent nothing (a port scan, a health check, a device
configured for plain DICOM that waits for the A-ASSOCIATE-AC) held that thread: no other
association was accepted for as long as it stayed connected, and a stop waited on that
thread for ever (``systemctl stop`` ended in systemd's kill). Here each handshake runs in the
connection's own thread, limited to the network timeout, and a stop ends those still waiting.

A handshake refused for the client's certificate (none, another CA's, expired) is a refused
access like an unknown AE title: said at warning level, naming the address and why, and
handed to ``on_refused`` (the audit trail's security rows). pynetdicom's loop dropped it
without a word, so a modality whose certificate had expired could not send and nothing on
the site said why. Other failed handshakes (a port probe, a health check that only connects,
plain DICOM on the TLS port) stay at debug level: health checks would fill the journal.

Connections open at once are bounded (``max_connections``, ``dicom.max_connections``): one
accepted beyond is closed at once, counted and logged (invariant 8). Without a bound, every
connection that sent nothing (a port scan, a flood) held two threads for pynetdicom's ACSE
timeout (30 s): 1,000 such connections took +44 MB and hundreds of threads, and a flood
could exhaust the unit's tasks. The bound counts connections still in their TLS handshake
and associations alike. Which of them may negotiate at once is the listener's business
(``dicom.max_associations``, counted from the A-ASSOCIATE-RQ: appliance/ingest/scp.py).
Such a refusal is decided on the accept loop but reported (``on_refused``: the audit row, a
SQLite transaction) from a thread of its own: on the loop, the write waited for the
database's write lock whenever another writer held it (up to its 30 s busy timeout), and no
connection, a modality's included, was accepted meanwhile.

Owns: accepting connections on the DICOM port. May not touch the index, the spool or any
service's handlers.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from appliance.dicomnet.contexts import SharedContexts
from appliance.logs import ThrottledWarning
from appliance.ops.security import certificate_refusal, name_refusal

log = logging.getLogger("pas.ingest")


class RefusalReporter:
    """Calls ``report(address, kind, reason)`` for each refusal :meth:`put` from the accept
    loop, in a thread of its own, so that the loop never waits for it (the audit row's
    write can wait up to the database's busy timeout). Refusals waiting to be reported are
    kept as counts per (address, kind, reason), at most ``max_pending`` of them (invariant
    8): past that, those of a new address are counted under the address "-"."""

    def __init__(self, report: Callable[[str, str, str], None], max_pending: int = 1024):
        self._report = report
        self.max_pending = max_pending
        self._pending: dict[tuple[str, str, str], int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._done = threading.Event()  # nothing pending, nothing being reported
        self._done.set()
        self._closing = False
        # Started here, not at the first refusal: a thread that cannot start must fail the
        # listener's start, not the accept loop.
        threading.Thread(target=self._run, name="pas-dicom-refusals", daemon=True).start()

    def put(self, address: str, kind: str, reason: str) -> None:
        with self._lock:
            key = (address, kind, reason)
            if key not in self._pending and len(self._pending) >= self.max_pending:
                key = ("-", kind, reason)
            self._pending[key] = self._pending.get(key, 0) + 1
            self._done.clear()
        self._wake.set()

    def close(self, timeout: float) -> bool:
        """Report what is pending, then end the thread (at the stop, once nothing more is
        put: before the audit's last counts are written); False if ``timeout`` ran out
        first (the thread then ends once it has reported them)."""
        self._closing = True
        self._wake.set()
        return self._done.wait(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                pending, self._pending = self._pending, {}
                if not pending and self._closing:
                    return
            for (address, kind, reason), count in pending.items():
                for _ in range(count):
                    try:
                        self._report(address, kind, reason)
                    except Exception:  # the next refusals are still reported
                        log.exception("reporting a refused connection failed")
            with self._lock:
                if not self._pending:
                    self._done.set()
                    if self._closing:
                        return


class ListenerServer(ThreadedAssociationServer):
    """:class:`ThreadedAssociationServer` whose TLS handshakes run in each connection's
    thread, at most ``handshake_timeout_s``, and end when the server stops; with at most
    ``max_connections`` connections open at once (0: no bound)."""

    # The listening socket's backlog: socketserver's 5 dropped the SYN of a sixth connection
    # arriving while the accept loop was busy, and the client's kernel sent it again only
    # after a second (a CT opening parallel associations, a viewer's C-MOVE beside them).
    request_queue_size = 128

    def __init__(self, *args: Any, handshake_timeout_s: float = 60.0,
                 max_connections: int = 0,
                 on_refused: Callable[[str, str, str], None] | None = None,
                 allowed_names: tuple[str, ...] = (),
                 **kwargs: Any) -> None:
        self.handshake_timeout_s = handshake_timeout_s
        self.max_connections = max_connections
        # dicom.tls.allowed_names: a client certificate must also carry one (empty: any).
        self.allowed_names = allowed_names
        # Called (address, kind, reason) for a handshake that refused the client's
        # certificate (kind "tls-certificate") and a connection over the bound
        # ("too-many-connections").
        self.on_refused = on_refused
        self._handshakes_lock = threading.Lock()
        self._handshaking: set[ssl.SSLSocket] = set()
        self._closing = False
        # Connections accepted whose thread has not handed them to their association yet
        # (the TLS handshake, the association's creation): their sockets.
        self._starting: set[Any] = set()
        self._full_warning = ThrottledWarning(log)
        super().__init__(*args, **kwargs)
        # Once the port is bound: a start that fails leaves no thread behind.
        self._full_refusals = RefusalReporter(on_refused) if on_refused is not None else None
        self.contexts = SharedContexts(self.contexts)  # not copied for each association

    def open_connections(self) -> int:
        """Connections open on the port: those starting, and the associations running.
        Counted by socket: an association whose thread just started is also still
        "starting" until its connection's thread returns (a burst of six connections was
        counted as seven, and the sixth refused)."""
        with self._handshakes_lock:
            sockets = set(self._starting)
        for assoc in self.active_associations:
            transport = getattr(assoc.dul, "socket", None)
            sockets.add(getattr(transport, "socket", None) or assoc)
        return len(sockets)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's hook before a connection gets its thread: False closes it."""
        if not self.max_connections or self.open_connections() < self.max_connections:
            with self._handshakes_lock:
                self._starting.add(request)
            return True
        self._refuse_full(client_address[0])
        return False

    def _refuse_full(self, address: str) -> None:
        reason = (f"connection closed: {self.max_connections} connections already open "
                  f"(dicom.max_connections)")
        self._full_warning.warn("DICOM port: %s from %s", reason, address)
        if self._full_refusals is not None:  # not on this loop: see the module's docstring
            self._full_refusals.put(address, "too-many-connections", reason)

    def finish_refusals(self, timeout: float) -> bool:
        """At the stop, once nothing more is accepted: the refusals of connections over the
        bound all handed to ``on_refused``, and their thread ended (False if ``timeout``
        ran out first)."""
        return self._full_refusals is None or self._full_refusals.close(timeout)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only: the handshake is :meth:`process_request_thread`'s."""
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._started(request)  # no thread could be started: socketserver closes it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if isinstance(request, ssl.SSLSocket) and not self._handshake(request,
                                                                          client_address):
                self.shutdown_request(request)
                return
            super().process_request_thread(request, client_address)
        finally:
            self._started(request)

    def _started(self, request: Any) -> None:
        with self._handshakes_lock:
            self._starting.discard(request)

    def _handshake(self, request: ssl.SSLSocket, client_address: Any) -> bool:
        """Complete the TLS handshake within the time limit; False (logged) when it failed,
        timed out or the server is stopping."""
        with self._handshakes_lock:
            if self._closing:
                return False
            self._handshaking.add(request)
        blocking = request.gettimeout()
        try:
            request.settimeout(self.handshake_timeout_s)
            request.do_handshake()
            request.settimeout(blocking)  # the association's reads: as pynetdicom set them
        except TimeoutError:
            if not self._closing:
                log.warning("TLS: %s connected but completed no handshake in %.0f s "
                            "(dicom.network_timeout_s): connection closed", client_address[0],
                            self.handshake_timeout_s)
            return False
        except (OSError, ValueError) as exc:
            # ssl.SSLError is an OSError; ValueError: closed by a stop.
            refusal = certificate_refusal(exc)
            if refusal is None:  # a port probe, a health check, plain DICOM: not news
                log.debug("TLS handshake with %s failed: %s", client_address[0], exc)
                return False
            log.warning("TLS: %s refused: %s (connection closed)", client_address[0], refusal)
            if self.on_refused is not None:
                self.on_refused(client_address[0], "tls-certificate", refusal)
            return False
        finally:
            with self._handshakes_lock:
                self._handshaking.discard(request)
        refusal = name_refusal(request.getpeercert(), self.allowed_names, "dicom.tls")
        if refusal is not None:  # a certificate the CA issued, to another device
            log.warning("TLS: %s refused: %s (connection closed)", client_address[0], refusal)
            if self.on_refused is not None:
                self.on_refused(client_address[0], "tls-certificate", refusal)
            return False
        return not self._closing

    def end_handshakes(self) -> None:
        """Refuse every handshake from now on and end those waiting for their client: the
        server's close joins their threads."""
        with self._handshakes_lock:
            self._closing = True
            waiting = list(self._handshaking)
        for request in waiting:
            with contextlib.suppress(OSError):
                # The TCP socket's shutdown, not SSLSocket's: that one also drops the TLS
                # object, and a thread between its registration and its do_handshake then
                # died on an AttributeError (a traceback at the stop, its socket left open).
                # This way the handshake meets the end of the connection (an OSError).
                socket.socket.shutdown(request, socket.SHUT_RDWR)
