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

One behaviour differs on purpose: what the network idle timer measures (idle.py): the
loops restart it when a PDU went out and when a handler returned, not only when one came in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import struct
import threading
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ

from appliance.dicomnet.direct_receive import P_DATA_TF, DirectReceiveError, DirectReceiver
from appliance.dicomnet.idle import peer_silent
from appliance.dicomnet.unaccepted import UnacceptedContext

log = logging.getLogger("pas.dicomnet")

SUPPORTED_VERSIONS = ("3.0.",)
# Longest a loop waits without an event: the resolution of pynetdicom's timers and kill flags.
TICK_S = 0.05
# PDUs up to this size are read into one buffer allocated from their header's length.
PREALLOCATE_PDU_BYTES = 4 << 20
# Longest PDU other than P-DATA-TF accepted on an established association (A-RELEASE and
# A-ABORT are a few bytes).
MAX_CONTROL_PDU_BYTES = 64 << 10

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


def _recv_exactly(sock: Any, view: memoryview) -> bool:
    """Fill ``view`` from the socket; False if the peer closed it first."""
    while len(view):
        count = sock.recv_into(view)
        if not count:
            return False
        view = view[count:]
    return True


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


def _transport_event(self: DULServiceProvider, readable: bool = False) -> bool:
    """pynetdicom's ``_is_transport_event`` and ``_read_pdu_data``, with one change: on an
    association that has a :class:`DirectReceiver`, a P-DATA-TF PDU goes to it first, and to
    pynetdicom (decoded as pynetdicom would) only if it is not part of a C-STORE it took.
    PDUs are read with large ``recv_into`` calls instead of pynetdicom's 4 kB reads.
    ``readable``: the loop's ``select()`` just reported the socket readable, so pynetdicom's
    own zero-timeout ``select()`` (``socket.ready``) is skipped. (The one other reader, a
    DirectStoreSender sending a C-GET's C-STOREs on this association, may have read what the
    ``select()`` saw: the loop then passes ``readable=False``, see ``dul_run_reactor``.)"""
    if not getattr(self, "_pas_waits_bounded", False):
        _bound_socket_waits(self)
    direct = _direct_receiver(self)
    if direct is None or self.state_machine.current_state != "Sta6":
        return self._is_transport_event()
    if not (self.socket and (readable or self.socket.ready)):
        return False
    sock = self.socket.socket
    header = bytearray(6)
    try:
        if not _recv_exactly(sock, memoryview(header)):
            direct.abandon()  # a C-STORE in progress is cut: noted before the end's audit
            self.event_queue.put("Evt17")  # the peer closed the connection
            return True
        pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            log.error("unknown PDU type received 0x%02X", pdu_type)
            self.event_queue.put("Evt19")
            return True
        limit = _pdu_limit(self, pdu_type)
        if pdu_length > limit:
            # Memory is reserved from this length: a PDU over what PAS offered to receive is
            # refused before any of its body is read (A-ABORT, the connection closed, as for
            # a broken fragment sequence: reading on would parse its body as PDUs).
            raise DirectReceiveError(f"PDU of type 0x{pdu_type:02X} declares {pdu_length} "
                                     f"bytes, over the {limit} this association accepts")
        if pdu_length <= PREALLOCATE_PDU_BYTES:
            body = bytearray(pdu_length)
            complete = _recv_exactly(sock, memoryview(body))
        else:  # a length no one sends: memory grows only with what actually arrives
            body = self.socket.recv(pdu_length)
            complete = len(body) == pdu_length
    except (OSError, TimeoutError) as exc:
        log.error("connection closed before the entire PDU was received: %s", exc)
        direct.abandon()
        self.event_queue.put("Evt17")
        return True
    if not complete:
        log.error("the peer closed the connection inside a PDU")
        direct.abandon()
        self.event_queue.put("Evt17")
        return True
    if pdu_type == P_DATA_TF:
        if direct.take(body):
            return True
    else:
        direct.abandon()
    try:
        pdu, event = self._decode_pdu(header + body)
    except Exception as exc:
        log.error("unable to decode the received PDU: %s", exc)
        self.event_queue.put("Evt19")
        return True
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)
    return True


def _pdu_limit(self: DULServiceProvider, pdu_type: int) -> int:
    """The longest PDU body accepted: for P-DATA-TF, the Maximum Length PAS offered in its
    A-ASSOCIATE-AC (PS3.8 D.1: the sender must not exceed it), if it offered one."""
    if pdu_type != 0x04:
        return MAX_CONTROL_PDU_BYTES
    offered = getattr(self.assoc.acceptor, "maximum_length", 0) or 0
    return offered if offered else 0xFFFFFFFF  # dicom.max_pdu = 0: unlimited, as configured


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
        if not isinstance(exc, UnacceptedContext):  # that one is reported below, naming all
            log.error("exception in the DUL reactor, aborting the association: %s", exc)
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02  # the UL service-provider: a protocol error
        abort_pdu.reason_diagnostic = getattr(exc, "abort_reason", 0x00)
        if self.socket is not None:
            self.socket.send(abort_pdu.encode())
        if isinstance(exc, UnacceptedContext):
            exc.report()  # once the abort is sent: the peer does not wait for the audit row
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True
        return "stop"
    try:
        event = self.event_queue.get(block=False)
    except queue.Empty:
        return "idle"
    state = self.state_machine.current_state
    self.state_machine.do_action(event)
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
                        readable = select.select(waitables, [], [], TICK_S)[0]
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


def association_run_reactor(self: Association) -> None:
    """pynetdicom's association loop (both modes); waits on the DUL's wake instead of
    sleeping 1 ms. ``_is_paused`` is True while it waits: it touches no queue then, so a
    ``send_*()`` from another thread need not wait for it."""
    wake = _association_wake(self)
    self._is_paused = False
    while not self._kill:
        self._is_paused = True
        wake.wait(TICK_S)
        wake.clear()
        self._reactor_checkpoint.wait()
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
            original_kill(self)

        DULServiceProvider.__init__ = dul_init  # type: ignore[method-assign]
        # Thread.__init__ binds self.run_reactor as the thread's target: the class's, now ours.
        DULServiceProvider.run_reactor = dul_run_reactor  # type: ignore[method-assign]
        DULServiceProvider.kill_dul = kill_dul  # type: ignore[method-assign]
        Association.kill = kill  # type: ignore[method-assign]
        Association._run_reactor = association_run_reactor  # type: ignore[method-assign]
        _installed = True
        return True
