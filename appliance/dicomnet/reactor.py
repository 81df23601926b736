"""Event-driven waits for pynetdicom's two reactor loops.

Owns: how an association's threads wait for work. Touches nothing else of pynetdicom's
behaviour (state machine, PDUs, DIMSE, handlers are all pynetdicom's own).

Why: pynetdicom runs two threads per association, each a loop that sleeps 1 ms whenever it
found nothing to do (its own TODO: "try and make this event based"). A C-STORE round trip
crosses those sleeps several times: the request's last PDU arrives while the DUL sleeps, the
decoded message waits for the association loop's sleep, the response waits for the DUL's next
one. Measured on the ingest path that is ~1-2 ms of every instance, idle CPU included. Here
the DUL waits in ``select()`` on its socket and on an eventfd that is written whenever a
primitive is queued for it, and the association loop waits on an Event the DUL sets after each
event it processed; both still wake every ``TICK_S`` to honour pynetdicom's timers (ARTIM,
network idle timeout) and kill flags.

The two loops below are pynetdicom 3.0's ``DULServiceProvider.run_reactor`` and
``Association._run_reactor`` with only the waits changed (and the DUL's exception path kept
as is). They are installed only for the pynetdicom versions they were written against;
anything else keeps pynetdicom's own loops and logs why (`install()` returns False).

Behaviours that differ on purpose: what the network idle timer measures (idle.py): the
loops restart it when a PDU went out and when a handler returned, not only when one came in;
PDUs are read by PAS in every state, and one that cannot be read (or that the state does not
allow) is named and ends the reading, and a connection whose association is over is closed
without reading more (last_word.py); a request of the association's after the association
ended under it (its A-ASSOCIATE-AC or -RJ crossing the peer's invalid PDU) is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import struct
import threading
import time
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_P_ABORT

from appliance.dicomnet import last_word
from appliance.dicomnet.direct_receive import (
    MAX_HELD_MESSAGE_BYTES,
    P_DATA_TF,
    DirectReceiveError,
    DirectReceiver,
)
from appliance.dicomnet.idle import peer_silent
from appliance.dicomnet.pdu_read import PduDeadline, recv_body, recv_exactly
from appliance.dicomnet.poll import readable as poll_readable
from appliance.dicomnet.unaccepted import UnacceptedContext

log = logging.getLogger("pas.dicomnet")

SUPPORTED_VERSIONS = ("3.0.",)
# Longest a loop waits without an event: the resolution of pynetdicom's timers and kill flags.
TICK_S = 0.05
# Longest an association's end (kill(): after a release, an abort, a timeout) waits for its
# DUL to finish what it is doing (sending its last PDU) before shutting the connection down.
KILL_GRACE_S = 2.0
# Longest P-DATA-TF PDU accepted when PAS offered no maximum (dicom.max_pdu = 0): a PDU is
# held whole in memory until it is read, as pynetdicom holds a message it assembles.
MAX_UNBOUNDED_PDU_BYTES = MAX_HELD_MESSAGE_BYTES
# Longest PDU other than P-DATA-TF accepted on an established association (A-RELEASE and
# A-ABORT are a few bytes).
MAX_CONTROL_PDU_BYTES = 64 << 10
# Longest A-ASSOCIATE-RQ/-AC/-RJ accepted: 128 presentation contexts proposing every transfer
# syntax pydicom knows, with a user identity item, stay well under it.
MAX_ASSOCIATE_PDU_BYTES = 1 << 20

# The PDUs whose body is four bytes (PS3.8 Tables 9-24 to 9-26).
_FOUR_BYTE_BODIES = {0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}

# Events of the association's own requests to the DUL (PS3.8 Table 9-6): A-ASSOCIATE
# response accept and reject, P-DATA, A-RELEASE request and response, A-ABORT.
_USER_REQUESTS = frozenset({"Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})

# Events of PDUs received from the peer (PS3.8 Table 9-6), whose actions decode them.
_PDU_NAMES = {"Evt3": "A-ASSOCIATE-AC", "Evt4": "A-ASSOCIATE-RJ", "Evt6": "A-ASSOCIATE-RQ",
              "Evt10": "P-DATA-TF", "Evt12": "A-RELEASE-RQ", "Evt13": "A-RELEASE-RP",
              "Evt16": "A-ABORT"}
_PEER_PDUS = frozenset(_PDU_NAMES)
# Set by the DUL thread while the state machine acts on one of them (_QuietPeerActions).
_peer_action = threading.local()

_installed = False
_install_lock = threading.Lock()


class Wakeup:
    """An eventfd a thread can ``select()`` on, set from any thread.

    ``set()`` writes only while the owner is parked (between ``park()`` and ``unpark()``):
    a DUL busy sending a burst of PDUs would otherwise take an eventfd write, and a GIL
    hand-off to the woken thread, per queued PDU. The owner re-checks its queues after
    ``park()``, so a put that saw it busy is never missed (the GIL orders the two flags).
    The lock keeps a late ``set()`` from writing to a closed (and possibly reused) fd."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self.parked = False

    def fileno(self) -> int:
        return self._fd

    def park(self) -> None:
        self.parked = True

    def unpark(self, drain: bool = True) -> None:
        """Stop accepting wake-ups; ``drain=False`` when ``select()`` did not report the
        eventfd (nothing to read: saves a failing read per received PDU; a ``set()`` that
        raced in after the ``select()`` only makes the next one return at once)."""
        self.parked = False
        if drain:
            with contextlib.suppress(BlockingIOError, OSError):
                os.eventfd_read(self._fd)

    def set(self, force: bool = False) -> None:
        if not (self.parked or force):
            return
        with self._lock:
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's ``to_provider_queue``: a put also wakes the DUL's ``select()``."""

    def __init__(self, wakeup: Wakeup) -> None:
        super().__init__()
        self.wakeup = wakeup

    def _put(self, item: Any) -> None:
        super()._put(item)
        self.wakeup.set()


def _association_wake(assoc: Any) -> threading.Event:
    wake = getattr(assoc, "_pas_wake", None)
    if wake is None:
        wake = assoc._pas_wake = threading.Event()
    return wake


def _raw_socket(dul: DULServiceProvider) -> Any:
    """The socket to wait on, or None once pynetdicom closed it."""
    assoc_socket = dul.socket
    sock = getattr(assoc_socket, "socket", None) if assoc_socket is not None else None
    if sock is None or sock.fileno() < 0:
        return None
    return sock


def _direct_receiver(self: DULServiceProvider) -> DirectReceiver | None:
    """The C-STORE fast path (direct_receive.py) of an accepted, established association
    whose AE asked for it (``ae._pas_direct_store``, set by the ingest listener)."""
    direct = getattr(self, "_pas_direct", None)
    if direct is None and self.state_machine.current_state == "Sta6":
        assoc = self.assoc
        sink = getattr(assoc.ae, "_pas_direct_store", None)
        direct = DirectReceiver(self, sink) if sink and assoc.is_acceptor else False
        self._pas_direct = direct  # type: ignore[attr-defined]
    return direct or None


def _bound_socket_waits(self: DULServiceProvider) -> None:
    """Give the association's socket a receive and send timeout (``network_timeout``).

    pynetdicom's accepted sockets block for ever: a peer gone silent in the middle of a PDU
    (a modality switched off mid-image, a cable pulled: the TCP connection stays half open)
    kept its reading thread in ``recv`` and its association slot taken, whatever the
    network timeout said; ``dicom.max_associations`` such peers locked every modality out
    until a restart. Set at the socket (SO_RCVTIMEO/SO_SNDTIMEO), not as a Python timeout,
    which would add a ``poll()`` before every read: a read that times out raises, and the
    association ends as on a closed connection (Evt17)."""
    self._pas_waits_bounded = True  # type: ignore[attr-defined]
    timeout = self.assoc.network_timeout
    sock = _raw_socket(self)
    if sock is None or not timeout or sock.gettimeout() is not None:
        return  # no limit configured, or Python already bounds each wait on this socket
    value = struct.pack("ll", int(timeout), int(timeout % 1 * 1_000_000))
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def _shut_down(dul: DULServiceProvider) -> None:
    """Shut the association's connection down under its DUL (the TCP socket's shutdown, not
    SSLSocket's): a ``recv`` or ``send`` blocked in it returns at once."""
    sock = _raw_socket(dul)
    if sock is not None:
        log.warning("association with %s still reading or sending %g s after it was ended: "
                    "connection shut down", last_word.peer_name(dul), KILL_GRACE_S)
        with contextlib.suppress(OSError, ValueError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _transport_event(self: DULServiceProvider, readable: bool = False) -> bool:
    """pynetdicom's ``_is_transport_event`` and ``_read_pdu_data``, read by PAS in every
    state: on an association that has a :class:`DirectReceiver`, a P-DATA-TF PDU goes to it
    first, and to pynetdicom (decoded as pynetdicom would) only if it is not part of a
    C-STORE it took. PDUs are read with large ``recv_into`` calls instead of pynetdicom's
    4 kB reads. A PDU that cannot be read ends the reading (last_word.py): the stream after
    it cannot be framed. In Sta13 (the association over, PAS's last PDU sent) nothing is
    read: the connection is closed (last_word.py).
    ``readable``: the loop's ``select()`` just reported the socket readable, so pynetdicom's
    own zero-timeout ``select()`` (``socket.ready``) is skipped. (The one other reader, a
    DirectStoreSender sending a C-GET's C-STOREs on this association, may have read what the
    ``select()`` saw: the loop then passes ``readable=False``, see ``dul_run_reactor``.)"""
    if not getattr(self, "_pas_waits_bounded", False):
        _bound_socket_waits(self)
    state = self.state_machine.current_state
    if state == "Sta13":
        return last_word.close_after_last_word(self)
    if getattr(self, "_pas_protocol_error", None) is not None:
        return False  # its Evt19 is queued: the A-ABORT, then Sta13 and the close
    direct = _direct_receiver(self) if state == "Sta6" else None
    # Not connected yet (a requestor before its connect: select() reports the bare socket
    # readable), or closed: nothing to read.
    if not (self.socket and getattr(self.socket, "_is_connected", False)
            and (readable or self.socket.ready)):
        return False
    sock = self.socket.socket
    header = bytearray(6)
    timeout = self.assoc.network_timeout
    deadline = PduDeadline(timeout, self._idle_timer) if timeout else None
    try:
        if not recv_exactly(sock, memoryview(header), deadline):
            if direct:
                direct.abandon()  # a C-STORE in progress is cut: noted before the end's audit
            self.event_queue.put("Evt17")  # the peer closed the connection
            return True
        pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            return _unreadable(self, direct, f"an unknown PDU type (0x{pdu_type:02X})")
        if pdu_type in _FOUR_BYTE_BODIES and pdu_length != 4:
            # Its body is four bytes, always (PS3.8 9.3.6-9.3.8). Read as declared, a short
            # one left its last bytes to be taken for the next PDU's header, and the DUL
            # waited for the rest of it for the network timeout (60 s), the release's answer
            # unsent and the place held; a long one would swallow the next PDU.
            return _unreadable(self, direct, f"an {_FOUR_BYTE_BODIES[pdu_type]} PDU declaring "
                                             f"{pdu_length} bytes (its body has 4)")
        limit = _pdu_limit(self, pdu_type)
        if pdu_length > limit:
            # Memory is reserved from this length: a PDU over what PAS offered to receive is
            # refused before any of its body is read (A-ABORT, the connection closed, as for
            # a broken fragment sequence: reading on would parse its body as PDUs).
            if limit == MAX_UNBOUNDED_PDU_BYTES and pdu_type == P_DATA_TF:
                raise DirectReceiveError(
                    f"PDU of type 0x{pdu_type:02X} declares {pdu_length} bytes, over the "
                    f"{limit >> 20} MB PAS reads into memory at once (dicom.max_pdu = 0 "
                    f"offers no maximum)")
            raise DirectReceiveError(f"PDU of type 0x{pdu_type:02X} declares {pdu_length} "
                                     f"bytes, over the {limit} this association accepts")
        if deadline is not None:
            deadline.progress = pdu_type == P_DATA_TF
        body, complete = recv_body(sock, pdu_length, deadline)
    except (OSError, TimeoutError) as exc:
        log.error("connection closed before the entire PDU was received from %s: %s",
                  last_word.peer_name(self), exc)
        if direct:
            direct.abandon()
        self.event_queue.put("Evt17")
        return True
    if not complete:
        log.error("%s closed the connection inside a PDU", last_word.peer_name(self))
        if direct:
            direct.abandon()
        self.event_queue.put("Evt17")
        return True
    if direct:
        if pdu_type == P_DATA_TF:
            if direct.take(body):
                return True
        else:
            direct.abandon()
    try:
        pdu, event = self._decode_pdu(header + body)
    except Exception as exc:
        return _unreadable(self, direct, f"a PDU of type 0x{pdu_type:02X} that does not "
                                         f"decode ({type(exc).__name__}: {exc})")
    if pdu_type == 0x01:  # who it is, for the lines that name the peer (last_word.py)
        self._pas_calling = str(pdu.calling_ae_title).strip()  # type: ignore[attr-defined]
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)
    return True


