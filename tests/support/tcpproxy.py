"""A small TCP proxy on 127.0.0.1 that a test can cut and restore: the WAN link going down.

Owns: one listening socket, a pair of pump threads per connection, byte counters. ``cut()``
closes every open connection at once (RST, as a dead link looks to the sender) and refuses
new ones until ``restore()``. ``drop_upward()``, before a cut, makes the link dead towards the
upstream only: what the client sends goes nowhere (its connections stay open and silent)
while answers already on their way still arrive, so that a request under way stays under way
until the cut. ``delay_up_s`` holds each chunk towards the upstream that long before passing
it on (a slow, far archive: a request reaches it late). TLS passes through untouched (the
proxy never sees clear text).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

from tests.support.peers import free_port


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.bytes_up = 0  # client -> upstream
        self.connections = 0
        self._up = threading.Event()
        self._up.set()
        self._dropping = False  # drop_upward() until the next restore()
        self.delay_up_s = 0.0  # each chunk towards the upstream waits this long first
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closing = False
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._accept, daemon=True, name="tcpproxy")

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def cut(self) -> None:
        """Drop every connection now (RST) and refuse new ones."""
        self._up.clear()
        with self._lock:
            sockets = list(self._open)
            self._open.clear()
        for sock in sockets:
            _reset(sock)

    def drop_upward(self) -> None:
        """From now on every byte towards the upstream is dropped (and not counted), on the
        open connections and on new ones; answers still pass. Ended by ``cut()`` then
        ``restore()`` (a connection that lost bytes cannot carry on)."""
        self._dropping = True

    def restore(self) -> None:
        self._dropping = False
        self._up.set()

    def stop(self) -> None:
        self._closing = True
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._open.update((client, server))
                self.connections += 1
            if not self._up.is_set():  # cut while we were connecting upstream
                self.cut()
                continue
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upward: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if upward and self._dropping:
                    continue
                if upward and self.delay_up_s:
                    time.sleep(self.delay_up_s)  # the emulated link's latency, not a wait
                sink.sendall(chunk)
                if upward:
                    with self._lock:
                        self.bytes_up += len(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)


def _reset(sock: socket.socket) -> None:
    """Kill a connection the way a dead link does to the sender: linger 0 (RST on close), and
    shutdown first, since a close() alone does not wake the pump thread blocked in recv() on
    this socket (the kernel keeps the socket alive, and silent, until that recv returns)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
