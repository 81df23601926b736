"""TCP_NODELAY on every DICOM association's socket, whoever opens it.

Owns: one adjustment to pynetdicom's ``AssociationSocket``: Nagle's algorithm off on the
socket it wraps (accepted by a listener or created to request an association). Touches
nothing else.

Why: pynetdicom leaves Nagle on, and a DIMSE message goes out as several writes (the command
PDU, then the dataset's). The last, short segment of a dataset then waits for the ACK of what
went before, and the peer delays that ACK (40 ms on Linux) because it has nothing to say until
the whole message has arrived: each C-STORE stalls. Measured 2026-12-05: PAS forwarding the
520-image MR set to a storescp (a ``dicom`` destination, the hospital's PACS) took 11.8 s
(44 images/s, 23 ms each) where storescu sends it in 0.3 s. The same stall DESIGN.md notes
for DCMTK's tools without ``TCP_NODELAY=1``; it was fixed for the Q/R listener's associations
alone (C-FIND answers, C-MOVE sub-associations) and stayed in every other association PAS
requests: forwarding, priors fetched by C-MOVE/C-GET, Storage Commitment reports, worklist
queries, ``pas send``.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from pynetdicom.transport import AssociationSocket

log = logging.getLogger("pas.dicomnet")

_original_init = AssociationSocket.__init__


def no_delay(sock: socket.socket | None) -> None:
    """Nagle off on ``sock`` (a TLS socket too: the option is the TCP socket's)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not a TCP socket (a test's socketpair): nothing to turn off
        log.debug("TCP_NODELAY not set: %s", exc)


def _init_without_delay(self: AssociationSocket, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    no_delay(self.socket)


def install() -> None:
    """Every association socket made from now on in this process has Nagle off."""
    AssociationSocket.__init__ = _init_without_delay  # type: ignore[method-assign]