def _unreadable(self: DULServiceProvider, direct: DirectReceiver | None, what: str) -> bool:
    """A PDU that cannot be read: named (last_word.py), and nothing more is read; Evt19 has
    the state machine send the A-ABORT (PS3.8 AA-1, AA-8), then Sta13 closes."""
    if direct:
        direct.abandon()
    last_word.protocol_error(self, what)
    self.event_queue.put("Evt19")
    return True


def _pdu_limit(self: DULServiceProvider, pdu_type: int) -> int:
    """The longest PDU body accepted: for P-DATA-TF, the Maximum Length PAS offered in its
    A-ASSOCIATE-AC (PS3.8 D.1: the sender must not exceed it), if it offered one."""
    if pdu_type in (0x01, 0x02, 0x03):
        return MAX_ASSOCIATE_PDU_BYTES
    if pdu_type != 0x04:
        return MAX_CONTROL_PDU_BYTES
    if not self.assoc.is_acceptor:
        # PAS's own associations take what their peer sends, as pynetdicom did: a peer's
        # over-long PDU must not fail a C-MOVE's sub-operations or a forward.
        return 0xFFFFFFFF
    offered = getattr(self.assoc.acceptor, "maximum_length", 0) or 0
    # dicom.max_pdu = 0 offers no maximum, but a PDU is read whole into memory before any of
    # it is filed: one declaring 1.5 GB took the daemon's memory up by every byte sent
    # (invariant 8). Past MAX_UNBOUNDED_PDU_BYTES it is refused as one over an offered one.
    return offered if offered else MAX_UNBOUNDED_PDU_BYTES


