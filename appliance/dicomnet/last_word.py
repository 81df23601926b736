"""A peer's PDU that cannot be read, and the connection's end once PAS has said its last word.

Owns: the log line and the report (``ae._pas_invalid_pdu``, set by appliance/ingest/scp.py:
the refusals audit and ``pas_access_refused{channel="dicom", reason="invalid-pdu"}``) of a
PDU that does not decode (an unknown PDU type, a length over what PAS accepts, a body that
does not parse, P-DATA fragments that break their rules); and the closing of a connection
whose association no longer exists (state Sta13, PS3.8 9.2). The reactor (reactor.py) calls
both. May not touch: the state machine's actions, negotiation, any handler.

Why: pynetdicom logged such a PDU without naming the peer, with a traceback for a body that
did not parse, and then went on reading the stream as if it could still be framed. The body
of an unknown PDU type stayed in the socket: the next read took it for a PDU header and
blocked for the network timeout (60 s) on bytes that were never coming, the connection
holding its place among ``dicom.max_connections`` (and an admitted one among
``dicom.max_associations``) all that time, and the A-ABORT the standard asks for (AA-8) was
not even sent until then. Here the reader stops at the first PDU it cannot read: the
A-ABORT goes out, then the connection is closed.

Sta13 is where the association is over and PAS has sent its last PDU (A-ASSOCIATE-RJ,
A-ABORT, A-RELEASE-RP); PS3.8 has it wait for the peer to close, at most the ARTIM timer
(30 s). pynetdicom already closed at once when nothing more had arrived, but read, decoded
and ignored whatever a peer kept sending, up to the ARTIM timer: a peer streaming P-DATA
after PAS aborted it held its place 30 s (and a partial PDU in that stream, the network
timeout: 60 s). Nothing a peer sends in Sta13 can change anything (PS3.8 AA-6, AA-7), so it
is not read: what has arrived is discarded, PAS's side of the connection is shut down after
its last PDU (that PDU reaches the peer before the end of the stream), and the socket closed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any

log = logging.getLogger("pas.dicomnet")

# The description of an unreadable PDU kept, at most: the decoder's message may quote a
# value the peer sent (a 60 kB "UID" in an A-ASSOCIATE-RQ item), and the description goes to
# the log line, the audit row and the refusals counter's detail.
DESCRIPTION_AT_MOST = 300

# What is read and thrown away before the close, at most: with nothing unread left, the
# close ends the stream with a FIN after PAS's last PDU; with data still unread, the kernel
# answers with a reset (the peer may then lose that PDU, if it had not read it yet).
DISCARD_AT_MOST = 4 << 20


def peer_name(dul: Any) -> str:
    """``CT1 (10.0.0.5)``: the calling AE title once its A-ASSOCIATE-RQ was read (for an
    association PAS accepts; the called one for PAS's own), and the address."""
    assoc = dul.assoc
    remote = assoc.acceptor if assoc.is_requestor else assoc.requestor
    title = getattr(dul, "_pas_calling", "") if assoc.is_acceptor else \
        str(remote.ae_title).strip()
    return f"{title} ({remote.address})" if title else str(remote.address)


def protocol_error(dul: Any, what: str) -> None:
    """The peer sent a PDU that cannot be read (``what`` says how): one warning line naming
    the peer; the report (audit, counter) is made once the connection is closed
    (:func:`report`): the peer does not wait for the audit row."""
    if getattr(dul, "_pas_protocol_error", None) is not None:
        return  # one line per connection: what follows an unreadable PDU is not read
    if len(what) > DESCRIPTION_AT_MOST:
        what = f"{what[:DESCRIPTION_AT_MOST]}... [{len(what):,} characters]"
    dul._pas_protocol_error = what
    log.warning("DICOM peer %s sent %s: association aborted (A-ABORT), connection closed",
                peer_name(dul), what)


def report(dul: Any) -> None:
    """Hand the protocol error noted on this connection (if any, once) to the listener
    (``ae._pas_invalid_pdu``): the refusals audit row and counter. Never raises."""
    what = getattr(dul, "_pas_protocol_error", None)
    if what is None or getattr(dul, "_pas_protocol_reported", False):
        return
    dul._pas_protocol_reported = True
    assoc = dul.assoc
    hook = getattr(assoc.ae, "_pas_invalid_pdu", None) if assoc.is_acceptor else None
    if hook is None:
        return  # PAS's own association (pas send, a C-MOVE's): the log line says it
    try:
        hook(assoc.requestor.address, getattr(dul, "_pas_calling", ""), what)
    except Exception:
        log.exception("reporting the invalid PDU of %s failed", peer_name(dul))


def wake_sender(dul: Any) -> None:
    """Tell a thread waiting for the peer's answer on this association (a forward's C-STORE,
    a C-MOVE's sub-operation, a worklist query: PAS's own associations) that none is coming,
    as pynetdicom's actions for a peer's abort or a lost connection do (AA-2 to AA-4). Its
    AA-8 and PAS's own abort do not: PAS aborted at once on the peer's unreadable PDU, and
    the sender still waited out the DIMSE timeout (a dicom destination's 20 s of timeout_s,
    measured; 30 s by default) before its job failed."""
    dimse = getattr(dul.assoc, "dimse", None)
    if dimse is not None:
        dimse.msg_queue.put((None, None))


def _discard_arrived(sock: socket.socket) -> int:
    """Read and drop what has already arrived (without waiting); how many bytes. The TCP
    socket's own recv: an SSLSocket refuses flags, and TLS records need no decrypting to
    be thrown away."""
    discarded = 0
    with contextlib.suppress(OSError, ValueError):
        while discarded < DISCARD_AT_MOST:
            chunk = socket.socket.recv(sock, 1 << 16, socket.MSG_DONTWAIT)
            if not chunk:
                break
            discarded += len(chunk)
    return discarded


def close_after_last_word(dul: Any) -> bool:
    """Sta13: close the connection now, reading nothing more (see the module's docstring).
    pynetdicom's close queues Evt17 (Sta13 -> Sta1, the ARTIM timer stopped). True: the
    reactor's "an event was queued"."""
    transport = dul.socket
    if transport is None:
        return False
    sock = getattr(transport, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            socket.socket.shutdown(sock, socket.SHUT_WR)  # the stream ends after PAS's PDU
        discarded = _discard_arrived(sock)
        if discarded:
            log.debug("%s sent %d bytes after the association ended: discarded",
                      peer_name(dul), discarded)
    transport.close()
    if getattr(dul, "_pas_protocol_error", None) is not None:
        wake_sender(dul)  # its A-ABORT is out, the connection closed: no answer is coming
    report(dul)
    return True
