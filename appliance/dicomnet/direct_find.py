"""C-FIND Pending responses written straight to an accepted association's socket.

Owns: the wire encoding of a Pending C-FIND-RSP (command set, P-DATA-TF fragmentation as
pynetdicom does it) and its sending, in the thread that runs the C-FIND handler, on an
association pynetdicom negotiated and still owns. May not touch: negotiation, release,
abort (pynetdicom's), the final response (Success, Cancel, a failure: pynetdicom sends it
when the handler yields it), the identifier's contents (the caller's bytes).

Why: through pynetdicom each match crossed a Dataset for its command set built through
``primitive_to_message`` and encoded twice (once for its group length), the identifier's
``pretty_dataset`` (formatted even with its logging off), a queue per PDU and the DUL thread,
which took the GIL back from the handler for every PDU it sent: ~0.75 ms per match (an
IMAGE-level C-FIND of the 520-image MR study, findscu as the viewer: 391 ms, Orthanc 479 ms;
now 38 ms, bench/qr.py), where the SQL is a few microseconds a row. Here the command set
of a query's Pending responses is encoded once, and each match is one ``sendall`` of the
same PDUs pynetdicom would have sent, byte for byte (tests/test_serving_qr_answers.py
compares them).

Back-pressure is the socket's: ``sendall`` returns once the kernel took the bytes, so a
viewer reading slowly holds one answer in PAS's memory, not a queue of them (invariant 8);
a viewer that stops reading fails the send after the socket's send timeout (reactor.py's
``_bound_socket_waits``), and the association is then aborted through pynetdicom. The DUL
is kept off the socket meanwhile by its I/O lock (reactor.py), taken once per answer, so it
still reads what the viewer sends between two answers: a C-CANCEL-RQ reaches
``event.is_cancelled`` as before, an A-ABORT or A-RELEASE-RQ ends the answers.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from appliance.dicomnet.direct_store import _element, _ui, take_socket_after_queue
from appliance.dicomnet.outgoing import association_ended

log = logging.getLogger("pas.dicomnet")

C_FIND_RSP = 0x8020
DATASET_PRESENT = 0x0001  # pynetdicom's CommandDataSetType for "an identifier follows"
PENDING = 0xFF00
P_DATA_TF = 0x04
COMMAND_MORE, COMMAND_LAST, DATASET_MORE, DATASET_LAST = 0x01, 0x03, 0x00, 0x02


class DirectFindError(Exception):
    """The answer could not be sent: the association has ended or was aborted."""


def c_find_rsp(sop_class_uid: str, message_id: int, status: int = PENDING) -> bytes:
    """The command set of a C-FIND-RSP with an identifier (PS3.7 9.3.2.2), implicit VR
    little endian, as pynetdicom encodes it."""
    body = b"".join([
        _element((0x0000, 0x0002), _ui(sop_class_uid)),
        _element((0x0000, 0x0100), struct.pack("<H", C_FIND_RSP)),
        _element((0x0000, 0x0120), struct.pack("<H", message_id)),
        _element((0x0000, 0x0800), struct.pack("<H", DATASET_PRESENT)),
        _element((0x0000, 0x0900), struct.pack("<H", status)),
    ])
    return _element((0x0000, 0x0000), struct.pack("<I", len(body))) + body


def message_pdus(context_id: int, command: bytes, dataset: bytes, max_pdu: int) -> bytes:
    """A DIMSE message as the P-DATA-TF PDUs pynetdicom's ``encode_msg`` sends: the command
    then the dataset, each cut into fragments of at most ``max_pdu - 6`` bytes (the peer's
    Maximum Length; 0: no limit), one presentation data value per PDU."""
    size = max_pdu - 6 if max_pdu else max(len(command), len(dataset), 1)
    pdus = []
    for data, more, last in ((command, COMMAND_MORE, COMMAND_LAST),
                             (dataset, DATASET_MORE, DATASET_LAST)):
        for start in range(0, len(data), size):
            fragment = data[start:start + size]
            control = last if start + size >= len(data) else more
            pdus.append(struct.pack(">BBIIBB", P_DATA_TF, 0, len(fragment) + 6,
                                    len(fragment) + 2, context_id, control))
            pdus.append(fragment)
    return b"".join(pdus)


class DirectFindResponder:
    """Sends the Pending responses of one C-FIND request (the handler's thread)."""

    def __init__(self, assoc: Any, context_id: int, message_id: int, sop_class_uid: str,
                 status: int = PENDING):
        self.assoc = assoc
        self.dul = assoc.dul
        self.io_lock = assoc.dul._pas_io_lock
        self.context_id = context_id
        self.command = c_find_rsp(sop_class_uid, message_id, status)
        # The requestor's Maximum Length: what each PDU sent to it may hold.
        self.max_pdu = int(assoc.dimse.maximum_pdu_size or 0)
        self.timeout = assoc.dimse_timeout or 30

    @classmethod
    def for_event(cls, event: Any, status: int = PENDING) -> DirectFindResponder | None:
        """A responder for the C-FIND request of ``event``, its answers' Pending ``status``
        0xFF00 or 0xFF01; None when the association has
        no I/O lock (``dicom.event_driven = false``: pynetdicom's own loops), and pynetdicom
        sends each answer."""
        assoc = event.assoc
        if getattr(getattr(assoc, "dul", None), "_pas_io_lock", None) is None:
            return None
        if 0 < int(assoc.dimse.maximum_pdu_size or 0) < 7:  # pynetdicom refuses it: let it
            return None
        return cls(assoc, int(event.context.context_id), int(event.request.MessageID),
                   str(event.request.AffectedSOPClassUID), status)

    def send(self, identifier: bytes) -> None:
        """Send one Pending response carrying ``identifier`` (encoded in the context's
        transfer syntax). Raises DirectFindError when it could not be sent: the association
        had ended, or it is aborted here (a broken connection, a DUL that did not drain):
        pynetdicom then sends no final Success after a cut answer."""
        if association_ended(self.assoc):
            raise DirectFindError("the association ended before the answer was sent")
        pdus = message_pdus(self.context_id, self.command, identifier, self.max_pdu)
        failure: Exception
        try:
            self._take_socket()
        except DirectFindError as exc:
            failure = exc
        else:
            try:
                sock = getattr(self.dul.socket, "socket", None)
                if sock is None or sock.fileno() < 0:
                    raise DirectFindError("the association's connection is closed")
                sock.sendall(pdus)
                self.dul._idle_timer.restart()  # the viewer took the answer: not idle
                return
            except (OSError, DirectFindError) as exc:
                failure = exc
            finally:
                self.io_lock.release()
        # Outside the lock: pynetdicom's abort goes through the DUL thread.
        log.warning("C-FIND answer to %s not sent, aborting the association: %s",
                    str(self.assoc.requestor.ae_title).strip(), failure)
        self.assoc.abort()
        try:
            raise DirectFindError(str(failure))
        finally:
            # ``failure``'s traceback holds this frame, whose callers reach the C-FIND
            # handler's generator: left in that cycle, the generator was closed (and its
            # audit row written) only at the next garbage collection (direct_store.py).
            del failure

    def _take_socket(self) -> None:
        """Acquire the I/O lock once the DUL has sent whatever was queued before (nothing,
        normally: the viewer sent this request after the previous final response)."""
        if not take_socket_after_queue(self.dul, self.io_lock, self.timeout):
            raise DirectFindError("the DUL did not send what was queued before")