def _dul_step(self: DULServiceProvider, assoc_wake: threading.Event,
              readable: bool = False) -> str:
    """One turn of pynetdicom's DUL loop: send a queued primitive or read a PDU, then run one
    state-machine event. "busy", "idle" (nothing to do) or "stop" (aborted)."""
    if self.artim_timer.expired:
        self.event_queue.put("Evt18")
    sending = False
    try:
        if self._process_recv_primitive():
            sending = True  # its PDU goes out in the do_action() below
        elif _transport_event(self, readable):
            self._idle_timer.restart()
    except Exception as exc:
        if isinstance(exc, DirectReceiveError):  # the peer's PDU broke the rules: named
            last_word.protocol_error(self, f"a PDU that breaks the rules ({exc})")
        elif not isinstance(exc, UnacceptedContext):  # that one is reported below
            log.error("exception in the DUL reactor, aborting the association: %s", exc)
        _abort(self, getattr(exc, "abort_reason", 0x00))
        if isinstance(exc, UnacceptedContext):
            exc.report()  # once the abort is sent: the peer does not wait for the audit row
        return "stop"
    try:
        event = self.event_queue.get(block=False)
    except queue.Empty:
        return "idle"
    state = self.state_machine.current_state
    if event in _USER_REQUESTS and state in ("Sta1", "Sta13"):
        # The association ended under its user (the peer's invalid PDU, its close) while the
        # user was deciding: its A-ASSOCIATE-AC or -RJ (or any later request) has no one to
        # go to. pynetdicom's state machine has no action for it: the DUL thread died on an
        # InvalidEventError ("Invalid event 'Evt8' for the current state 'Sta13'"), a
        # traceback in the journal.
        log.debug("%s from the association after its end: dropped", event)
        with contextlib.suppress(queue.Empty):  # its primitive, as the action would take it
            self.to_provider_queue.get(block=False)
        assoc_wake.set()
        return "busy"
    if event in _PEER_PDUS and TRANSITION_TABLE.get((event, state)) in ("AA-1", "AA-8"):
        # A well-formed PDU the state does not allow (a P-DATA-TF or A-RELEASE-RQ before
        # the A-ASSOCIATE-AC, a second A-ASSOCIATE-RQ): pynetdicom aborted without a word.
        name = _PDU_NAMES[event]
        last_word.protocol_error(self, f"{'a' if name[0] == 'P' else 'an'} {name} PDU out "
                                       f"of sequence (DICOM UL state {state})")
    if event in _PEER_PDUS:
        # A message pynetdicom cannot decode (a P-DATA whose command set does not parse)
        # raised in its action: it logged a traceback and ended the DUL without a word to
        # the peer (no A-ABORT), and its own loop died on the error (a second traceback).
        _peer_action.running = True
    try:
        self.state_machine.do_action(event)
    except Exception as exc:
        if event not in _PEER_PDUS:
            raise
        last_word.protocol_error(self, f"a message that does not decode "
                                       f"({type(exc).__name__}: {exc})")
        _abort(self, 0x00)
        return "stop"
    finally:
        _peer_action.running = False
    if sending:
        self._idle_timer.restart()  # PAS was sending, not waiting for the peer (idle.py)
    if self.assoc.is_acceptor and not getattr(self, "_pas_requested", False):
        if event == "Evt6" and self.state_machine.current_state == "Sta3":
            self._pas_requested = True  # type: ignore[attr-defined]  # the RQ went up
        elif self.state_machine.current_state == "Sta1" and state != "Sta1":
            _no_request_coming(self)
    # Whatever the action queued for the association (a DIMSE message, a release or abort
    # indication) is now visible: let its loop look.
    assoc_wake.set()
    return "busy"


