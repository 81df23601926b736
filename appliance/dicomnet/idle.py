"""What the network timeout (``dicom.network_timeout_s``) measures: a peer's silence while
PAS waits for it, not how long PAS works or sends for it.

Owns: the decision, taken by the association loop (reactor.py), that an association has
been idle too long. Touches nothing else of pynetdicom's behaviour (its idle timer is the
clock; what happens on expiry, A-ABORT or A-RELEASE, is still pynetdicom's choice).

Why: pynetdicom restarts its idle timer only when a PDU arrives, and looks at it only
between two requests (a handler runs in the association loop's thread). A C-FIND or C-MOVE
that kept PAS busy for longer than the timeout (100,000 answers to a viewer reading them
slowly; a C-MOVE of a big study, during which the viewer sends nothing) was served in full,
then the first look after its handler returned found the timer expired: PAS aborted the
association, usually just as the viewer asked to release it (findscu: every answer, Success,
then "Association Release Failed: Peer aborted Association", exit code 2; movescu the same,
exit code 67, for every C-MOVE longer than the timeout). A fast viewer's A-RELEASE-RQ often
arrived first, during the audit write: only slow ones saw it. (A C-GET escaped: each C-STORE
sent on its association restarted the timer with its response.)

A peer that PAS is answering, or that is reading what PAS sent, is not idle. So the clock
restarts when a PDU arrives (pynetdicom), when PAS has sent one (reactor.py's DUL step; each
C-STORE fragment written straight to the socket, direct_store.py), when a handler returns
(reactor.py's association loop), and here when the socket's send queue shrank: much of what
a slow viewer has not read yet waits there once PAS has sent its last answer (the kernel
grew that queue to 600 kB, some 3,500 answers, for a findscu reading slowly on loopback, and
reading them took it longer than the timeout). It is not looked at while PDUs are still
queued for the DUL to send.

What still ends an association: a peer silent for the timeout while nothing is owed to it
(an idle association, a connection quiet after its A-ASSOCIATE-RQ), and a peer that stops
reading: its send queue stays as it is (dropped here after the timeout), or a send blocks
(the socket's send timeout, reactor.py's ``_bound_socket_waits`` or Python's on sockets
PAS opened, fails a send that made no progress for the timeout). Out of PAS's sight: what
the viewer's own kernel already took and its application reads later (its receive buffer,
about 100 kB in the case above): a viewer needing longer than the timeout for that is idle.
"""

from __future__ import annotations

import contextlib
import fcntl
import struct
import termios
from typing import Any

_COUNT = struct.Struct("i")


def unsent_bytes(sock: Any) -> int:
    """Bytes in the socket's send queue: not yet sent, or sent and not yet acknowledged by
    the peer's TCP (SIOCOUTQ). 0 when it cannot tell (a closed socket)."""
    if sock is None:
        return 0
    with contextlib.suppress(OSError, ValueError):
        fd = sock.fileno()
        if fd >= 0:
            return int(_COUNT.unpack(fcntl.ioctl(fd, termios.TIOCOUTQ, bytes(_COUNT.size)))[0])
    return 0


def peer_silent(assoc: Any) -> bool:
    """True once the peer has been silent for ``network_timeout`` while PAS waited for it.

    The send queue is looked at only in the second half of the timeout (a system call,
    not one per turn of a busy association loop), each turn from then on: the peer is
    silent if it took no byte since the clock last restarted, or since the last look."""
    dul = assoc.dul
    timer = dul._idle_timer
    timeout = timer.timeout
    if timeout is None or timer.remaining > timeout / 2 or dul.to_provider_queue.qsize():
        return False
    started = timer._start_time
    queued = unsent_bytes(getattr(dul.socket, "socket", None))
    last = getattr(dul, "_pas_unsent", None)  # (clock start, bytes queued) at the last look
    if last is not None and last[0] == started and queued < last[1]:
        timer.restart()  # the peer is reading what PAS sent
        started = timer._start_time
    dul._pas_unsent = (started, queued)
    return bool(timer.expired)
