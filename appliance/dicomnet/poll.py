"""Whether sockets are readable, for any file descriptor number: ``poll(2)``, not ``select``.

Owns: :func:`readable` (the reactor's wait) and one adjustment to pynetdicom's
``AssociationSocket.ready``. Touches nothing else.

Why: ``select.select`` takes descriptors below 1024 only and raises ``ValueError`` above.
The daemon may hold far more (``LimitNOFILE=65536``): 1,000 HTTP connections held open by
one host (a slow client, or one that never finishes its headers) pushed the next DICOM
association's socket past 1024, pynetdicom's ``ready()`` took the ``ValueError`` for a
closed connection (Evt17) and the association was aborted; the reactor's own wait swallowed
it. Modalities could not store, with nothing in the log (security review, 2026-12-06).
"""

from __future__ import annotations

import select
import ssl
from collections.abc import Sequence
from typing import Any

from pynetdicom.transport import AssociationSocket

# Any of these says "a read will not block" (data, or the end of the connection to see).
_READY = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | select.POLLNVAL


def readable(waitables: Sequence[Any], timeout_s: float) -> list[Any]:
    """Those of ``waitables`` (sockets, or objects with ``fileno()``) readable within
    ``timeout_s``, as ``select.select(waitables, [], [], timeout_s)[0]`` says, for any
    descriptor number. Raises OSError or ValueError for a closed one, as select does."""
    poller = select.poll()
    by_fd = {}
    for waitable in waitables:
        fd = waitable.fileno()
        by_fd[fd] = waitable
        poller.register(fd, select.POLLIN | select.POLLPRI)
    ready = {fd for fd, events in poller.poll(max(0, int(timeout_s * 1000))) if events & _READY}
    return [by_fd[fd] for fd in by_fd if fd in ready]


def _ready(self: AssociationSocket) -> bool:
    """pynetdicom's ``AssociationSocket.ready`` through :func:`readable` (its own used
    ``select``: a descriptor past 1024 was a closed connection, Evt17)."""
    if self.socket is None or self._is_connected is False:
        return False
    try:
        ready = bool(readable([self.socket], 0))
    except (OSError, TimeoutError, ValueError):
        self.event_queue.put("Evt17")  # the transport connection closed, as pynetdicom says
        return False
    if isinstance(self.socket, ssl.SSLSocket):  # data TLS buffered, poll unaware (#528)
        return ready or bool(self.socket.pending())
    return ready


def install() -> None:
    """Every association socket of this process is asked with poll(2) from now on."""
    AssociationSocket.ready = property(_ready)  # type: ignore[method-assign,assignment]