def _abort(self: DULServiceProvider, reason: int) -> None:
    """Send an A-ABORT (the UL service-provider: a protocol error) and end this DUL at once;
    the association learns it as from pynetdicom's own provider abort (AA-8): an A-P-ABORT
    indication, so that its loop fires EVT_ABORTED and the listener writes the
    association's audit row and closes its open note. (Ending the association directly,
    as before, skipped both: no ``store`` row, its ``open_associations`` row left until the
    next start.) The report of a protocol error once the abort is sent."""
    direct = getattr(self, "_pas_direct", None)
    if direct:  # a C-STORE cut by this abort: counted before the association's end is seen
        direct.abandon()
    abort_pdu = A_ABORT_RQ()
    abort_pdu.source = 0x02
    abort_pdu.reason_diagnostic = reason
    if self.socket is not None:
        self.socket.send(abort_pdu.encode())
        if self.assoc.is_requestor:
            # PAS's own association: nothing else closes it (an accepted one's thread
            # does). It stayed open, in CLOSE-WAIT once the peer had closed, until the
            # association object was collected (~8 s), after a log line saying "closed".
            self.socket.close()
    self.assoc.is_aborted = True
    self.assoc.is_established = False
    if self.assoc.is_requestor or getattr(self, "_pas_requested", False):
        indication = A_P_ABORT()
        indication.provider_reason = reason if reason in (0x01, 0x02, 0x04, 0x05, 0x06) else 0x00
        self.to_user_queue.put(indication)
    # else: an accepted connection whose A-ASSOCIATE-RQ never went up: its thread waits for
    # one, and is told none is coming (_no_request_coming, as the loop ends).
    self._kill_thread = True
    last_word.wake_sender(self)
    last_word.report(self)


