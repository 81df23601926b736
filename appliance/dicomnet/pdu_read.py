"""Reading one PDU from an association's socket, within a deadline.

Owns: filling a PDU's header and body from the socket, and the time a PDU may take to arrive
(:class:`PduDeadline`). The reactor (reactor.py) decides what to do with what is read. May
not touch: pynetdicom's state machine, the index, files.
"""

from __future__ import annotations

import time
from typing import Any

# PDUs up to this size are read into one buffer allocated from their header's length.
PREALLOCATE_PDU_BYTES = 4 << 20


class PduDeadline:
    """When the PDU being read must have arrived: ``network_timeout`` after its first byte.

    The socket's receive timeout (reactor.py's ``_bound_socket_waits``) bounds each ``recv``, not a
    PDU: a peer sending one byte every few seconds (a slowloris, or a device stuck in a
    retry loop) never let a ``recv`` time out, and held its connection (and, past its
    A-ASSOCIATE-RQ, its association place) for ever; the association's own timers (ARTIM,
    the network idle timeout) are looked at only between PDUs, and the abort they lead to
    waited for this very read. So the read of a PDU has a deadline, checked after each
    ``recv`` that did not complete it (a ``recv`` blocked at the deadline is still bounded
    by the socket's timeout: a PDU ends at most twice the timeout after its start).

    A P-DATA-TF PDU carries up to ``dicom.max_pdu`` bytes: on a slow link a large one may
    rightly take longer than the timeout. Every ``PROGRESS_BYTES`` of its body that arrive
    move its deadline to ``network_timeout`` from then (at least 64 kB per timeout: a
    trickle is not progress), and restart the association's network idle timer: the peer
    is not silent (idle.py; without it the association loop aborted a PDU still steadily
    arriving). Association PDUs (request, accept, reject: the request comes before any AE
    title is checked) and control PDUs have the one deadline."""

    PROGRESS_BYTES = 64 << 10

    __slots__ = ("at", "timeout", "progress", "credited", "idle_timer")

    def __init__(self, timeout: float, idle_timer: Any = None) -> None:
        self.timeout = timeout
        self.at = time.monotonic() + timeout
        self.progress = False
        self.credited = 0
        self.idle_timer = idle_timer

    def check(self, count: int, missing: int) -> None:
        """``count`` bytes just arrived, ``missing`` still to come: TimeoutError past the
        deadline."""
        now = time.monotonic()
        if self.progress:
            self.credited += count
            if self.credited >= self.PROGRESS_BYTES:
                self.credited = 0
                self.at = now + self.timeout
                if self.idle_timer is not None:
                    self.idle_timer.restart()
        if now > self.at:
            raise TimeoutError(f"a PDU still {missing} bytes short after the network "
                               f"timeout ({self.timeout:g} s, dicom.network_timeout_s): "
                               f"the peer sends too slowly")


def recv_exactly(sock: Any, view: memoryview, deadline: PduDeadline | None = None) -> bool:
    """Fill ``view`` from the socket; False if the peer closed it first. TimeoutError if
    ``deadline`` passes first."""
    while len(view):
        count = sock.recv_into(view)
        if not count:
            return False
        view = view[count:]
        if deadline is not None and len(view):
            deadline.check(count, len(view))
    return True


def recv_body(sock: Any, length: int, deadline: PduDeadline | None) -> tuple[bytearray, bool]:
    """A PDU body of ``length`` bytes, and whether it is complete. Up to
    ``PREALLOCATE_PDU_BYTES`` in one buffer allocated from the length; beyond (a length no
    one sends), in chunks of that size: memory grows only with what actually arrives."""
    if length <= PREALLOCATE_PDU_BYTES:
        body = bytearray(length)
        return body, recv_exactly(sock, memoryview(body), deadline)
    body = bytearray()
    while len(body) < length:
        chunk = bytearray(min(PREALLOCATE_PDU_BYTES, length - len(body)))
        complete = recv_exactly(sock, memoryview(chunk), deadline)
        body += chunk
        if not complete:
            return body, False
    return body, True