class _QuietPeerActions(logging.Filter):
    """Drops pynetdicom's state machine's lines (an error and a traceback) for an action on
    a peer's PDU that raised: :func:`_dul_step` says it once, naming the peer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_peer_action, "running", False)


def _no_request_coming(self: DULServiceProvider) -> None:
    """The connection of an accepted association ended before any A-ASSOCIATE-RQ reached
    its association thread: the peer closed it (a port probe, a monitoring system's TCP
    check), or sent something else first (an HTTP request or a TLS hello on the plain port,
    an A-ABORT, a PDU that does not decode: pynetdicom answers A-ABORT and closes). That
    thread waits acse_timeout (30 s) for a request; pynetdicom tells it nothing, so the
    connection kept its place among dicom.max_connections (and, before that bound, among
    dicom.max_associations) and two threads for 30 s after it was gone: 64 HTTP probes in
    30 s closed the port to every modality. None tells it none is coming, as stop() does."""
    if self.assoc.is_acceptor and not getattr(self, "_pas_requested", False) \
            and not getattr(self, "_pas_none_sent", False):
        self._pas_none_sent = True  # type: ignore[attr-defined]
        self.to_user_queue.put(None)


def dul_run_reactor(self: DULServiceProvider) -> None:
    """pynetdicom's DUL loop; idle waits block on the socket and the wakeup instead of
    sleeping 1 ms."""
    wakeup: Wakeup = self._pas_wakeup  # type: ignore[attr-defined]
    io_lock: threading.Lock = self._pas_io_lock  # type: ignore[attr-defined]
    assoc_wake = _association_wake(self.assoc)
    self._idle_timer.start()
    idle = False
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            socket_readable = False
            # Bumped by a DirectStoreSender each time it owned the socket: what the select()
            # below saw arrive may have been read by it meanwhile (a C-STORE-RSP), and a
            # blocking read for a PDU that is not coming would hold the I/O lock it waits for.
            direct_sends = getattr(self, "_pas_direct_sends", 0)
            if idle:
                wakeup.park()
                drain = True
                if not self.to_provider_queue.qsize() and not self._kill_thread:
                    sock = _raw_socket(self)
                    waitables = [wakeup] if sock is None else [sock, wakeup]
                    # A socket closed under us raises here: the next loop sees it closed.
                    with contextlib.suppress(OSError, ValueError):
                        readable = poll_readable(waitables, TICK_S)  # fds past 1024 too
                        drain = wakeup in readable
                        socket_readable = sock is not None and sock in readable
                wakeup.unpark(drain)
            if self._kill_thread:
                break
            # The I/O lock: a DirectStoreSender (direct_store.py) may own the socket for
            # one C-STORE exchange; the DUL neither reads nor sends meanwhile.
            with io_lock:
                if getattr(self, "_pas_direct_sends", 0) != direct_sends:
                    socket_readable = False
                step = _dul_step(self, assoc_wake, socket_readable)
            if step == "stop":
                return
            idle = step == "idle"
    finally:
        direct = getattr(self, "_pas_direct", None)
        if direct:  # a C-STORE cut off by the association's end: its spill file goes
            direct.abandon()
        assoc_wake.set()  # the association loop checks dul.is_alive()
        wakeup.close()
        _no_request_coming(self)  # a DUL that ended (killed, failed) before any request
        last_word.report(self)  # a protocol error whose connection did not reach Sta13


def association_run_reactor(self: Association) -> None:
    """pynetdicom's association loop (both modes); waits on the DUL's wake instead of
    sleeping 1 ms. ``_is_paused`` is True while it waits: it touches no queue then, so a
    ``send_*()`` from another thread need not wait for it.

    ``_pas_parked`` is True only while it waits at the checkpoint, between requests.
    pynetdicom also sets ``_is_paused`` while a handler runs (so the handler may call
    ``send_*()``), before the handler's answer is sent: a thread that must not send before
    that answer (a Storage Commitment report after its N-ACTION-RSP) waits for this one.

    (Tried and taken back, 2026-12-06: marking the loop paused once it ended, so that a
    release() racing a kill() from another thread could not spin. With it, a C-MOVE
    sub-association to a slowly reading storescp was aborted for silence 4 times in 5,
    against none in 9 without; why is not understood yet. The spin it was meant to prevent
    was a guess at a 300 s hang in a test's release() that has not been reproduced.)"""
    wake = _association_wake(self)
    self._is_paused = False
    while not self._kill:
        self._is_paused = True
        self._pas_parked = True  # type: ignore[attr-defined]
        wake.wait(TICK_S)
        wake.clear()
        while not self._reactor_checkpoint.wait(TICK_S):
            # Parked: said again at each tick. A sender (release(), send_*()) spins until it
            # reads True; a test's release() once spun 300 s on False while this loop sat
            # here (2026-12-06, after one at 2026-12-05; what wrote False is not found: in
            # this process only this loop and pynetdicom's _serve_request, run by it, do).
            # Parked, this loop touches no queue: True is the truth whatever was written.
            self._is_paused = True
        self._pas_parked = False  # type: ignore[attr-defined]
        self._is_paused = False
        if self._kill:
            break
        # A send_*() in another thread clears the checkpoint, then waits for _is_paused.
        # If it cleared it after our wait returned it may have read _is_paused as True and
        # be sending already: its response must not be taken off the queue here (pynetdicom
        # would drop it as unexpected and the sender would wait out the DIMSE timeout). One
        # of the two threads always sees the other's write (clear/read against write/read),
        # so either we back off now, or it waits until the next turn pauses us.
        if not self._reactor_checkpoint.is_set():
            continue

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)  # type: ignore[arg-type]
            # The peer waited for PAS all along the handler, however long (idle.py).
            self.dul._idle_timer.restart()
            wake.set()  # more may have arrived meanwhile: look again at once

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            log.debug("association released by the peer")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if peer_silent(self):
            log.error("network timeout reached: %s", _silent_peer(self))
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


def _silent_peer(assoc: Association) -> str:
    """Who went silent, and what PAS was waiting for: the line alone named neither (a C-MOVE
    destination that never answered PAS's release, or a viewer gone quiet?)."""
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    waiting = (" while PAS waited for its answer to the A-RELEASE-RQ"
               if assoc.dul.state_machine.current_state == "Sta7" else "")
    ending = "released" if assoc.network_timeout_response == "A-RELEASE" else "aborted"
    return (f"{str(peer.ae_title).strip() or '?'} ({peer.address}) sent nothing for "
            f"{assoc.network_timeout:g} s (dicom.network_timeout_s){waiting}; "
            f"association {ending}")


def install() -> bool:
    """Use the event-driven loops for every association this process makes from now on.
    Idempotent. False (pynetdicom's own loops stay) on a pynetdicom this was not written for."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        if not pynetdicom.__version__.startswith(SUPPORTED_VERSIONS) or not hasattr(os, "eventfd"):
            log.warning("pynetdicom %s: keeping its polling reactors (event-driven waits are "
                        "written for %s)", pynetdicom.__version__, ", ".join(SUPPORTED_VERSIONS))
            return False
        original_init = DULServiceProvider.__init__
        original_kill_dul = DULServiceProvider.kill_dul
        original_kill = Association.kill

        def dul_init(self: DULServiceProvider, assoc: Association) -> None:
            original_init(self, assoc)
            self._pas_wakeup = Wakeup()  # type: ignore[attr-defined]
            self._pas_io_lock = threading.Lock()  # type: ignore[attr-defined]
            self.to_provider_queue = WakingQueue(self._pas_wakeup)  # type: ignore[attr-defined]

        def kill_dul(self: DULServiceProvider) -> None:
            original_kill_dul(self)
            wakeup = getattr(self, "_pas_wakeup", None)
            if wakeup is not None:
                wakeup.set(force=True)

        def kill(self: Association) -> None:
            _association_wake(self).set()
            if threading.current_thread() is self.dul or not self.dul.is_alive():
                original_kill(self)
                return
            # pynetdicom's kill() waits, unbounded, for the DUL to reach Sta1 and stop. A
            # DUL blocked reading a PDU from a peer that stopped mid-way never did: the
            # association thread spun here, its place held (the read's own deadline,
            # PduDeadline, is the first line). Past KILL_GRACE_S the connection is shut
            # down under the DUL: its read returns at once, it ends as on a lost connection.
            self._reactor_checkpoint.set()
            self._kill = True
            self.is_established = False
            self._is_paused = True
            give_up = time.monotonic() + KILL_GRACE_S
            shut = False
            while self.dul.is_alive() and not self.dul.stop_dul():
                if not shut and time.monotonic() > give_up:
                    shut = True
                    _shut_down(self.dul)
                time.sleep(0.01)

        logging.getLogger("pynetdicom.fsm").addFilter(_QuietPeerActions())
        DULServiceProvider.__init__ = dul_init  # type: ignore[method-assign]
        # Thread.__init__ binds self.run_reactor as the thread's target: the class's, now ours.
        DULServiceProvider.run_reactor = dul_run_reactor  # type: ignore[method-assign]
        DULServiceProvider.kill_dul = kill_dul  # type: ignore[method-assign]
        Association.kill = kill  # type: ignore[method-assign]
        Association._run_reactor = association_run_reactor  # type: ignore[method-assign]
        _installed = True
        return True
